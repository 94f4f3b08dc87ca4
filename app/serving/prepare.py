"""The decode stage of one posted image: safe decoding, then the model's resize and crop, kept as
uint8 pixels until the batch is normalised on the model's device."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.preprocess import Geometry, Preprocessor
from app.serving.device_decode import DeviceImage, ImageHeader, decode_batch, decode_pixels, read_header
from app.serving.device_preprocess import preprocess_batch, to_model_pixels
from app.serving.images import ImageDecodeError, check_resize, decode

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
    pixels: torch.Tensor  # (3, H, W) uint8 model input before normalisation, on the decoding device
    original: np.ndarray | None  # (H0, W0, 3) uint8 (Pillow path), kept only for an overlay on it
    preprocessor: Preprocessor = field(repr=False)
    # CPU seconds of the decoding thread: {"decode": ..., "preprocess": ...}
    cpu_seconds: dict[str, float] = field(default_factory=dict, repr=False)
    # The tensor path's device (its maps are rendered there too); None: prepared with Pillow.
    device: torch.device | None = None
    # (3, H0, W0) uint8 on ``device``: the tensor path's original, kept for an overlay on it
    original_pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def input_pixels(self) -> np.ndarray:
        """(H, W, 3) uint8 model input on the host (the base of input-size overlays)."""
        array: np.ndarray = self.pixels.permute(1, 2, 0).cpu().numpy()
        return array

    @property
    def tensor(self) -> torch.Tensor:
        """(3, H, W) normalised model input."""
        return self.preprocessor.normalize(self.pixels.permute(1, 2, 0))

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
    tensor_resize: bool = False,
    header: ImageHeader | None = None,
) -> PreparedImage:
    """Decode (safely) and preprocess one posted image. Raises ``ImageDecodeError``.

    ``reduced_jpeg_decode``: a large JPEG may be decoded at a reduced scale that keeps at least
    twice the size it is resized to (never when the original pixels are kept for an overlay).
    ``two_step_resize``: an image decoded at four times the resize target or more is first shrunk
    by an integer factor (box filter) to no less than twice the target, then resized as usual.
    ``window_resize``: resize only the part of the image the crop keeps (see
    ``Preprocessor.to_pixels``'s ``window_only``).
    ``tensor_resize``: decode into a tensor (see :func:`app.serving.device_decode.decode_pixels`)
    and resize and crop with the tensor path's transform (torch's antialiased kernels, see
    :mod:`app.serving.device_preprocess`) instead of Pillow's, in one step (as fast as Pillow's two
    steps for large images); ``two_step_resize`` and ``window_resize`` then do not apply.
    ``header``: the image's header as :func:`read_headers` read it, not read again (tensor resize).
    """
    reduce = reduced_jpeg_decode and not keep_original
    min_size = preprocessor.min_decode_size if reduce else None
    started = time.thread_time()
    if tensor_resize:
        tensor = decode_pixels(
            data, max_pixels=max_pixels, allowed_formats=allowed_formats, min_size=min_size, header=header
        )
        check_resize(preprocessor, tensor.original_size, max_pixels)
        decoded_at = time.thread_time()
        geometry = preprocessor.geometry(tensor.original_size)
        pixels = to_model_pixels(tensor.pixels, geometry, preprocessor)
        original = tensor.pixels.permute(1, 2, 0).contiguous().numpy() if keep_original else None
        cpu_seconds = {"decode": decoded_at - started, "preprocess": time.thread_time() - decoded_at}
        return PreparedImage(geometry, pixels, original, preprocessor, cpu_seconds)
    decoded = decode(data, max_pixels=max_pixels, allowed_formats=allowed_formats, min_size=min_size)
    image = decoded.image
    check_resize(preprocessor, decoded.original_size, max_pixels)
    decoded_at = time.thread_time()
    array, geometry = preprocessor.to_pixels(
        image,
        decoded.original_size,
        reducing_gap=TWO_STEP_REDUCING_GAP if two_step_resize else None,
        window_only=window_resize,
    )
    pixels = torch.from_numpy(array).permute(2, 0, 1)  # a view: the batch stacks it as (H, W, 3)
    original = np.asarray(image) if keep_original else None
    cpu_seconds = {"decode": decoded_at - started, "preprocess": time.thread_time() - decoded_at}
    return PreparedImage(geometry, pixels, original, preprocessor, cpu_seconds)


def read_headers(
    images: list[bytes], max_pixels: int, allowed_formats: frozenset[str]
) -> list[ImageHeader | None]:
    """Each image's header, with its pixel count checked against the per-image limit (raised, with
    the image's index); None for a header that cannot be read or is refused otherwise: its
    decoding reports why, in the images' order."""
    headers: list[ImageHeader | None] = []
    for index, data in enumerate(images):
        try:
            headers.append(read_header(data, max_pixels=max_pixels, allowed_formats=allowed_formats))
        except ImageDecodeError as exc:
            if exc.code != "too_many_pixels":
                headers.append(None)
                continue
            exc.index = index
            raise
    return headers


def prepare_on_device(
    files: list[bytes],
    preprocessor: Preprocessor,
    device: torch.device,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str],
    keep_original: bool,
) -> list[PreparedImage]:
    """The decode stage as tensor code on ``device`` (nvJPEG on CUDA; see docs/image-path.md): every
    image decoded, resized and cropped in batches, the originals kept for overlays on the device. Raises the first image's ``ImageDecodeError``."""
    started = time.thread_time()
    decoded = decode_batch(
        files, device, max_pixels=max_pixels, allowed_formats=allowed_formats, preprocessor=preprocessor
    )
    failure = next((image for image in decoded if isinstance(image, ImageDecodeError)), None)
    if failure is not None:
        raise failure
    images = [image for image in decoded if isinstance(image, DeviceImage)]
    decoded_at = time.thread_time()
    batch = preprocess_batch(images, preprocessor, device)
    # the batch's CPU time, shared evenly among its images
    cpu_seconds = {
        "decode": (decoded_at - started) / len(images),
        "preprocess": (time.thread_time() - decoded_at) / len(images),
    }
    return [
        PreparedImage(
            geometry=geometry,
            pixels=batch.pixels[row],
            original=None,
            preprocessor=preprocessor,
            cpu_seconds=cpu_seconds,
            device=torch.device(device),
            original_pixels=image.pixels if keep_original else None,
        )
        for row, (image, geometry) in enumerate(zip(images, batch.geometries, strict=True))
    ]
