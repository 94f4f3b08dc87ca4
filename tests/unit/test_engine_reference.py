"""The engine against an independent, naive per-mask loop written from the spec."""

import functools

import pytest
import torch

from app.engine.maps import normalize_maps, to_uint8, upsample_maps
from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from tests.helpers import TINY_MODELS, make_tiny, naive_reciprocam


def _images(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=g)


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_reference_matches_naive_loop_default_options(name):
    model = make_tiny(name, seed=3)
    engine = ReciproCAM(model, path="reference")
    images = _images(model)
    results = engine.explain(images, CamOptions())
    logits = model(images)
    for i, result in enumerate(results):
        naive = naive_reciprocam(model, images[i])
        assert result.score_maps.shape == naive.shape
        assert _rel_err(result.score_maps, naive) < 1e-5
        assert torch.allclose(result.logits, logits[i], atol=1e-5)
        assert torch.equal(result.targets, torch.arange(model.num_classes))


@pytest.mark.parametrize("kernel", ["gaussian", "dirac"])
@pytest.mark.parametrize("keep_prefix", [True, False])
@pytest.mark.parametrize("score", ["logit", "probability"])
@pytest.mark.parametrize("block", [-1, 1, 0])
def test_every_option_matches_naive_loop(kernel, keep_prefix, score, block):
    model = make_tiny("deit_tiny_distilled", seed=5)
    engine = ReciproCAM(model, path="reference", max_sequences=7)  # chunking across images
    images = _images(model, batch=2)
    options = CamOptions(kernel=kernel, keep_prefix=keep_prefix, score=score, target_block=block)
    results = engine.explain(images, options)
    for i, result in enumerate(results):
        naive = naive_reciprocam(
            model, images[i], kernel=kernel, keep_prefix=keep_prefix, block_index=block, score=score
        )
        assert _rel_err(result.score_maps, naive) < 1e-5


def test_options_actually_change_the_maps():
    model = make_tiny("deit_tiny", seed=2)
    engine = ReciproCAM(model, path="reference")
    images = _images(model, batch=1)
    base = engine.explain(images, CamOptions())[0].score_maps
    for options in (
        CamOptions(kernel="dirac"),
        CamOptions(keep_prefix=False),
        CamOptions(target_block=0),
        CamOptions(score="probability"),
    ):
        other = engine.explain(images, options)[0].score_maps
        assert not torch.allclose(base, other), options


def test_batch_invariance_and_mixed_options_in_one_batch():
    model = make_tiny("vit_registers", seed=4)
    engine = ReciproCAM(model, path="reference")
    images = _images(model, batch=4, seed=9)
    per_image = [
        CamOptions(),
        None,
        CamOptions(kernel="dirac", keep_prefix=False),
        CamOptions(target_block=1),
    ]
    batched = engine.explain(images, per_image, top_k=3)
    for i in range(4):
        alone = engine.explain(images[i : i + 1], per_image[i], top_k=3)[0]
        assert torch.allclose(batched[i].logits, alone.logits, rtol=1e-5, atol=1e-6)
        if per_image[i] is None:
            assert batched[i].score_maps is None
        else:
            assert torch.equal(batched[i].targets, alone.targets)
            assert _rel_err(batched[i].score_maps, alone.score_maps) < 1e-5


def test_targets_topk_and_explicit():
    model = make_tiny("deit_tiny", seed=6)
    engine = ReciproCAM(model, path="reference")
    images = _images(model, batch=2)
    full = engine.explain(images, CamOptions())
    topk = engine.explain(images, CamOptions(), top_k=2)
    explicit = engine.explain(images, CamOptions(), targets=[[4, 0], [6]])
    for i in range(2):
        order = full[i].logits.topk(2).indices
        assert torch.equal(topk[i].targets, order)
        assert torch.allclose(topk[i].score_maps, full[i].score_maps[order])
    assert torch.equal(explicit[0].targets, torch.tensor([4, 0]))
    assert torch.allclose(explicit[0].score_maps, full[0].score_maps[[4, 0]])
    assert explicit[1].score_maps.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="target ids"):
        engine.explain(images, CamOptions(), targets=[[7], [0]])


# One option group (same kernel, prefix and block) whose members ask for explicit classes or the
# top k, with logit or probability scores, after a prediction-only image (so that a member's
# position in its group differs from its image's index); and a group of top-k members only that
# leaves an image out.
GROUP_MIXES = {
    "targets_and_top_k": (
        [None, CamOptions(), CamOptions(score="probability"), CamOptions(score="probability"), CamOptions()],
        [None, [4, 0], None, [6], None],
    ),
    "top_k_subset": ([None, CamOptions(), CamOptions(score="probability")], None),
}


@pytest.mark.parametrize("mix", list(GROUP_MIXES))
@pytest.mark.parametrize("path", ["reference", "reduced"])
def test_targets_top_k_and_scores_mixed_in_one_option_group(path, mix):
    # Each image gets what it would get alone, and what the naive loop gives for its classes.
    model = make_tiny("deit_tiny", seed=6)
    engine = ReciproCAM(model, path=path)
    per_image, targets = GROUP_MIXES[mix]
    images = _images(model, batch=len(per_image), seed=4)
    batched = engine.explain(images, per_image, targets=targets, top_k=2)
    # neighbouring images rank their top two classes differently: a map taken for the wrong image
    # would show
    tops = [result.logits.topk(2).indices.tolist() for result in batched]
    assert all(tops[i] != tops[i + 1] for i in range(len(tops) - 1)), tops
    for i, options in enumerate(per_image):
        wanted = None if targets is None or targets[i] is None else [targets[i]]
        alone = engine.explain(images[i : i + 1], options, targets=wanted, top_k=2)[0]
        assert torch.allclose(batched[i].logits, alone.logits, rtol=1e-5, atol=1e-6)
        if options is None:
            assert batched[i].score_maps is None and batched[i].targets is None
            continue
        assert torch.equal(batched[i].targets, alone.targets)
        assert _rel_err(batched[i].score_maps, alone.score_maps) < 1e-5
        naive = naive_reciprocam(model, images[i], score=options.score)
        assert _rel_err(batched[i].score_maps, naive[batched[i].targets]) < 1e-5
        if wanted is None:
            assert torch.equal(batched[i].targets, batched[i].logits.topk(2).indices)
        else:
            assert batched[i].targets.tolist() == wanted[0]


def _count_ops(fn):
    """How many tensor operations (ATen calls) ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


@pytest.mark.parametrize(
    "per_image",
    [
        lambda b: CamOptions(),
        lambda b: [CamOptions(), None, CamOptions(kernel="dirac", keep_prefix=False)] * b,
    ],
)
@pytest.mark.parametrize("top_k", [2, None])
def test_tensor_operations_do_not_grow_with_the_batch(per_image, top_k):
    # No per-image tensor work after the batch is computed: on a GPU each per-image copy to the host
    # would wait for the device. So a batch of 3 and a batch of 9 dispatch the same operations.
    model = make_tiny("deit_tiny_distilled", seed=7)
    engine = ReciproCAM(model, max_sequences=10_000)  # one chunk whatever the batch
    counts = []
    for copies in (1, 3):
        images = _images(model, batch=3 * copies, seed=2)
        call = functools.partial(engine.explain, images, per_image(copies), top_k=top_k)
        call()  # first call: per-engine caches (mask layouts on the device)
        counts.append(_count_ops(call))
    assert counts[0] == counts[1], counts


def test_bf16_close_to_fp32():
    model = make_tiny("deit_tiny", seed=8)
    images = _images(model, batch=2)
    fp32 = ReciproCAM(model, path="reference").explain(images, CamOptions(), top_k=2)
    low = make_tiny("deit_tiny", seed=8).to(torch.bfloat16)
    bf16 = ReciproCAM(low, path="reference").explain(images, CamOptions(), targets=[r.targets for r in fp32])
    for a, b in zip(fp32, bf16, strict=True):
        assert b.score_maps.dtype == torch.float32
        # bf16 keeps ~3 significant digits: raw scores agree to a few per mille of their magnitude.
        assert _rel_err(b.score_maps, a.score_maps) < 0.03
        # Random weights give maps whose spatial range is ~1-5% of the score, so only the pattern is
        # compared: each bf16 map must still correlate with its fp32 map.
        for ma, mb in zip(a.score_maps.flatten(1), b.score_maps.flatten(1), strict=True):
            assert torch.corrcoef(torch.stack([ma, mb]))[0, 1] > 0.6


def test_normalise_uint8_and_upsample():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    norm = normalize_maps(maps)
    assert norm.min() == 0 and norm.max() == pytest.approx(1.0)
    assert to_uint8(norm).tolist() == [[[0, 63], [127, 255]]]  # float32: max / (max + 1e-12) == 1
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 127, 255]
    flat = normalize_maps(torch.full((1, 3, 3), 2.0))
    assert (flat == 0).all()
    up = upsample_maps(norm, (8, 8))
    assert up.shape == (1, 8, 8)
    assert up[0, 0, 0] == pytest.approx(0.0) and up[0, -1, -1] == pytest.approx(1.0)


def test_invalid_block_and_options():
    model = make_tiny("deit_tiny")
    engine = ReciproCAM(model, path="reference")
    with pytest.raises(ValueError, match="target_block"):
        engine.explain(_images(model, 1), CamOptions(target_block=3))
    with pytest.raises(ValueError, match="kernel"):
        CamOptions(kernel="box")
    with pytest.raises(ValueError, match="score"):
        CamOptions(score="rank")
    with pytest.raises(ValueError, match="host_wait"):
        ReciproCAM(model, host_wait="yield")


def test_a_group_mixing_targets_and_top_k_costs_the_same_operations_at_any_size():
    # Explicit targets next to top-k members: picked with a fixed number of operations per group.
    from app.engine.results import MapRequest, collect

    counts = []
    for size in (3, 9):
        generator = torch.Generator().manual_seed(size)
        logits = torch.randn(size, 7, generator=generator)
        result = torch.randn(size, 16, 7, generator=generator)
        members = [
            MapRequest(i, CamOptions(), torch.tensor([i % 7, 3]) if i % 3 == 0 else None, 1)
            for i in range(size)
        ]
        collected = collect(logits, [(members, result)], (4, 4), 2)
        for member, explanation in zip(members, collected, strict=True):
            classes = member.targets if member.targets is not None else logits[member.index].topk(2).indices
            assert torch.equal(explanation.targets, classes)
            assert torch.equal(explanation.score_maps, result[member.index][:, classes].T.reshape(-1, 4, 4))
        counts.append(_count_ops(functools.partial(collect, logits, [(members, result)], (4, 4), 2)))
    assert counts[0] == counts[1], counts
