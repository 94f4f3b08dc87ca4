"""The decode stage of one posted image: safe decoding, then the model's resize and crop, kept as
uint8 pixels until the batch is normalised on the model's device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.preprocess import Geometry, Preprocessor
from app.serving.images import ImageDecodeError, check_pixel_count, decode, upright_size

# Two-step resizing keeps at least twice the resize target before the model's filter, as the
# reduced JPEG decode does.
TWO_STEP_REDUCING_GAP = 2.0


@dataclass
class PreparedImage:
    """A decoded image ready for the model, with what rendering needs later.

    The model input stays uint8 (``pixels``) until the batch is computed: the compute thread
    normalises a whole batch at once, on the model's device (see
    :func:`app.serving.batcher.run_engine_batch`). ``tensor`` normalises this one image the same way.
    """

    geometry: Geometry
    input_pixels: np.ndarray  # (H, W, 3) uint8: the model input before normalisation
    original: np.ndarray | None  # (H0, W0, 3) uint8, kept only when an overlay on it is wanted
    preprocessor: Preprocessor = field(repr=False)
    # CPU seconds of the decoding thread: {"decode": ..., "preprocess": ...}
    cpu_seconds: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def pixels(self) -> torch.Tensor:
        """(3, H, W) uint8 model input: a view of ``input_pixels``."""
        return torch.from_numpy(self.input_pixels).permute(2, 0, 1)

    @property
    def tensor(self) -> torch.Tensor:
        """(3, H, W) normalised model input."""
        return self.preprocessor.normalize(self.input_pixels)

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) of the posted image, after EXIF orientation."""
        return self.geometry.original_size


def prepare_image(
    data: bytes,
    preprocessor: Preprocessor,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str],
    keep_original: bool,
    reduced_jpeg_decode: bool = False,
    two_step_resize: bool = False,
    window_resize: bool = False,
) -> PreparedImage:
    """Decode (safely) and preprocess one posted image. Raises ``ImageDecodeError``.

    ``reduced_jpeg_decode``: a large JPEG may be decoded at a reduced scale that keeps at least
    twice the size it is resized to (never when the original pixels are kept for an overlay).
    ``two_step_resize``: an image decoded at four times the resize target or more is first shrunk
    by an integer factor (box filter) to no less than twice the target, then resized as usual.
    ``window_resize``: resize only the part of the image the crop keeps (see
    ``Preprocessor.to_pixels``'s ``window_only``).
    """
    reduce = reduced_jpeg_decode and not keep_original
    started = time.thread_time()
    decoded = decode(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        min_size=preprocessor.min_decode_size if reduce else None,
    )
    image = decoded.image
    _check_resize(preprocessor, decoded.original_size, max_pixels)
    decoded_at = time.thread_time()
    pixels, geometry = preprocessor.to_pixels(
        image,
        decoded.original_size,
        reducing_gap=TWO_STEP_REDUCING_GAP if two_step_resize else None,
        window_only=window_resize,
    )
    original = np.asarray(image) if keep_original else None
    cpu_seconds = {"decode": decoded_at - started, "preprocess": time.thread_time() - decoded_at}
    return PreparedImage(
        geometry=geometry,
        input_pixels=pixels,
        original=original,
        preprocessor=preprocessor,
        cpu_seconds=cpu_seconds,
    )


def _check_resize(preprocessor: Preprocessor, original_size: tuple[int, int], max_pixels: int) -> None:
    """413 ``too_many_pixels`` for an image so elongated that the model's resize (shorter side to the
    resize target) would make more than ``max_pixels`` pixels: a 1x100000 strip resized for a
    224-pixel model would be 256 x 25.6 million."""
    width, height = preprocessor.geometry(original_size).resized_size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is {original_size[0]}x{original_size[1]}: resized for the model it would be "
            f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "crop it to a less elongated shape",
            code="too_many_pixels",
        )


def upright_sizes(
    images: list[bytes], max_pixels: int, allowed_formats: frozenset[str]
) -> list[tuple[int, int]]:
    """Each image's upright (width, height) from its header, checked against the per-image pixel
    limit; an unreadable header counts as (0, 0), its decoding reports why."""
    sizes = []
    for index, data in enumerate(images):
        size = upright_size(data, allowed_formats) or (0, 0)
        try:
            check_pixel_count(size, max_pixels)
        except ImageDecodeError as exc:
            exc.index = index
            raise
        sizes.append(size)
    return sizes
