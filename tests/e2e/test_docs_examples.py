"""The examples of README.md and docs/*.md, taken from the markdown itself and run against a live server.

One ``python -m app serve`` process serves the shipped ``shapes`` model and a ``deit_small`` with
seeded random weights at 64 px (the docs name the hub model; no hub is needed here). Each curl
command, Python snippet (httpx and tritonclient) and ``python -m app`` command is read from the
fenced code blocks, the host and port are put in, and it runs in a folder holding the image files
the docs name (cat.jpg, dog.png, ...). A doc change that breaks an example fails here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.readiness import wait_until_ready
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/service.md", "docs/oip.md", "docs/evaluation.md"]
DOCUMENTED_HOSTS = ("http://127.0.0.1:8000", "http://localhost:8000", "127.0.0.1:8000", "localhost:8000")
IMAGES = {"cat.jpg": "JPEG", "dog.png": "PNG", "a.jpg": "JPEG", "b.png": "PNG", "shape.png": "PNG"}


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str


def code_blocks(doc: str) -> list[Block]:
    """The fenced code blocks of a markdown file, with their language and first line."""
    blocks: list[Block] = []
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[index])
        if match:
            end = index + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(doc, index + 2, match.group(1), "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks


def shell_commands(text: str) -> list[str]:
    """Commands of a shell block: comments dropped, backslash continuations and heredocs joined."""
    commands: list[str] = []
    current: list[str] = []
    heredoc: str | None = None
    for line in text.splitlines():
        if heredoc is not None:
            current.append(line)
            if line.strip() == heredoc:
                commands.append("\n".join(current))
                current, heredoc = [], None
            continue
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if not current and "  # " in line:
            line = line.split("  # ", 1)[0].rstrip()
        current.append(line)
        marker = re.search(r"<<-?'?(\w+)'?", line)
        if marker:
            heredoc = marker.group(1)
        elif line.rstrip().endswith("\\"):
            continue
        else:
            commands.append("\n".join(current))
            current = []
    if current:
        commands.append("\n".join(current))
    return commands


def with_host(text: str, port: int) -> str:
    for documented in DOCUMENTED_HOSTS:
        scheme = "http://" if documented.startswith("http://") else ""
        text = text.replace(documented, f"{scheme}127.0.0.1:{port}")
    return text


def write_images(folder: Path) -> None:
    from app.eval.shapes import SHAPE_CLASSES, generate

    rng = np.random.default_rng(0)
    shapes = generate(1000, 40)
    circle = int(np.flatnonzero(shapes.labels == SHAPE_CLASSES.index("circle"))[0])
    for index, (name, kind) in enumerate(IMAGES.items()):
        if name == "shape.png":  # a shape the shipped model knows: the first circle of the eval seed
            Image.fromarray(shapes.images[circle]).save(folder / name)
            continue
        pixels = rng.integers(0, 256, (48 + 8 * index, 64, 3), dtype=np.uint8)
        pixels[10:30, 20:40] = (230, 40, 40)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=kind)
        (folder / name).write_bytes(buffer.getvalue())


@dataclass
class DocsServer:
    url: str
    port: int
    folder: Path


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocsServer]:
    folder = tmp_path_factory.mktemp("docs")
    write_images(folder)
    port = free_port()
    models = [
        {
            "name": "deit_small",
            "arch": "deit_small_patch16_224",
            "weights": "random:0",
            "model_kwargs": {"img_size": 64},
            "device": "cpu",
        },
        {"name": "shapes", "weights": "app/weights/shapes_vit.safetensors", "device": "cpu"},
    ]
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("RECIPROCAM_")}
    env.update(
        RECIPROCAM_MODELS=json.dumps(models),
        RECIPROCAM_LOG_LEVEL="warning",
        RECIPROCAM_IO_WORKERS="2",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="2",
    )
    log = folder / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, 300, lambda: log.read_text(errors="replace")[-4000:])
        yield DocsServer(url=url, port=port, folder=folder)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def all_commands() -> list[tuple[Block, str]]:
    return [
        (block, command)
        for doc in DOCS
        for block in code_blocks(doc)
        if block.lang in ("bash", "sh")
        for command in shell_commands(block.text)
    ]


def test_every_curl_example_gets_a_successful_answer(docs_server: DocsServer) -> None:
    env = {
        **os.environ,
        "KEY": "any-key",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    ran = 0
    for block, command in all_commands():
        if not command.lstrip().startswith("curl "):
            continue
        runnable = with_host(command, docs_server.port).replace("curl -s ", "curl -sS --fail-with-body ", 1)
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", runnable],
            cwd=docs_server.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        where = f"{block.doc}:{block.line}: {command}"
        assert done.returncode == 0, f"{where}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if done.stdout.lstrip().startswith("{"):
            assert "error" not in json.loads(done.stdout), where
        ran += 1
    assert ran >= 7  # README 2, service.md 4, oip.md 1: the extraction found them


def test_every_python_example_runs(docs_server: DocsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python blocks that talk to the service run in order, one namespace per file (a later block may
    use the client an earlier one made)."""
    monkeypatch.chdir(docs_server.folder)
    ran = 0
    for doc in DOCS:
        namespace: dict[str, Any] = {"__name__": "__docs__"}
        for block in code_blocks(doc):
            if block.lang != "python" or not any(host in block.text for host in DOCUMENTED_HOSTS):
                continue
            if "from kserve" in block.text and importlib.util.find_spec("kserve") is None:
                continue  # KServe's client is an optional extra (kserve)
            source = with_host(block.text, docs_server.port)
            try:
                exec(compile(source, f"{block.doc}:{block.line}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{block.doc}:{block.line}: {type(exc).__name__}: {exc}")
            ran += 1
    assert ran >= 4  # README httpx and tritonclient, service.md httpx, oip.md tritonclient (2)
    assert Path("overlay.png").stat().st_size > 0 and Path("heatmap.png").stat().st_size > 0


def test_every_cli_command_is_accepted(docs_server: DocsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m app explain`` runs (hub architectures with random weights); serve, train and eval
    commands are parsed, so a renamed or removed option fails; settings given in the environment
    load; scripts the docs name exist."""
    from app.cli import build_parser, main
    from app.config import load_settings

    monkeypatch.chdir(docs_server.folder)
    explained = parsed = settings = 0
    for block, command in all_commands():
        where = f"{block.doc}:{block.line}: {command}"
        if command.lstrip().startswith("curl "):
            continue  # run by the test above
        words = shlex.split(command.replace("\\\n", " "), comments=True)
        assignments = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            name, _, value = words.pop(0).partition("=")
            assignments[name] = value
        if assignments:
            for key in [k for k in os.environ if k.upper().startswith("RECIPROCAM_")]:
                monkeypatch.delenv(key)
            for name, value in assignments.items():
                monkeypatch.setenv(name, value)
            load_settings()  # raises with the variable's name on a mistake
            for name in assignments:
                monkeypatch.delenv(name)
            settings += 1
        if len(words) >= 2 and words[0].endswith("python") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), where
        if "-m" not in words or words[words.index("-m") + 1] != "app":
            continue
        argv = words[words.index("-m") + 2 :]
        args = build_parser().parse_args(argv)  # exits 2 on an unknown option
        parsed += 1
        if args.command == "explain":
            if args.model and args.weights == "hub":
                argv += ["--weights", "random:0"]
            assert main(argv) == 0, where
            explained += 1
    assert explained >= 2 and parsed >= 6 and settings >= 3, (explained, parsed, settings)


def test_the_response_example_is_a_real_response(docs_server: DocsServer) -> None:
    """docs/service.md's explain response for ``shapes``: the same fields, and the grid, size and
    class labels the shipped model really has."""
    (example,) = [
        json.loads(block.text)
        for block in code_blocks("docs/service.md")
        if block.lang == "json" and '"explanations"' in block.text
    ]
    model = httpx.get(f"{docs_server.url}/v1/models/{example['model']}", timeout=30).json()
    image = example["images"][0]
    real = httpx.post(
        f"{docs_server.url}/v1/models/{example['model']}/explain",
        files={"file": ("shape.png", (docs_server.folder / "shape.png").read_bytes(), "image/png")},
        timeout=60,
    ).json()
    real_image = real["images"][0]
    assert set(example) == set(real) and set(example["timing"]) == set(real["timing"])
    assert set(image) == set(real_image)
    assert set(image["predictions"][0]) == set(real_image["predictions"][0])
    explanation, real_explanation = image["explanations"][0], real_image["explanations"][0]
    assert set(explanation) == set(real_explanation)
    assert explanation["grid"] == real_explanation["grid"] and explanation["size"] == real_explanation["size"]
    for entry in (image["predictions"][0], explanation):
        assert model["labels"][entry["class_id"]] == entry["label"]
    # shape.png is the image the example came from: the same class, probability and score range
    real_prediction = real_image["predictions"][0]
    assert real_prediction["class_id"] == image["predictions"][0]["class_id"]
    assert real_prediction["probability"] == pytest.approx(image["predictions"][0]["probability"], abs=1e-3)
    assert real_explanation["score_range"] == pytest.approx(explanation["score_range"], abs=1e-3)
    assert [real_image["height"], real_image["width"]] == [image["height"], image["width"]]


def test_settings_examples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import load_settings

    for key in [k for k in os.environ if k.upper().startswith("RECIPROCAM_")]:
        monkeypatch.delenv(key)
    examples = [
        json.loads(block.text)
        for doc in DOCS
        for block in code_blocks(doc)
        if block.lang == "json" and block.text.lstrip().startswith('{\n  "models"')
    ]
    assert examples
    for example in examples:
        load_settings(**example)
