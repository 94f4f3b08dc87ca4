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
    with _shared_metrics(enabled=False):
        assert MULTIPROC_DIR_ENV not in os.environ
    with _shared_metrics(enabled=True):
        directory = os.environ[MULTIPROC_DIR_ENV]
        assert os.path.isdir(directory) and not os.listdir(directory)
    assert MULTIPROC_DIR_ENV not in os.environ and not os.path.exists(directory)
    # a directory the operator chose is used as it is and kept
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(tmp_path))
    with _shared_metrics(enabled=True):
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

    def serve(workers: int, engine: str = "per-worker") -> None:
        args = argparse.Namespace(
            config=None, serve_log_level="warning", workers=workers, host="x", port=1, engine=engine
        )
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


def test_serve_with_workers_starts_one_engine_and_gives_the_workers_one_thread(monkeypatch):
    import argparse
    import os

    import uvicorn

    from app.config_errors import ENGINE_SOCKET_ENV
    from app.serving import cli, supervisor

    events: list[object] = []

    class FakeSupervisor:
        def __init__(self, *, stop_timeout_s: float) -> None:
            self.address = "/tmp/engine-test.sock"

        def start(self) -> None:
            events.append(("start", os.environ.get(ENGINE_SOCKET_ENV), os.environ.get(cli.TORCH_THREADS_ENV)))

        def stop(self) -> None:
            events.append("stop")

    monkeypatch.setattr(supervisor, "EngineSupervisor", FakeSupervisor)
    monkeypatch.setattr(
        uvicorn,
        "run",
        lambda *a, **k: events.append(
            ("run", k["workers"], os.environ.get(ENGINE_SOCKET_ENV), os.environ.get(cli.TORCH_THREADS_ENV))
        ),
    )
    for name in (cli.TORCH_THREADS_ENV, ENGINE_SOCKET_ENV, "RECIPROCAM_CONFIG_FILE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(
        config=None, serve_log_level="warning", workers=3, host="x", port=1, engine=None
    )
    assert cli.run_serve(args) == 0
    # the engine starts with the operator's environment; the workers get its address and one thread
    assert events == [("start", None, None), ("run", 3, "/tmp/engine-test.sock", "1"), "stop"]
    assert ENGINE_SOCKET_ENV not in os.environ and cli.TORCH_THREADS_ENV not in os.environ
    events.clear()
    args.workers = 1  # one worker: no engine process by default
    assert cli.run_serve(args) == 0
    assert events == [("run", 1, None, None)]
    events.clear()
    args.engine = "shared"  # unless asked for
    assert cli.run_serve(args) == 0
    assert events == [("start", None, None), ("run", 1, "/tmp/engine-test.sock", "1"), "stop"]


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


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(path)
    return str(path)


def test_explain_refuses_top_k_and_device_mistakes_without_a_traceback(tmp_path, capsys):
    import pytest

    image = _image(tmp_path)
    weights = save_self_describing(tmp_path / "tiny.safetensors", "deit_tiny")  # 7 classes
    for argv, words in (
        (["--top-k", "-1"], "argument --top-k: must be at least 1, not -1"),
        (["--top-k", "0"], "argument --top-k: must be at least 1, not 0"),
        (["--device", "tpu"], "unknown device 'tpu': write auto, cpu, cuda or cuda:N"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["explain", image, "--weights", str(weights), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    # more classes than the model has: refused as the service's 422 refuses it, nothing written
    out = tmp_path / "out"
    assert main(["explain", image, "--weights", str(weights), "--top-k", "10", "--out", str(out)]) == 2
    assert "error: top_k 10 is more than the model's 7 classes" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_explain_with_hub_weights_offline_fails_within_the_hub_probe(monkeypatch, capsys, tmp_path):
    """No download retries: the service's quick reachability probe, with its timeout, runs first."""
    import timm

    from app.engine import weights_location

    probes = []

    def refuse(address, timeout):
        probes.append(timeout)
        raise OSError("network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("no download may start when the hub cannot be reached")

    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights_location, "_hub_weights_cached", lambda arch: False)
    monkeypatch.setattr(weights_location.socket, "create_connection", refuse)
    monkeypatch.setattr(timm, "create_model", no_download)
    assert main(["explain", _image(tmp_path), "--model", "deit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert probes == [3.0]  # the default of the service's hub_probe_timeout_s
    assert "cannot be reached" in err and "--weights /path/to/deit_tiny_patch16_224.safetensors" in err


def test_relative_weights_are_found_from_any_folder_as_the_service_finds_them(monkeypatch, tmp_path, capsys):
    image = _image(tmp_path)
    monkeypatch.chdir(tmp_path)  # outside the project
    code = main(["explain", image, "--weights", "app/weights/shapes_vit.safetensors", "--out", "o", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["weights"].endswith("app/weights/shapes_vit.safetensors")
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_every_subcommand_shows_its_defaults_in_help(capsys):
    import pytest

    expected = {
        "explain": ["--top-k TOP_K", "(default: 1)", "(default: hub)", "(default: gaussian)"],
        "serve": ["(default: 8000)", "(default: 127.0.0.1)"],
        "train": ["(default: out/shapes_vit.safetensors)", "(default: 30)", "--seed SEED"],
        "eval": ["(default: 200)", "(default: synthetic)", "(default: eval-out)"],
    }
    for command, words in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for word in words:
            assert word in text, (command, word)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "training data and init seed (default: 0)" in " ".join(capsys.readouterr().out.split())


def test_explain_cli_writes_jpeg_overlays_and_checks_the_quality(tmp_path, capsys):
    import pytest

    weights = save_self_describing(tmp_path / "tiny.safetensors", "deit_tiny")
    image = tmp_path / "photo.png"
    Image.new("RGB", (45, 30), (200, 60, 10)).save(image)
    out = tmp_path / "out"
    argv = ["explain", str(image), "--weights", str(weights), "--out", str(out), "--json"]
    assert main([*argv, "--picture-format", "jpeg", "--jpeg-quality", "70"]) == 0
    report = json.loads(capsys.readouterr().out)
    (prediction,) = report["results"][0]["predictions"]
    assert prediction["overlay"].endswith(".jpg")
    overlay = Image.open(prediction["overlay"])
    assert (overlay.format, overlay.size, overlay.mode) == ("JPEG", (45, 30), "RGB")
    assert list(out.glob("*.png")) == []
    for quality in ("0", "101"):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--picture-format", "jpeg", "--jpeg-quality", quality])
        assert exit_info.value.code == 2
        assert "--jpeg-quality: must be from 1 to 100" in capsys.readouterr().err
