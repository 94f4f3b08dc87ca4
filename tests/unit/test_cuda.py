"""The engine on a CUDA device: the same exactness checks as on the CPU (skipped without CUDA).

CI has no GPU; these run where one is present (``benchmarks/gpu_check.sh`` runs them first). They
hold the device path to the CPU's contracts: the reduced maps equal the reference loop's, the
prediction equals ``model(images)``, low precision stays within the documented tolerance, and uint8
batches normalised on the device give the CPU's inputs.
"""

from __future__ import annotations

import os
import warnings

import pytest
import timm
import torch

from app.engine.options import CamOptions
from app.engine.preprocess import DataConfig, Preprocessor
from app.engine.reciprocam import ReciproCAM
from app.serving.batch import BatchItem, batch_inputs
from tests.helpers import TINY_MODELS, make_tiny

# RECIPROCAM_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves).
DEVICE = os.environ.get("RECIPROCAM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 0.03
MIXES = {
    "default": [CamOptions()] * 4,
    "mixed": [CamOptions(), None, CamOptions(kernel="dirac", keep_prefix=False), CamOptions(target_block=0)],
}


@pytest.fixture(autouse=True)
def _exact_matmul():
    """TF32 would round float32 products to 10 bits; the fp32 contracts are about float32."""
    if DEVICE != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def _model(name: str) -> torch.nn.Module:
    if name in TINY_MODELS:
        return make_tiny(name, seed=5)
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("name", [*TINY_MODELS, "deit_small_224"])
def test_reduced_equals_reference_and_forward_on_cuda(name):
    model = _model(name).to(DEVICE)
    h, w = model.patch_embed.img_size
    images = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reduced, reference = ReciproCAM(model), ReciproCAM(model, path="reference")
    assert reduced.path == "reduced"
    with torch.inference_mode():
        expected = model(images).float()
    for mix, options in MIXES.items():
        fast = reduced.explain(images, options, top_k=2)
        slow = reference.explain(images, options, top_k=2)
        logits = torch.stack([result.logits for result in fast])
        assert _rel_err(logits, expected) <= FP32_TOL, mix
        for a, b in zip(fast, slow, strict=True):
            assert (a.score_maps is None) == (b.score_maps is None)
            if b.score_maps is not None:
                assert torch.equal(a.targets, b.targets), mix
                assert _rel_err(a.score_maps, b.score_maps) <= FP32_TOL, mix


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cuda_stays_within_tolerance(dtype):
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().to(DEVICE)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    exact = ReciproCAM(model).explain(images, CamOptions(), top_k=3)
    low_model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().to(DEVICE)
    low_model.load_state_dict(model.state_dict())
    low = ReciproCAM(low_model.to(dtype)).explain(images.to(dtype), CamOptions(), top_k=3)
    for a, b in zip(low, exact, strict=True):
        assert a.score_maps is not None and b.score_maps is not None
        if torch.equal(a.targets, b.targets):  # same classes explained: compare their maps
            assert _rel_err(a.score_maps, b.score_maps) <= LOW_PRECISION_TOL
        assert _rel_err(a.logits, b.logits) <= LOW_PRECISION_TOL


def test_uint8_batches_are_normalised_on_the_device_exactly():
    preprocessor = Preprocessor(DataConfig(input_size=(32, 48), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    generator = torch.Generator().manual_seed(3)
    pixels = [torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=generator) for _ in range(5)]
    items = [BatchItem(image=p.permute(2, 0, 1), options=None, targets=None, top_k=1) for p in pixels]
    on_device = batch_inputs(items, preprocessor.normalize, DEVICE)
    assert on_device.device.type == torch.device(DEVICE).type
    on_cpu = torch.stack([preprocessor.normalize(p) for p in pixels])
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=1e-6)


def test_explain_waits_for_the_device_only_to_return_its_results():
    # A copy to the host waits for every queued kernel; so does a blocking copy to the device. One
    # batch, mixed options, explicit targets and top-k: the host waits for the device at most twice
    # (the packed logits and maps, and the top-k class ids), however many images the batch holds.
    if torch.device(DEVICE).type != "cuda":
        pytest.skip("synchronisation is checked by CUDA's sync debug mode")
    model = make_tiny("deit_tiny_distilled", seed=7).to(DEVICE)
    h, w = model.patch_embed.img_size
    images = torch.randn(6, 3, h, w, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    options = [
        CamOptions(),
        None,
        CamOptions(kernel="dirac", keep_prefix=False, score="probability"),
        CamOptions(target_block=0),
        CamOptions(),
        CamOptions(score="probability"),
    ]
    targets = [None, None, [1, 2], None, [0], None]
    cam = ReciproCAM(model)
    expected = cam.explain(images, options, targets=targets, top_k=2)  # warm-up: per-engine caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            results = cam.explain(images, options, targets=targets, top_k=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if str(w.message).startswith("called a synchronizing")]
    assert len(syncs) <= 2, syncs
    for a, b in zip(results, expected, strict=True):
        assert torch.equal(a.logits, b.logits)
        assert (a.score_maps is None) == (b.score_maps is None)


def test_blocking_and_spinning_waits_give_the_same_results():
    model = make_tiny("deit_tiny", seed=2).to(DEVICE)
    h, w = model.patch_embed.img_size
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    block = ReciproCAM(model, host_wait="block").explain(images, CamOptions(), top_k=2)
    spin = ReciproCAM(model, host_wait="spin").explain(images, CamOptions(), top_k=2)
    for a, b in zip(block, spin, strict=True):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.score_maps, b.score_maps)
