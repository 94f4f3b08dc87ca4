"""Model inputs in a worker's shared-memory arena, read in place by the engine."""

from __future__ import annotations

import pickle

import pytest
import torch

from app.engine.options import CamOptions
from app.engine.results import ImageExplanation
from app.serving import ipc


@pytest.fixture
def arena() -> ipc.Arena:
    made = ipc.Arena(size=8 * ipc.PAGE_BYTES)
    yield made
    made.close()


def test_tensors_come_back_equal_from_the_arena(arena: ipc.Arena) -> None:
    reader = ipc.ArenaReader()
    pixels = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8)
    normalized = torch.randn(3, 32, 32)
    refs = [arena.put(pixels), arena.put(normalized)]
    assert all(ref.arena == arena.name and ref.inline is None for ref in refs)
    # the message holds the place, not the pixels
    assert len(pickle.dumps(refs[0])) < 1000 < pixels.numel()
    assert torch.equal(reader.tensor(refs[0]), pixels)
    assert torch.equal(reader.tensor(refs[1]), normalized)
    reader.forget(arena.name)


def test_a_full_arena_sends_the_bytes_and_freed_pages_are_reused(arena: ipc.Arena) -> None:
    reader = ipc.ArenaReader()
    three_pages = torch.ones(3 * ipc.PAGE_BYTES - 10, dtype=torch.uint8)
    first, second = arena.put(three_pages), arena.put(three_pages)
    assert arena.pages_in_use == 6
    third = arena.put(three_pages)  # 2 pages left: does not fit
    assert third.arena is None and third.inline is not None
    assert torch.equal(reader.tensor(third), three_pages)
    arena.free(first)
    assert arena.pages_in_use == 3
    again = arena.put(three_pages * 2)
    assert again.offset == first.offset
    assert torch.equal(reader.tensor(again), three_pages * 2)
    arena.free(second)
    arena.free(again)
    arena.free(third)  # not in the arena: nothing to free
    assert arena.pages_in_use == 0
    reader.forget(arena.name)


def test_a_non_contiguous_tensor_is_sent_as_its_values(arena: ipc.Arena) -> None:
    image = torch.arange(2 * 5 * 7, dtype=torch.float32).view(2, 5, 7).transpose(1, 2)
    reader = ipc.ArenaReader()
    assert torch.equal(reader.tensor(arena.put(image)), image)
    reader.forget(arena.name)


def test_results_cross_as_arrays_and_come_back_equal() -> None:
    result = ImageExplanation(
        logits=torch.randn(10),
        score_maps=torch.rand(2, 4, 4),
        targets=torch.tensor([3, 1]),
        options=CamOptions(kernel="dirac"),
    )
    back = ipc.explanation_from_wire(pickle.loads(pickle.dumps(ipc.explanation_to_wire(result))))
    assert torch.equal(back.logits, result.logits)
    assert back.score_maps is not None and torch.equal(back.score_maps, result.score_maps)
    assert back.targets is not None and torch.equal(back.targets, result.targets)
    assert back.options == result.options
    prediction_only = ipc.explanation_from_wire(ipc.explanation_to_wire(ImageExplanation(torch.zeros(3))))
    assert prediction_only.score_maps is None and prediction_only.targets is None


def test_a_worker_refuses_early_only_on_a_fresh_full_queue_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from app.config import Settings
    from app.serving import remote
    from app.serving.errors import QueueFullError

    settings = Settings(models=[], batch={"max_queue_images": 10, "retry_after_s": 3})
    models = remote.RemoteModels(settings, "/nonexistent.sock")
    queue = remote.RemoteQueue(models.link, "m")
    queue.check_room(50)  # nothing heard from the engine yet: it decides
    models.link.queued["m"] = (8, time.monotonic())
    queue.check_room(2)
    with pytest.raises(QueueFullError) as refused:
        queue.check_room(3)
    assert refused.value.retry_after_s == 3
    models.link.queued["m"] = (8, time.monotonic() - remote.QUEUE_FIGURE_S - 1)
    queue.check_room(3)  # an old figure: the engine checks again itself
    models.link.arena.close()
