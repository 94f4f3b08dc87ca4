"""Decoding posted images into uint8 (3, H, W) tensors on the model's device.

JPEGs are decoded with ``torchvision.io.decode_jpeg`` (nvJPEG on a CUDA device, libjpeg-turbo on the
CPU, the whole batch in one call) and PNGs with ``torchvision.io.decode_png`` (CPU, then moved);
everything else, and the colour modes torchvision would read differently (palette, 1-bit, 16-bit
PNGs), goes through the Pillow decoder of :mod:`app.serving.images`, so every accepted image
decodes. The guards are the Pillow path's: the header is read with the same restricted parsers and
the pixel limit is checked before any pixel is decoded; a failing image gets the Pillow path's
:class:`ImageDecodeError` code (an image torchvision cannot decode is handed to the Pillow decoder,
which either decodes it or says why not).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from app.engine.preprocess import Preprocessor
from app.serving.images import (
    ALLOWED_FORMATS,
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    check_resize,
    decode,
    open_checked,
    reducible,
)

# torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec) and warns on every call.
warnings.filterwarnings(
    "ignore",
    message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

# Colour modes (as Pillow reads them from the header) that torchvision decodes to the same RGB.
_JPEG_MODES = frozenset({"RGB", "L", "CMYK"})
_PNG_MODES = frozenset({"RGB", "RGBA", "L", "LA"})
_EXIF_ORIENTATION = 0x0112
_EXIF_CHUNK = re.compile(rb"eXIf")


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: Pillow's format and mode names, the stored (width, height) and the EXIF
    orientation (1 = upright). ``exif_after_pixels``: a PNG whose eXIf chunk follows its pixel data,
    where only a full decode finds the orientation."""

    format: str
    mode: str
    size: tuple[int, int]
    orientation: int
    exif_after_pixels: bool = False

    @property
    def upright_size(self) -> tuple[int, int]:
        width, height = self.size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


@dataclass
class DeviceImage:
    """An upright 8-bit RGB image as a (3, H, W) uint8 tensor (any strides), and the upright (width, height) of
    the full image. ``decoder`` names what decoded it: ``nvjpeg``, ``torchvision`` or ``pillow``."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    decoder: str


def read_header(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
) -> ImageHeader:
    """The header, read with the Pillow path's restricted parsers, with its checks and error codes:
    empty, unsupported or unreadable data and too many pixels are refused before any pixel decode."""
    image = open_checked(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    width, height = image.size
    orientation = 1
    if image.format != "PNG" or "exif" in image.info:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about damaged EXIF blocks and goes on
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # an unreadable EXIF block: Pillow's decode ignores it too
            orientation = 1
    late_exif = image.format == "PNG" and "exif" not in image.info and _EXIF_CHUNK.search(data) is not None
    return ImageHeader(str(image.format), image.mode, (width, height), orientation, late_exif)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) pixels turned upright for an EXIF orientation, as Pillow's ``exif_transpose``."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return pixels.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return pixels.rot90(1, dims=(-2, -1))
    return pixels


def decode_batch(
    blobs: Sequence[bytes],
    device: str | torch.device = "cpu",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    preprocessor: Preprocessor | None = None,
) -> list[DeviceImage | ImageDecodeError]:
    """Decode encoded images into upright uint8 (3, H, W) tensors on ``device``.

    One entry per blob, in order: the image, or the :class:`ImageDecodeError` the Pillow path would
    raise for it (its ``index`` set to the blob's position); one bad image does not fail the others.
    The JPEGs of the batch are decoded in one ``decode_jpeg`` call (nvJPEG's batched decode on CUDA).
    ``preprocessor``: also refuse, from the header, images whose resize for the model would exceed
    ``max_pixels`` (see :func:`check_resize`).
    """
    target = torch.device(device)
    results: list[DeviceImage | ImageDecodeError | None] = [None] * len(blobs)
    headers: dict[int, ImageHeader] = {}
    jpegs: list[int] = []
    for index, data in enumerate(blobs):
        try:
            header = read_header(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
            if preprocessor is not None:
                check_resize(preprocessor, header.upright_size, max_pixels)
        except ImageDecodeError as exc:
            exc.index = index
            results[index] = exc
            continue
        headers[index] = header
        if header.format == "JPEG" and header.mode in _JPEG_MODES:
            jpegs.append(index)
        elif header.format == "PNG" and header.mode in _PNG_MODES and not header.exif_after_pixels:
            results[index] = _decode_png(data, index, header, target, max_pixels, allowed_formats)
        else:
            results[index] = _pillow(data, index, target, max_pixels, allowed_formats)
    if jpegs:
        decoded = _decode_jpegs([blobs[i] for i in jpegs], target)
        for index, pixels in zip(jpegs, decoded, strict=True):
            if pixels is None:  # torchvision refused it: the Pillow decoder decodes it or says why
                results[index] = _pillow(blobs[index], index, target, max_pixels, allowed_formats)
                continue
            header = headers[index]
            results[index] = DeviceImage(
                orient(pixels, header.orientation),
                header.upright_size,
                "nvjpeg" if target.type == "cuda" else "torchvision",
            )
    return [result for result in results if result is not None]


def decode_pixels(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    min_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    header: ImageHeader | None = None,
) -> DeviceImage:
    """One posted image as upright uint8 (3, H, W) pixels on the CPU, for the host path's tensor
    resize. A JPEG is decoded by torchvision (libjpeg-turbo, the same pixels as Pillow's decoder)
    straight into a tensor, where Pillow fills its own image memory and then copies it out; unless
    ``min_size`` lets Pillow decode it at a reduced scale (see :func:`app.serving.images.decode`).
    Other formats go through Pillow's decoder. ``header``: the image's, already read with these
    limits (it is read here otherwise). Raises :class:`ImageDecodeError`."""
    if header is None:
        header = read_header(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    whole = min_size is None or reducible(header.size, header.upright_size, min_size) is None
    if header.format == "JPEG" and header.mode in _JPEG_MODES and whole:
        pixels = _decode_jpegs([data], torch.device("cpu"))[0]
        if pixels is not None:
            return DeviceImage(orient(pixels, header.orientation), header.upright_size, "torchvision")
    decoded = decode(data, max_pixels=max_pixels, allowed_formats=allowed_formats, min_size=min_size)
    pixels = torch.from_numpy(np.array(decoded.image, dtype=np.uint8)).permute(2, 0, 1)
    return DeviceImage(pixels, decoded.original_size, "pillow")


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs in one call; when the batch fails (torchvision returns nothing then), each image
    is retried alone, on the device, then on the CPU; None for an image no attempt decodes."""
    tensors = [_as_tensor(data) for data in blobs]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(decoded)
    except (RuntimeError, ValueError):
        pass
    out: list[torch.Tensor | None] = []
    for tensor in tensors:
        pixels: torch.Tensor | None = None
        for where in dict.fromkeys([device, torch.device("cpu")]):
            try:
                pixels = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=where).to(device)
                break
            except (RuntimeError, ValueError):
                continue
        out.append(pixels)
    return out


def _decode_png(
    data: bytes,
    index: int,
    header: ImageHeader,
    device: torch.device,
    max_pixels: int,
    allowed_formats: frozenset[str],
) -> DeviceImage | ImageDecodeError:
    try:
        pixels = decode_png(_as_tensor(data), mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return _pillow(data, index, device, max_pixels, allowed_formats)
    if pixels.dtype != torch.uint8:  # a 16-bit file whose header said 8-bit: leave it to Pillow
        return _pillow(data, index, device, max_pixels, allowed_formats)
    pixels = orient(pixels, header.orientation).to(device)
    channels = pixels.shape[0]
    if channels in (2, 4):  # composite the transparency on white, as the Pillow path does
        colour, alpha = pixels[:-1].float(), pixels[-1:].float() / 255.0
        background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(3, 1, 1)
        pixels = (colour * alpha + background[: colour.shape[0]] * (1.0 - alpha)).round_().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    height, width = pixels.shape[-2:]
    return DeviceImage(pixels, (int(width), int(height)), "torchvision")


def _pillow(
    data: bytes, index: int, device: torch.device, max_pixels: int, allowed_formats: frozenset[str]
) -> DeviceImage | ImageDecodeError:
    try:
        decoded = decode(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    except ImageDecodeError as exc:
        exc.index = index
        return exc
    pixels = torch.from_numpy(np.array(decoded.image, dtype=np.uint8)).permute(2, 0, 1).to(device)
    return DeviceImage(pixels, decoded.original_size, "pillow")
