import pytest

from app.engine.models import ModelLoadError
from app.engine.weights_location import PROJECT_ROOT, check_hub_reachable, resolve_weights


def test_unreachable_hub_fails_fast_with_a_clear_reason(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr("app.engine.weights_location._hub_weights_cached", lambda arch: False)
    with pytest.raises(ModelLoadError) as failure:
        check_hub_reachable("deit_small_patch16_224", timeout_s=2)
    message = str(failure.value)
    assert "deit_small_patch16_224" in message and "cannot be reached" in message
    assert "WEIGHTS" in message  # says what to do
    # cached weights or an explicit offline mode skip the probe
    monkeypatch.setattr("app.engine.weights_location._hub_weights_cached", lambda arch: True)
    check_hub_reachable("deit_small_patch16_224", timeout_s=2)
    monkeypatch.setattr("app.engine.weights_location._hub_weights_cached", lambda arch: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_reachable("deit_small_patch16_224", timeout_s=2)


def test_relative_weights_are_found_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("hub") == "hub" and resolve_weights("random:3") == "random:3"
    assert resolve_weights("pyproject.toml") == str(PROJECT_ROOT / "pyproject.toml")
    assert resolve_weights("missing/file.safetensors") == "missing/file.safetensors"
    (tmp_path / "local.pth").write_bytes(b"")
    assert resolve_weights("local.pth") == "local.pth"


@pytest.mark.parametrize("wait", ["block", "spin"])
def test_the_cuda_wait_setting_reaches_the_engine(wait):
    from app.config import Settings
    from app.serving.metrics import ServiceMetrics
    from app.serving.registry import ModelRegistry

    model = {"name": "m", "arch": "deit_tiny_patch16_224", "weights": "random:0", "device": "cpu"}
    model["model_kwargs"] = {"img_size": 32, "patch_size": 8, "depth": 2}
    settings = Settings(models=[model], cuda_wait=wait)
    loaded = ModelRegistry(settings, ServiceMetrics())._load_blocking(settings.models[0])
    assert loaded.engine.host_wait == wait


def test_a_misspelt_or_missing_hub_architecture_is_named_as_such(monkeypatch):
    """Hub weights for an architecture timm does not know, or for none at all, are refused with that
    reason before the hub is tried (not "the hub cannot be reached")."""
    from app.config import Settings
    from app.serving.metrics import ServiceMetrics
    from app.serving.registry import ModelRegistry

    def unreachable(arch, timeout_s):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr("app.serving.registry.check_hub_reachable", unreachable)
    settings = Settings(models=[{"name": "typo", "arch": "deit_smal_patch16_224"}, {"name": "none"}])
    registry = ModelRegistry(settings, ServiceMetrics())
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'deit_smal_patch16_224'"):
        registry._load_blocking(settings.models[0])
    with pytest.raises(ModelLoadError, match="need an architecture"):
        registry._load_blocking(settings.models[1])
