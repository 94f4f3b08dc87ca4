"""What travels between the HTTP worker processes and the engine process of a shared-engine server.

Messages are length-prefixed pickles over a Unix socket that only the server's own processes can
open (a private directory); they stay small, because image tensors do not travel in them. A worker
writes each model input into its own shared-memory :class:`Arena` and sends the slot's place; the
engine reads the tensor in place, and the worker frees the slot when the engine has answered for
it. CUDA tensors (images decoded on the GPU) travel as CUDA IPC handles instead, through torch's
own reductions, and stay alive in the worker until the answer comes.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import struct
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from app.engine.results import ImageExplanation

_HEADER = struct.Struct("!I")
PAGE_BYTES = 64 * 1024
# Per worker: with Docker's default /dev/shm of 64 MiB, four workers still fit.
ARENA_BYTES = 16 * 1024 * 1024


async def send(writer: asyncio.StreamWriter, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message; ``asyncio.IncompleteReadError`` when the other side has gone."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


@dataclass(frozen=True)
class TensorRef:
    """Where a model input is: a span of a worker's arena, the bytes themselves (when the arena is
    full), or a CUDA IPC handle."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    arena: str | None = None
    offset: int = 0
    inline: bytes | None = None
    cuda_handle: bytes | None = None


def _reserve(name: str, size: int) -> bool:
    """Give the segment its pages now: a full /dev/shm then fails here, not with SIGBUS on a later
    write. Without them the arena stays empty and every input travels in its message."""
    path = os.path.join("/dev/shm", name)
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:
        return True  # not a tmpfs file (another platform): nothing to reserve
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return True


_MADE_HERE: set[str] = set()  # arenas of this process (an engine run in a test's own process)


class Arena:
    """A worker's shared memory for model inputs, allocated in pages, first fit."""

    def __init__(self, size: int = ARENA_BYTES) -> None:
        self.memory = SharedMemory(create=True, size=size)
        self.name = self.memory.name
        _MADE_HERE.add(self.name)
        self._used = bytearray(size // PAGE_BYTES if _reserve(self.name, size) else 0)  # 0 free, 1 used
        self._spans: dict[int, int] = {}  # first page -> pages

    def put(self, tensor: torch.Tensor) -> TensorRef:
        """``tensor`` (contiguous on the CPU or CUDA) as a reference the engine can read."""
        shape, dtype = tuple(tensor.shape), tensor.dtype
        if tensor.is_cuda:
            buffer = io.BytesIO()
            ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(tensor)
            return TensorRef(shape, dtype, cuda_handle=buffer.getvalue())
        source = tensor.contiguous().view(-1).view(torch.uint8)
        pages = -(-source.numel() // PAGE_BYTES) or 1
        first = self._used.find(bytes(pages))
        if first < 0:
            return TensorRef(shape, dtype, inline=source.numpy().tobytes())
        self._used[first : first + pages] = b"\x01" * pages
        self._spans[first] = pages
        offset = first * PAGE_BYTES
        target = np.frombuffer(_buffer(self.memory), dtype=np.uint8, count=source.numel(), offset=offset)
        target[:] = source.numpy()
        return TensorRef(shape, dtype, arena=self.name, offset=offset)

    def free(self, ref: TensorRef) -> None:
        if ref.arena != self.name:
            return
        first = ref.offset // PAGE_BYTES
        pages = self._spans.pop(first, 0)
        self._used[first : first + pages] = bytes(pages)

    @property
    def pages_in_use(self) -> int:
        return sum(self._spans.values())

    def close(self) -> None:
        _close(self.memory)
        self.memory.unlink()


class ArenaReader:
    """The engine's view of the workers' arenas, attached on first use."""

    def __init__(self) -> None:
        self._attached: dict[str, SharedMemory] = {}

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        if ref.cuda_handle is not None:
            tensor: torch.Tensor = pickle.loads(ref.cuda_handle)
            return tensor
        count = int(np.prod(ref.shape)) if ref.shape else 1
        itemsize = ref.dtype.itemsize
        if ref.inline is not None:
            data = torch.frombuffer(bytearray(ref.inline), dtype=torch.uint8)
        else:
            assert ref.arena is not None
            memory = self._attach(ref.arena)
            # a view, not a copy: the batch copies it when it stacks its inputs
            array = np.frombuffer(_buffer(memory), dtype=np.uint8, count=count * itemsize, offset=ref.offset)
            data = torch.from_numpy(array)
        return data.view(ref.dtype).view(ref.shape)

    def _attach(self, name: str) -> SharedMemory:
        memory = self._attached.get(name)
        if memory is None:
            memory = SharedMemory(name=name)
            if name not in _MADE_HERE:
                # The worker that made it unlinks it; this process's resource tracker must not
                # (Python 3.11 registers every attached segment for unlinking at exit).
                resource_tracker.unregister("/" + name, "shared_memory")  # its POSIX name
            self._attached[name] = memory
        return memory

    def forget(self, name: str) -> None:
        memory = self._attached.pop(name, None)
        if memory is not None:
            _close(memory)


_STILL_VIEWED: list[SharedMemory] = []


def _close(memory: SharedMemory) -> None:
    """Unmap ``memory``, or, while a tensor still views it, keep it until :func:`release_unviewed`
    finds it free."""
    release_unviewed()
    try:
        memory.close()
    except BufferError:
        _STILL_VIEWED.append(memory)


def release_unviewed() -> None:
    """Unmap the retired segments that no tensor views any more."""
    for memory in list(_STILL_VIEWED):
        try:
            memory.close()
        except BufferError:
            continue
        _STILL_VIEWED.remove(memory)


def _buffer(memory: SharedMemory) -> memoryview:
    buffer = memory.buf
    if buffer is None:
        raise RuntimeError(f"shared memory {memory.name} is closed")
    return buffer


def explanation_to_wire(result: ImageExplanation) -> tuple[Any, ...]:
    """An engine result as numpy arrays (small: logits, grid-sized maps, class ids)."""

    def array(tensor: torch.Tensor | None) -> np.ndarray | None:
        return None if tensor is None else tensor.detach().cpu().numpy()

    return (array(result.logits), array(result.score_maps), array(result.targets), result.options)


def explanation_from_wire(wire: tuple[Any, ...]) -> ImageExplanation:
    logits, maps, targets, options = wire

    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array)

    result_logits = tensor(logits)
    assert result_logits is not None
    return ImageExplanation(
        logits=result_logits, score_maps=tensor(maps), targets=tensor(targets), options=options
    )
