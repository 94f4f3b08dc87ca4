"""Baseline saliency methods on tiny seeded ViTs, checked against direct computations."""

from __future__ import annotations

import pytest
import torch

from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from app.eval import baselines
from tests.helpers import make_tiny


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("deit_tiny", seed=3).requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_capture_attention_is_exact_and_restores_the_model(tiny, inputs):
    expected = tiny(inputs)
    with baselines.capture_attention(tiny) as attentions:
        captured_logits = tiny(inputs)
    assert torch.allclose(captured_logits, expected, atol=1e-5)
    assert len(attentions) == len(tiny.blocks)
    tokens = 1 + 16
    for attention in attentions:
        assert attention.shape == (2, tiny.blocks[0].attn.num_heads, tokens, tokens)
        assert torch.allclose(attention.sum(-1), torch.ones(2, attention.shape[1], tokens), atol=1e-5)
    assert all("forward" not in block.attn.__dict__ for block in tiny.blocks)
    # the captured probabilities are softmax(q k^T / sqrt(d)) of the first block's normed input
    block = tiny.blocks[0]
    x = tiny.norm_pre(tiny.patch_drop(tiny._pos_embed(tiny.patch_embed(inputs))))
    z = block.norm1(x)
    q, k, _ = block.attn.qkv(z).reshape(2, tokens, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    direct = ((q @ k.transpose(-2, -1)) * block.attn.head_dim**-0.5).softmax(-1)
    assert torch.allclose(attentions[0], direct, atol=1e-5)


def test_capture_attention_restores_after_an_error(tiny):
    with pytest.raises(RuntimeError), baselines.capture_attention(tiny):
        raise RuntimeError("boom")
    assert all("forward" not in block.attn.__dict__ for block in tiny.blocks)


def test_rollout_matches_the_product_of_residual_attention(tiny, inputs):
    with baselines.capture_attention(tiny) as attentions:
        tiny(inputs)
    eye = torch.eye(17, dtype=torch.float64)
    product = eye.expand(2, 17, 17)
    for attention in attentions:
        step = 0.5 * attention.double().mean(1) + 0.5 * eye  # rows of mean + I sum to 2
        product = step @ product
    expected = product[:, 0, 1:].reshape(2, 4, 4).float()
    maps = baselines.attention_rollout(tiny, inputs, torch.tensor([0, 1]))
    assert torch.allclose(maps, expected, atol=1e-6)
    # class-independent
    assert torch.equal(maps, baselines.attention_rollout(tiny, inputs, torch.tensor([5, 6])))


def test_gradient_rollout_follows_the_generic_rule(tiny, inputs):
    class_ids = torch.tensor([2, 4])
    maps = baselines.gradient_rollout(tiny, inputs, class_ids)
    assert maps.shape == (2, 4, 4) and maps.min() >= 0
    # one image at a time, with autograd.grad instead of retained gradients
    for index in range(2):
        with torch.enable_grad(), baselines.capture_attention(tiny) as attentions:
            source = inputs[index : index + 1].clone().requires_grad_(True)
            score = tiny(source)[0, int(class_ids[index])]
            grads = torch.autograd.grad(score, attentions)
        relevance = torch.eye(17, dtype=torch.float64)
        for attention, grad in zip(attentions, grads, strict=True):
            relevance = relevance + (grad * attention).clamp(min=0).mean(1)[0].double() @ relevance
        assert torch.allclose(maps[index], relevance[0, 1:].reshape(4, 4).float(), atol=1e-5)
    assert not torch.allclose(maps, baselines.gradient_rollout(tiny, inputs, torch.tensor([5, 6])))


def test_gradcam_weights_tokens_by_mean_gradients(tiny, inputs):
    class_ids = torch.tensor([1, 3])
    maps = baselines.grad_cam(tiny, inputs, class_ids)
    assert maps.shape == (2, 4, 4) and maps.min() >= 0
    block = tiny.blocks[-1]
    for index in range(2):
        with torch.enable_grad():
            x = tiny.norm_pre(tiny.patch_drop(tiny._pos_embed(tiny.patch_embed(inputs[index : index + 1]))))
            for earlier in tiny.blocks[:-1]:
                x = earlier(x)
            z = block.norm1(x).detach().requires_grad_(True)
            y = x + block.ls1(block.attn(z))
            y = y + block.ls2(block.mlp(block.norm2(y)))
            score = tiny.forward_head(tiny.norm(y))[0, int(class_ids[index])]
            (grad,) = torch.autograd.grad(score, z)
        weights = grad[0, 1:].mean(0)
        expected = torch.relu((z[0, 1:].detach() * weights).sum(-1)).reshape(4, 4)
        assert torch.allclose(maps[index], expected, atol=1e-5)
    assert all(not block.norm1._forward_hooks for block in tiny.blocks)


def test_reciprocam_variants_go_through_the_engine(tiny, inputs):
    engine = ReciproCAM(tiny)
    class_ids = torch.tensor([0, 5])
    for name, options in baselines.RECIPROCAM_VARIANTS.items():
        maps = baselines.make_method(name, tiny, engine)(inputs, class_ids)
        results = engine.explain(inputs, options, targets=[[0], [5]])
        expected = torch.stack([r.score_maps[0] for r in results])
        assert torch.allclose(maps, expected)
    default = baselines.make_method("reciprocam", tiny, engine)(inputs, class_ids)
    dirac = baselines.make_method("reciprocam-dirac", tiny, engine)(inputs, class_ids)
    assert not torch.allclose(default, dirac)
    assert baselines.RECIPROCAM_VARIANTS["reciprocam"] == CamOptions()


def test_every_method_returns_grid_maps(tiny, inputs):
    for name in baselines.METHODS:
        maps = baselines.make_method(name, tiny)(inputs, torch.tensor([0, 1]))
        assert maps.shape == (2, 4, 4), name
        assert torch.isfinite(maps).all(), name
    with pytest.raises(ValueError):
        baselines.make_method("nope", tiny)
