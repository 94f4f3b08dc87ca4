"""The exact reduced evaluation against the literal reference loop."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import timm
import torch
from timm.layers import RmsNorm, SwiGLUPacked
from torch import nn

from app.engine.anatomy import UnsupportedModelError
from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from app.engine.reduced import ReducedEvaluator
from app.engine.reduced_layout import reduced_layout
from app.engine.reduced_support import reduced_support_reason
from app.engine.reference import reference_masked_logits
from tests.helpers import TINY, TINY_MODELS, make_tiny, perturb_

FP32_TOL = 1e-5
# bf16/fp16 keep 8/11 significant bits; both paths round differently (scaled projections, float32
# softmax here), so each is compared with the float32 result: raw scores within 3% of their range.
LOW_PRECISION_TOL = 0.03


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vit(seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    options = {**TINY, "img_size": 32, "patch_size": 8, **kwargs}
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **options)
    return perturb_(model, seed).eval()


def _gated(seed: int = 0) -> nn.Module:
    """Gated attention with output (scale) norm and MLP norm: every per-token attention extra."""
    model = _vit(seed, scale_attn_norm=True, scale_mlp_norm=True)
    for block in model.blocks:
        block.attn.gate = nn.Linear(TINY["embed_dim"], TINY["embed_dim"])
    return perturb_(model, seed + 1).eval()


# name -> factory; covers the architectures and head types the reduced path supports.
VARIANTS = {
    **{name: (lambda name=name: make_tiny(name, seed=3)) for name in TINY_MODELS},
    "avg_with_class_token": lambda: _vit(1, global_pool="avg"),
    "avg_including_prefix": lambda: _vit(2, global_pool="avg", pool_include_prefix=True, reg_tokens=2),
    "max_registers": lambda: _vit(3, global_pool="max", reg_tokens=1),
    "avgmax_no_prefix": lambda: _vit(4, global_pool="avgmax", class_token=False),
    "gated_scale_norm": lambda: _gated(5),
    "swiglu_rmsnorm": lambda: _vit(6, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, norm_layer=RmsNorm),
    "grid_2x2_all_covered": lambda: _vit(7, img_size=16),
    "grid_1x3": lambda: _vit(8, img_size=(8, 24), reg_tokens=1),
}


def _images(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=g)


def _block_inputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block for ``images``."""
    param = next(model.parameters())
    with torch.inference_mode():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images.to(param.dtype)))))
        inputs = []
        for block in model.blocks:
            inputs.append(x)
            x = block(x)
    return inputs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reduced_equals_reference_for_every_option(name):
    model = VARIANTS[name]()
    assert reduced_support_reason(model) is None
    evaluator = ReducedEvaluator(model)
    inputs = _block_inputs(model, _images(model, batch=2))
    for block in (0, 1, -1):
        for kernel in ("gaussian", "dirac"):
            for keep_prefix in (True, False):
                x = inputs[block]
                with torch.inference_mode():
                    expected = reference_masked_logits(model, block % len(inputs), x, kernel, keep_prefix)
                got = evaluator.masked_logits(block, x, kernel, keep_prefix)
                assert got.shape == expected.shape
                assert _rel_err(got, expected) <= FP32_TOL, (block, kernel, keep_prefix)


@pytest.mark.parametrize("name", ["deit_tiny_distilled", "vit_avgpool_regs", "vit_layerscale_qknorm"])
def test_explain_reduced_equals_reference(name):
    model = make_tiny(name, seed=11)
    reduced = ReciproCAM(model)
    reference = ReciproCAM(model, path="reference")
    assert reduced.path == "reduced"
    images = _images(model, batch=3, seed=4)
    per_image = [
        CamOptions(),
        CamOptions(kernel="dirac", keep_prefix=False, score="probability"),
        CamOptions(target_block=0),
    ]
    fast = reduced.explain(images, per_image, top_k=2)
    slow = reference.explain(images, per_image, top_k=2)
    for a, b in zip(fast, slow, strict=True):
        assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.targets, b.targets)
        assert _rel_err(a.score_maps, b.score_maps) <= FP32_TOL


# Option mixes for one batch of three images: all default, mixed kernels / prefix / predict-only,
# predict-only, and an earlier target block next to the last.
OPTION_MIXES = {
    "default": [CamOptions()] * 3,
    "mixed": [CamOptions(), None, CamOptions(kernel="dirac", keep_prefix=False)],
    "predict_only": [None] * 3,
    "earlier_block": [CamOptions(target_block=0), CamOptions(), None],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_explain_equals_the_forward_and_the_reference_for_every_option_mix(name):
    # On models whose head reads prefix tokens, explain runs the last block on those rows only and
    # shares its per-image state between the option groups of a batch; the prediction must still be
    # the model's own forward, and every map the reference loop's, within float rounding.
    model = VARIANTS[name]()
    cam = ReciproCAM(model)
    reference = ReciproCAM(model, path="reference")
    images = _images(model, batch=3, seed=4)
    with torch.inference_mode():
        expected = model(images).float()
    for mix, options in OPTION_MIXES.items():
        results = cam.explain(images, options, top_k=2)
        got = torch.stack([result.logits for result in results])
        assert _rel_err(got, expected) <= FP32_TOL, mix
        for fast, slow in zip(results, reference.explain(images, options, top_k=2), strict=True):
            assert (fast.score_maps is None) == (slow.score_maps is None), mix
            if slow.score_maps is not None:
                assert torch.equal(fast.targets, slow.targets), mix
                assert _rel_err(fast.score_maps, slow.score_maps) <= FP32_TOL, mix


@pytest.mark.parametrize(
    ("name", "fused"),
    [
        ("deit_tiny", True),
        ("deit_tiny_distilled", True),
        ("vit_registers", True),
        ("gated_scale_norm", True),
        ("vit_avgpool_regs", False),
        ("vit_layerscale_qknorm", False),
    ],
)
def test_last_block_is_not_run_whole_where_the_head_reads_prefix_tokens(name, fused):
    model = VARIANTS[name]()
    cam = ReciproCAM(model)
    assert isinstance(cam.evaluator, ReducedEvaluator) and cam.evaluator.fuses_last_block is fused
    calls: list[int] = []
    handle = model.blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        for options in OPTION_MIXES.values():
            cam.explain(_images(model, batch=3), options, top_k=1)
    finally:
        handle.remove()
    # fused: never called; otherwise once per explain call (the ordinary forward)
    assert len(calls) == (0 if fused else len(OPTION_MIXES))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_prediction_in_low_precision(dtype):
    model = make_tiny("deit_tiny_distilled", seed=8)
    low = make_tiny("deit_tiny_distilled", seed=8).to(dtype)
    images = _images(model, batch=2)
    with torch.inference_mode():
        exact = model(images).float()
        try:
            plain_low = low(images.to(dtype)).float()
        except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
            pytest.skip(f"{dtype} is not supported by this torch build on CPU: {exc}")
    got = torch.stack([result.logits for result in ReciproCAM(low).explain(images, CamOptions(), top_k=1)])
    # No worse than the model's own low-precision forward (plus a small margin).
    assert _rel_err(got, exact) <= 2 * _rel_err(plain_low, exact) + 0.005


def test_masked_sequences_really_differ_from_the_forward():
    # Guards the comparisons above against vacuous agreement (e.g. both returning the prediction).
    model = make_tiny("deit_tiny", seed=2)
    x = _block_inputs(model, _images(model))[-1]
    got = ReducedEvaluator(model).masked_logits(-1, x, "gaussian", True)
    with torch.inference_mode():
        plain = model.forward_head(model.norm(model.blocks[-1](x)))
    assert (got - plain[:, None]).abs().max() > 1e-2
    assert got.std(dim=1).min() > 1e-4


def test_layout_counts_every_token_once():
    for keep_prefix in (True, False):
        layout = reduced_layout(3, 5, "gaussian", keep_prefix, 2, False)
        assert torch.equal(layout.key_count.sum(dim=1), torch.full((15,), 17.0, dtype=torch.float64))
        assert torch.equal(layout.pool_count.sum(dim=1), torch.full((15,), 15.0, dtype=torch.float64))
        padding = layout.scale == 0
        padding[:, -1] = False
        assert (layout.key_count[padding] == 0).all()
    assert torch.isinf(reduced_layout(2, 2, "gaussian", True, 1, False).key_bias()[:, -1]).all()


@pytest.mark.parametrize("name", ["deit_tiny", "vit_avgpool_regs"])
def test_chunk_size_does_not_change_results(name):
    model = make_tiny(name, seed=9)
    evaluator = ReducedEvaluator(model)
    inputs = _block_inputs(model, _images(model, batch=3))
    for block in (1, -1):
        base = evaluator.masked_logits(block, inputs[block], "gaussian", True)
        for chunk in (1, 5, 16, 17, 48, 10_000):
            other = evaluator.masked_logits(block, inputs[block], "gaussian", True, max_sequences=chunk)
            assert _rel_err(other, base) <= 1e-6, chunk
    chunked = ReciproCAM(model, max_sequences=3).explain(_images(model, batch=2), CamOptions())
    whole = ReciproCAM(model).explain(_images(model, batch=2), CamOptions())
    for a, b in zip(chunked, whole, strict=True):
        assert _rel_err(a.score_maps, b.score_maps) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["deit_tiny_distilled", "vit_avgpool_regs", "vit_layerscale_qknorm"])
def test_low_precision_tolerance(name, dtype):
    model = make_tiny(name, seed=8)
    low = make_tiny(name, seed=8).to(dtype)
    images = _images(model, batch=2)
    x32 = _block_inputs(model, images)
    x_low = _block_inputs(low, images)
    for block in (1, -1):
        with torch.inference_mode():
            exact = reference_masked_logits(model, block % 3, x32[block], "gaussian", True)
            try:
                reference_low = reference_masked_logits(low, block % 3, x_low[block], "gaussian", True)
            except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
                pytest.skip(f"{dtype} is not supported by this torch build on CPU: {exc}")
        reduced_low = ReducedEvaluator(low).masked_logits(block, x_low[block], "gaussian", True)
        assert reduced_low.dtype == dtype
        assert _rel_err(reduced_low, exact) <= LOW_PRECISION_TOL
        # No worse than the low-precision reference loop itself (plus a small margin).
        assert _rel_err(reduced_low, exact) <= 2 * _rel_err(reference_low, exact) + 0.005


def test_unsupported_model_falls_back_with_reason(caplog):
    model = _vit(12, global_pool="map")
    reason = reduced_support_reason(model)
    assert reason is not None and "attention-pooling" in reason
    with caplog.at_level(logging.WARNING, logger="app.engine.reciprocam"):
        engine = ReciproCAM(model)
        again = ReciproCAM(model)
    assert engine.path == "reference" and again.path == "reference"
    assert engine.path_reason == reason
    assert sum("falls back" in record.getMessage() for record in caplog.records) == 1
    with pytest.raises(UnsupportedModelError, match="attention-pooling"):
        ReciproCAM(model, path="reduced")
    with pytest.raises(ValueError, match="not exact"):
        ReducedEvaluator(model)
    result = engine.explain(_images(model, batch=1), CamOptions())[0]
    assert result.score_maps.shape == (TINY["num_classes"], 4, 4)


def test_other_unsupported_structures_have_reasons():
    custom = make_tiny("deit_tiny")

    class Custom(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    custom.blocks[1].attn = Custom(custom.blocks[1].attn)
    assert "block 1" in (reduced_support_reason(custom) or "")
    assert reduced_support_reason(make_tiny("deit_tiny")) is None


def test_a_model_in_training_mode_is_refused_not_explained_at_random():
    """Dropout makes every masked pass random: explain refuses the model until it is in eval mode,
    on either path, instead of answering random maps."""
    model = make_tiny("deit_tiny", drop_rate=0.5)
    for path in ("reduced", "reference"):
        engine = ReciproCAM(model, path=path)
        model.train()
        with pytest.raises(ValueError, match="training mode"):
            engine.explain(_images(model, batch=1), CamOptions())
        model.eval()
        model.blocks[0].attn.proj_drop.train()  # one dropout left training is enough to be random
        with pytest.raises(ValueError, match="training mode"):
            engine.explain(_images(model, batch=1), CamOptions())
        model.eval()
        first = engine.explain(_images(model, batch=1), CamOptions())[0]
        second = engine.explain(_images(model, batch=1), CamOptions())[0]
        assert torch.equal(first.score_maps, second.score_maps)


def test_stochastic_depth_keeps_the_reduced_path_in_eval_mode():
    """DropPath is the identity in eval mode, so a model trained with stochastic depth gets the
    reduced path, and its maps equal the reference loop's."""
    model = make_tiny("deit_tiny", drop_path_rate=0.2)
    assert reduced_support_reason(model) is None
    images = _images(model, batch=2)
    reduced = ReciproCAM(model, path="reduced").explain(images, CamOptions())
    reference = ReciproCAM(model, path="reference").explain(images, CamOptions())
    for fast, plain in zip(reduced, reference, strict=True):
        assert torch.allclose(fast.score_maps, plain.score_maps, atol=1e-5)


def test_models_that_would_give_wrong_maps_are_refused_clearly():
    """A classifier on every token (global_pool '') has no per-image score: refused at once. A model
    with dynamic image sizes takes other input sizes, but the map grid follows the configured one:
    such inputs are refused instead of answered on the wrong grid."""
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        ReciproCAM(make_tiny("deit_tiny", global_pool=""))
    model = make_tiny("deit_tiny", dynamic_img_size=True)
    engine = ReciproCAM(model)
    height, width = _images(model, batch=1).shape[-2:]
    same_count = torch.randn(1, 3, height // 2, width * 2)  # as many patches, another grid
    with pytest.raises(ValueError, match="input size"):
        engine.explain(same_count, CamOptions())
    assert engine.explain(_images(model, batch=1), CamOptions())[0].score_maps.shape[-2:] == (
        engine.anatomy.grid_size
    )


def test_forced_reference_path():
    engine = ReciproCAM(make_tiny("deit_tiny"), path="reference")
    assert engine.path == "reference" and "forced" in engine.path_reason
