"""The export graph (app/export/graph.py) against the engine's ReciproCAM.explain and the naive
per-mask loop, in torch: every supported head and option, explicit targets, and clear refusals."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import nn

from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from app.engine.reduced_support import reduced_support_reason
from app.export.graph import ExplainedViT, ExportError
from tests.helpers import TINY, TINY_MODELS, make_tiny, naive_reciprocam, perturb_

TOL = 1e-5  # float32, both reduced: max |difference| over max |reference|


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vit(seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, **{**TINY, "img_size": 32, "patch_size": 8, **kwargs}
    )
    return perturb_(model, seed).eval()


def _gated(seed: int) -> nn.Module:
    model = _vit(seed, scale_attn_norm=True, scale_mlp_norm=True)
    for block in model.blocks:
        block.attn.gate = nn.Linear(TINY["embed_dim"], TINY["embed_dim"])
    return perturb_(model, seed + 1).eval()


FACTORIES = {
    **{name: (lambda name=name: make_tiny(name, seed=4)) for name in TINY_MODELS},
    "max_registers": lambda: _vit(1, global_pool="max", reg_tokens=1),
    "avgmax_no_prefix": lambda: _vit(2, global_pool="avgmax", class_token=False),
    "avg_including_prefix": lambda: _vit(3, global_pool="avg", pool_include_prefix=True, reg_tokens=2),
    "gated_scale_norm": lambda: _gated(5),
}
OPTIONS = [
    CamOptions(),
    CamOptions(kernel="dirac", keep_prefix=False, score="probability"),
    CamOptions(keep_prefix=False, target_block=1),
    CamOptions(kernel="dirac", target_block=0, score="probability"),
]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _images(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    height, width = model.patch_embed.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_graph_equals_the_engine(name: str) -> None:
    model = FACTORIES[name]()
    engine = ReciproCAM(model)
    images = _images(model, 3)
    for options in OPTIONS:
        graph = ExplainedViT(model, options, top_k=3).eval()
        with torch.no_grad():
            logits, targets, maps = graph(images)
        results = engine.explain(images, options, top_k=3)
        expected_maps = torch.stack([r.score_maps for r in results])  # type: ignore[misc]
        assert torch.equal(targets, torch.stack([r.targets for r in results]))  # type: ignore[misc]
        assert _rel(logits, torch.stack([r.logits for r in results])) <= TOL
        assert maps.shape == expected_maps.shape == (3, 3, *model.patch_embed.grid_size)
        assert _rel(maps, expected_maps) <= TOL, (name, options)


def test_graph_equals_the_naive_loop() -> None:
    """Independent of the engine: the spec written out with loops, for one image."""
    model = make_tiny("deit_tiny_distilled", seed=7)
    image = _images(model, 1, seed=3)
    for options in (CamOptions(), CamOptions(kernel="dirac", keep_prefix=False, target_block=1)):
        graph = ExplainedViT(model, options, top_k=7).eval()
        with torch.no_grad():
            _, targets, maps = graph(image)
        naive = naive_reciprocam(
            model,
            image[0],
            kernel=options.kernel,
            keep_prefix=options.keep_prefix,
            block_index=options.target_block,
        )
        assert _rel(maps[0].double(), naive[targets[0]]) <= TOL


def test_explicit_targets_and_out_of_range_ids() -> None:
    model = make_tiny("vit_registers", seed=2)
    images = _images(model, 2)
    graph = ExplainedViT(model, CamOptions(), top_k=1).eval()
    wanted = torch.tensor([[4, 0, 6], [1, 7, -1]])
    with torch.no_grad():
        _, targets, maps = graph(images, wanted)
    assert torch.equal(targets, wanted)
    results = ReciproCAM(model).explain(images, CamOptions(), targets=[[4, 0, 6], [1]])
    assert _rel(maps[0], results[0].score_maps) <= TOL  # type: ignore[arg-type]
    assert _rel(maps[1, :1], results[1].score_maps) <= TOL  # type: ignore[arg-type]
    # ids outside [0, C) give NaN maps, not another class's map
    assert torch.isnan(maps[1, 1:]).all() and not torch.isnan(maps[:, :1]).any()


def test_batch_rows_are_independent() -> None:
    """The graph has no cross-image terms: an image's outputs do not depend on its batch."""
    model = make_tiny("deit_tiny", seed=1)
    images = _images(model, 5)
    graph = ExplainedViT(model, CamOptions(), top_k=2).eval()
    with torch.no_grad():
        whole = graph(images)
        single = graph(images[3:4])
    for batch_part, alone in zip(whole, single, strict=True):
        assert torch.allclose(batch_part[3:4].double(), alone.double(), rtol=1e-5, atol=1e-6)


def test_unsupported_models_fail_with_the_services_reason() -> None:
    model = _vit(9, global_pool="map")
    reason = reduced_support_reason(model)
    assert reason is not None
    with pytest.raises(ExportError) as caught:
        ExplainedViT(model)
    assert reason in str(caught.value) and "reduced evaluation is not possible" in str(caught.value)


def test_bad_options_are_refused() -> None:
    model = make_tiny("deit_tiny")
    with pytest.raises(ExportError, match="target_block 3 is outside"):
        ExplainedViT(model, CamOptions(target_block=3))
    with pytest.raises(ExportError, match="top_k must be in"):
        ExplainedViT(model, top_k=8)
    with pytest.raises(ExportError, match="training mode"):
        ExplainedViT(model.train())


@pytest.mark.parametrize("name", ["deit_tiny", "deit_tiny_distilled", "avgmax_no_prefix"])
def test_target_rows_of_the_head_equal_the_full_head(name: str) -> None:
    """Logit maps read the head's rows of the target classes only; the full head gives the same maps."""
    model = FACTORIES[name]()
    images = _images(model, 2, seed=5)
    for options in (CamOptions(), CamOptions(keep_prefix=False, target_block=1)):
        graph = ExplainedViT(model, options, top_k=3).eval()
        assert graph.target_head
        wanted = torch.tensor([[2, 0, 9], [5, 5, 1]])
        with torch.no_grad():
            fast = graph(images), graph(images, wanted)
            graph.target_head = False
            full = graph(images), graph(images, wanted)
        for fast_out, full_out in zip(fast, full, strict=True):
            assert torch.equal(fast_out[1], full_out[1])
            assert _rel(fast_out[2].nan_to_num(), full_out[2].nan_to_num()) <= TOL
        assert torch.isnan(fast[1][2][0, 2]).all()
