"""Safe image decoding: formats, pixel limits before the full decode, EXIF orientation, colour modes."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.engine.preprocess import Preprocessor
from app.serving.errors import ServiceError

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 40_000_000
BACKGROUND = (255, 255, 255)


class ImageDecodeError(ServiceError, ValueError):
    """The bytes are not an acceptable image. ``code`` is a stable machine-readable reason."""

    def __init__(self, message: str, *, code: str = "invalid_image") -> None:
        super().__init__(code, message)
        self.index: int | None = None  # position of the failing image in a request, when known


# EXIF orientations that turn the stored image by 90 degrees (width and height swap when upright).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Formats whose decoder can produce a reduced scale directly (MPO: the first frame is a JPEG).
_SCALABLE_FORMATS = frozenset({"JPEG", "MPO"})


@dataclass
class DecodedImage:
    """An upright 8-bit RGB image and the (width, height) of the full image, upright.

    ``image`` is smaller than ``original_size`` when a JPEG was decoded at a reduced scale.
    """

    image: Image.Image
    original_size: tuple[int, int]


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
) -> Image.Image:
    """Decode bytes into an 8-bit RGB image, upright, at full size (see :func:`decode`)."""
    return decode(data, max_pixels=max_pixels, allowed_formats=allowed_formats).image


def check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """413 ``too_many_pixels`` for an image of (width, height) over ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image has {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
            code="too_many_pixels",
        )


def _upright(image: Image.Image) -> tuple[int, int]:
    """The opened image's (width, height) once its EXIF orientation is applied, from the header: a
    PNG whose EXIF is not among its header chunks counts as upright (Pillow would decode the whole
    image to look for an eXIf chunk after the pixels; a quarter turn only swaps the sides, so the
    pixel count, which is what the size serves to limit, is the same either way)."""
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        return width, height
    return (height, width) if image.getexif().get(0x0112) in _QUARTER_TURNS else (width, height)


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    min_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> DecodedImage:
    """Decode bytes into an 8-bit RGB image, upright.

    The header is read first and the pixel count checked before any pixel data is decoded, so a
    decompression bomb is refused cheaply. Animated formats give their first frame. Transparent
    images are composited on white; CMYK, 16-bit and float images are converted to 8-bit RGB.

    ``min_size``: given the full upright (width, height), the smallest upright size the caller needs.
    A JPEG at least twice that size in both directions is then decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, the largest reduction that keeps at least ``min_size``), which costs a
    fraction of a full decode; other formats are always decoded whole.
    """
    image = open_checked(data, max_pixels=max_pixels, allowed_formats=allowed_formats)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        reduced_from = None
        if min_size is not None and image.format in _SCALABLE_FORMATS:
            reduced_from = _draft(image, min_size)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # upright without a copy when already upright
        return DecodedImage(to_rgb(image), reduced_from or image.size)
    except ImageDecodeError:
        raise
    except Exception as exc:  # truncated or corrupted data surfaces here
        raise ImageDecodeError(
            f"the image data is truncated or corrupted: {exc}", code="corrupt_image"
        ) from exc


def open_unguarded(data: bytes, allowed_formats: frozenset[str]) -> Image.Image:
    """``Image.open`` restricted to ``allowed_formats`` (an MPO file opens through the JPEG parser)
    and without Pillow's fixed pixel guard, a process-wide setting: the caller checks its own limit
    from the header instead."""
    Image.MAX_IMAGE_PIXELS = None
    Image.init()  # registers every format's parser (a no-op after the first call)
    return Image.open(io.BytesIO(data), formats=sorted(f for f in allowed_formats if f in Image.OPEN))


def _draft(
    image: Image.Image, min_size: Callable[[tuple[int, int]], tuple[int, int]]
) -> tuple[int, int] | None:
    """Ask the JPEG decoder for a reduced scale that keeps at least ``min_size``. Must run before the
    pixels are loaded. Returns the full upright size when the image will be decoded reduced, else
    None."""
    width, height = image.size
    upright = _upright(image)
    need = reducible(image.size, upright, min_size)
    if need is None:
        return None
    image.draft(image.mode, need)
    return upright if image.size != (width, height) else None


def reducible(
    size: tuple[int, int], upright: tuple[int, int], min_size: Callable[[tuple[int, int]], tuple[int, int]]
) -> tuple[int, int] | None:
    """The stored (width, height) a JPEG of stored ``size`` (``upright`` once turned) must keep when
    decoded at a reduced scale, or None when it is under twice that and is decoded whole."""
    width, height = size
    need_w, need_h = min_size(upright)
    if upright != size:
        need_w, need_h = need_h, need_w
    if width < 2 * need_w or height < 2 * need_h:
        return None
    return max(1, need_w), max(1, need_h)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparency composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        if mode == "F":
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low) if high > low else np.zeros_like(array)
            high = 1.0
        scaled = np.clip(np.round(array / high * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_resize(preprocessor: Preprocessor, original_size: tuple[int, int], max_pixels: int) -> None:
    """413 ``too_many_pixels`` when the model's resize of an image of ``original_size`` would make
    more than ``max_pixels`` pixels (a 1x100000 strip resized for a 224-pixel model)."""
    width, height = preprocessor.geometry(original_size).resized_size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is {original_size[0]}x{original_size[1]}: resized for the model it would be "
            f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "crop it to a less elongated shape",
            code="too_many_pixels",
        )


def open_checked(data: bytes, *, max_pixels: int, allowed_formats: frozenset[str]) -> Image.Image:
    """The image opened from its header alone, refused (with the error every image path gives)
    when it is empty, of a format not accepted, unreadable, without pixels or over ``max_pixels``."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)", code="empty_image")
    try:
        # Only the accepted formats' parsers see the bytes. Pillow's own decompression-bomb guard
        # (a fixed, process-wide 89/179 Mpx) is left out: ``max_pixels`` is checked below, from the
        # header, before any pixel is decoded, so the configured limit holds in both directions.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_unguarded(data, allowed_formats)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "the data is not an image in an accepted format "
            f"({', '.join(sorted(allowed_formats - {'MPO'}))})",
            code="unsupported_image",
        ) from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot read the image header: {exc}", code="invalid_image") from exc
    if image.format not in allowed_formats:
        raise ImageDecodeError(
            f"image format {image.format} is not accepted; use one of {', '.join(sorted(allowed_formats - {'MPO'}))}",
            code="unsupported_image",
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("the image has no pixels", code="invalid_image")
    check_pixel_count((width, height), max_pixels)
    return image
