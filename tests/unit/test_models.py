import json
from pathlib import Path

import pytest
import torch

from app.engine.models import HubUnavailableError, ModelLoadError, WeightsSource, load_model
from tests.helpers import TINY, TINY_MODELS, make_tiny, save_self_describing

ARCH, KW = TINY_MODELS["deit_tiny"]
KWARGS = {**TINY, **KW}
KWARGS.pop("num_classes")


def _probe(loaded):
    g = torch.Generator().manual_seed(0)
    return loaded.model(torch.randn(1, 3, 32, 32, generator=g))


def test_weights_source_parsing():
    assert WeightsSource.parse("hub").kind == "hub"
    assert WeightsSource.parse(None).kind == "hub"
    assert WeightsSource.parse("random:42") == WeightsSource("random", seed=42)
    assert WeightsSource.parse("/tmp/x.pth").kind == "file"
    with pytest.raises(ModelLoadError, match="random:SEED"):
        WeightsSource.parse("random:abc")
    assert WeightsSource.parse("random") == WeightsSource("random", seed=0)
    # a file whose name starts with "random" is a file, not random weights
    assert WeightsSource.parse("random_init.safetensors") == WeightsSource(
        "file", path=Path("random_init.safetensors")
    )


def test_random_weights_are_seeded_and_described(caplog):
    a = load_model(ARCH, "random:3", model_kwargs=KWARGS, num_classes=5, warmup=False)
    b = load_model(ARCH, "random:3", model_kwargs=KWARGS, num_classes=5, warmup=False)
    c = load_model(ARCH, "random:4", model_kwargs=KWARGS, num_classes=5, warmup=False)
    assert torch.equal(_probe(a), _probe(b))
    assert not torch.equal(_probe(a), _probe(c))
    assert a.weights == "random:3"
    assert "RANDOM weights" in caplog.text
    assert a.labels == [str(i) for i in range(5)]
    desc = a.describe()
    assert desc["grid"] == [4, 4] and desc["num_prefix_tokens"] == 1 and desc["num_classes"] == 5
    assert desc["path"] in ("reduced", "reference")


def test_safetensors_self_describing_with_labels(tmp_path):
    labels = [f"c{i}" for i in range(7)]
    path = save_self_describing(tmp_path / "m.safetensors", "deit_tiny_distilled", seed=2, labels=labels)
    loaded = load_model(None, path, warmup=True)
    reference = make_tiny("deit_tiny_distilled", seed=2)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.model(x), reference(x), atol=1e-6)
    assert loaded.labels == labels and loaded.arch == "deit_tiny_distilled_patch16_224"
    assert loaded.anatomy.num_prefix_tokens == 2


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_torch_state_dict_and_wrapped_checkpoints(tmp_path, wrapper):
    reference = make_tiny("deit_tiny", seed=11)
    state = reference.state_dict()
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    loaded = load_model(ARCH, path, model_kwargs=KWARGS, warmup=False)
    assert loaded.num_classes == 7  # taken from the file, not the architecture's default 1000
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded.model(x), reference(x), atol=1e-6)


def test_labels_file_text_and_json(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("\n".join(f"name {i}" for i in range(5)))
    loaded = load_model(ARCH, "random:0", model_kwargs=KWARGS, num_classes=5, labels=text, warmup=False)
    assert loaded.label(4) == "name 4" and loaded.label(99) == "99"
    js = tmp_path / "labels.json"
    js.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ModelLoadError, match="2 labels given for a model with 5 classes"):
        load_model(ARCH, "random:0", model_kwargs=KWARGS, num_classes=5, labels=js, warmup=False)


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ARCH, tmp_path / "missing.safetensors", warmup=False)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(ARCH, junk, warmup=False)
    with pytest.raises(ModelLoadError, match="unknown timm architecture"):
        load_model("no_such_vit", "random:0", warmup=False)
    with pytest.raises(ModelLoadError, match="does not fit"):
        torch.save(make_tiny("deit_tiny").state_dict(), tmp_path / "other.pth")
        load_model(ARCH, tmp_path / "other.pth", model_kwargs={**KWARGS, "depth": 2}, warmup=False)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(ARCH, "random:0", dtype="fp8", warmup=False)


def test_hub_unreachable_message_names_the_local_file_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(HubUnavailableError) as info:
        load_model(ARCH, "hub", model_kwargs=KWARGS, warmup=False)
    message = str(info.value)
    assert "Hugging Face hub" in message and "--weights /path/to/" in message and "random:0" in message


def test_hub_connection_error_is_translated(monkeypatch):
    import timm

    def refuse(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        raise AssertionError("unexpected")

    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(HubUnavailableError, match="local file"):
        load_model("deit_small_patch16_224", "hub", warmup=False)


def test_reduced_precision_dtypes_load():
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        loaded = load_model(ARCH, "random:0", model_kwargs=KWARGS, dtype=dtype, warmup=dtype == "bf16")
        assert next(loaded.model.parameters()).dtype == torch_dtype


def test_imagenet_models_get_imagenet_labels():
    loaded = load_model("deit_tiny_patch16_224", "random:0", model_kwargs={"depth": 1}, warmup=False)
    assert loaded.num_classes == 1000
    assert "goldfish" in loaded.label(1).lower()
