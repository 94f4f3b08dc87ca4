"""Host <-> device traffic that does not stall the device's queue."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device.

    A blocking copy to a CUDA device waits for all work queued before it, which would stall the
    queue in mid-batch; from pinned memory the copy is queued like a kernel instead.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def wait_asleep(device: torch.device) -> None:
    """Wait until a CUDA ``device`` has done the work queued so far, with the thread asleep rather
    than spinning (cudaEventBlockingSync); nothing to wait for on other devices."""
    if device.type != "cuda":
        return
    done = torch.cuda.Event(blocking=True)
    done.record(torch.cuda.current_stream(device))
    done.synchronize()
