"""Safe image decoding: every input form becomes an upright RGB PIL image, or a clear reason why not.

Files are read whole and decoded fully (`Image.load()`), so a truncated JPEG fails here rather
than producing a half-grey embedding later. EXIF orientation is applied; transparency is
flattened onto `ALPHA_BACKGROUND`; 16-bit greyscale keeps its range. A decompression bomb or an
oversized image is refused by pixel count before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .encoders import to_rgb

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

#: Largest image accepted, in pixels (about 16k x 8k). Bigger ones are skipped, not decoded.
MAX_PIXELS = 128_000_000

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageDecodeError(ValueError):
    """An input that is not a usable image. `reason` is a short, stable phrase for reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def content_hash(data: bytes) -> str:
    """Hex sha256 of raw bytes; point ids are derived from it, so re-ingest is idempotent."""
    return hashlib.sha256(data).hexdigest()


def pixel_hash(image: Image.Image) -> str:
    """sha256 of an in-memory image's mode, size and pixels (it has no file bytes)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def read_bytes(path: str | Path) -> bytes:
    """Read a file, turning missing/unreadable/empty files into ImageDecodeError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError("file not found", str(path)) from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory", str(path)) from None
    except OSError as exc:
        raise ImageDecodeError("unreadable file", f"{path}: {exc}") from None
    if not data:
        raise ImageDecodeError("empty file", f"{path} has 0 bytes")
    return data


def decode_bytes(data: bytes, max_pixels: int = MAX_PIXELS, allow_truncated: bool = False) -> Image.Image:
    """Decode encoded image bytes fully into an upright RGB image, or raise ImageDecodeError.

    A truncated file is an error unless `allow_truncated`: then PIL fills the missing part grey.
    """
    if not data:
        raise ImageDecodeError("empty file", "0 bytes")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES  # a process-wide PIL switch: set it for this call only
    ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError("image too large", f"{width}x{height} exceeds {max_pixels:,} pixels")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image", _describe_non_image(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image too large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated image" if "truncated" in str(exc).lower() else "corrupt image"
        raise ImageDecodeError(reason, str(exc)) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return upright_rgb(image)


def upright_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, then flatten any mode (alpha, palette, 16-bit) to RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image too small", f"{image.width}x{image.height}")
    return to_rgb(image)


def array_to_image(array: np.ndarray) -> Image.Image:
    """A 2-D (greyscale) or HxWx{1,3,4} array of uint8, uint16 or float in [0, 1] -> RGB image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageDecodeError("unsupported array shape", f"{array.shape}; expected (h, w), (h, w, 3) or (h, w, 4)")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageDecodeError("non-finite pixels", "array holds NaN or inf")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageDecodeError("unsupported array dtype", f"{array.dtype}; expected uint8, uint16 or float")
    return upright_rgb(Image.fromarray(np.ascontiguousarray(array)))


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any supported image input -> upright RGB PIL image; ImageDecodeError says why not."""
    if isinstance(source, Image.Image):
        return upright_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), max_pixels)
    if isinstance(source, (str, Path)):
        return decode_bytes(read_bytes(source), max_pixels)
    raise TypeError(f"cannot read an image from {type(source).__name__}")


def _describe_non_image(data: bytes) -> str:
    """Say what a non-image file looks like, so a report line is actionable."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "looks like an HTML page"
    try:
        data[:512].decode("utf-8")
        return "looks like a text file"
    except UnicodeDecodeError:
        return "unrecognised binary format"
