import json

from PIL import Image

from app.cli import main
from tests.helpers import save_self_describing


def test_explain_cli_writes_overlays(tmp_path, capsys):
    weights = save_self_describing(
        tmp_path / "tiny.safetensors", "deit_tiny", labels=[f"L{i}" for i in range(7)]
    )
    images = []
    for i, size in enumerate([(50, 40), (33, 70)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        images.append(str(path))
    out = tmp_path / "out"
    code = main(["explain", *images, "--weights", str(weights), "--top-k", "2", "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["results"]) == 2
    for result, size in zip(report["results"], [(50, 40), (33, 70)], strict=True):
        assert [p["rank"] for p in result["predictions"]] == [1, 2]
        for prediction in result["predictions"]:
            assert prediction["label"].startswith("L")
            overlay = Image.open(prediction["overlay"])
            assert overlay.size == size and overlay.mode == "RGB"
    assert len(list(out.glob("*.png"))) == 4


def test_explain_cli_reports_errors(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    weights = save_self_describing(tmp_path / "tiny.safetensors", "deit_tiny")
    assert main(["explain", str(bad), "--weights", str(weights), "--out", str(tmp_path)]) == 2
    assert "not an image" in capsys.readouterr().err
    assert main(["explain", str(bad), "--weights", str(tmp_path / "none.pth")]) == 2


def test_serve_gives_several_workers_one_fresh_metrics_directory(monkeypatch, tmp_path):
    import os

    from app.serving.cli import _shared_metrics
    from app.serving.metrics import MULTIPROC_DIR_ENV

    monkeypatch.delenv(MULTIPROC_DIR_ENV, raising=False)
    with _shared_metrics(1):
        assert MULTIPROC_DIR_ENV not in os.environ
    with _shared_metrics(3):
        directory = os.environ[MULTIPROC_DIR_ENV]
        assert os.path.isdir(directory) and not os.listdir(directory)
    assert MULTIPROC_DIR_ENV not in os.environ and not os.path.exists(directory)
    # a directory the operator chose is used as it is and kept
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path))
    with _shared_metrics(3):
        assert os.environ[MULTIPROC_DIR_ENV] == str(tmp_path)
    assert tmp_path.is_dir()


def test_serve_shares_the_cores_out_among_its_workers(monkeypatch):
    import argparse
    import os

    import uvicorn

    from app.serving import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [cli.worker_threads(n) for n in (1, 4, 5, 32)] == [16, 4, 3, 1]

    seen: list[str | None] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.append(os.environ.get(cli.TORCH_THREADS_ENV)))
    for name in (cli.TORCH_THREADS_ENV, "RECIPROCAM_CONFIG_FILE", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def serve(workers: int) -> None:
        args = argparse.Namespace(config=None, serve_log_level="warning", workers=workers, host="x", port=1)
        assert cli.run_serve(args) == 0
        assert cli.TORCH_THREADS_ENV not in os.environ or os.environ[cli.TORCH_THREADS_ENV] == "2"

    serve(1)  # one worker: torch's own default
    serve(4)  # the workers inherit the environment while serve runs: 16 cores / 4 workers
    monkeypatch.setenv(cli.TORCH_THREADS_ENV, "2")  # an operator's choice is kept
    serve(4)
    monkeypatch.delenv(cli.TORCH_THREADS_ENV)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # so is torch's own
        monkeypatch.setenv(name, "3")
        serve(4)
        monkeypatch.delenv(name)
    assert seen == [None, "4", "2", None, None]
    assert cli.TORCH_THREADS_ENV not in os.environ  # nothing left behind in this process


async def test_the_service_applies_its_torch_threads_setting(monkeypatch):
    import torch

    from app.config import Settings
    from app.serving.service import Service

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    service = Service(Settings(models=[], torch_threads=target))
    monkeypatch.setattr(service, "_watch_sigterm", lambda: None)
    try:
        await service.start()
        assert torch.get_num_threads() == target
        # threads the service starts afterwards (I/O pool, compute threads) take the same count
        assert service.io_pool.submit(torch.get_num_threads).result() == target
    finally:
        torch.set_num_threads(before)
        await service.stop()


def test_mistakes_end_with_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A corrupt weights file, a labels file in the wrong shape, a config file that does not parse
    and out-of-range option values: exit status 2 and one clear message on stderr."""
    import pytest

    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(image)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not safetensors")
    assert main(["explain", str(image), "--weights", str(corrupt), "--model", "vit_tiny_patch16_224"]) == 2
    assert "cannot read" in capsys.readouterr().err
    weights = save_self_describing(tmp_path / "tiny.safetensors", "deit_tiny")
    labels = tmp_path / "labels.json"
    labels.write_text('{"names": ["a"]}', encoding="utf-8")
    assert main(["explain", str(image), "--weights", str(weights), "--labels", str(labels)]) == 2
    assert "labels file" in capsys.readouterr().err
    bad_yaml = tmp_path / "settings.yaml"
    bad_yaml.write_text("batch: [unclosed\n", encoding="utf-8")
    # serve passes the file on to its workers through the environment: restored after the test
    monkeypatch.setenv("RECIPROCAM_CONFIG_FILE", str(bad_yaml))
    assert main(["serve", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    # an output path under a file cannot be made: found before any work, not after it
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    assert main(["eval", "--out", str(blocker / "out"), "--limit", "2"]) == 2
    assert main(["train", "--out", str(blocker / "w.safetensors"), "--epochs", "1"]) == 2
    assert "a-file" in capsys.readouterr().err
    for argv in (
        ["serve", "--port", "99999"],
        ["serve", "--workers", "0"],
        ["--log-level", "loud", "serve"],
        ["train", "--out", str(tmp_path / "weights.pth")],  # written as safetensors whatever the name
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
