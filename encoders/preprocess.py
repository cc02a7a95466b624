"""Image preprocessing shared by every tower, split so the PIL half can run in worker processes.

`prepare_pixels` (PIL -> uint8 HWC array) needs no torch, so ingest runs it in forked decode
workers; `pixels_to_tensor` (uint8 NHWC -> normalised float NCHW) runs in the encoding process.
Preprocessing belongs to the weights, not the architecture (as in open_clip), so each tower
carries its own `PreprocessConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

#: Transparent pixels are flattened onto this colour before any tower sees them.
ALPHA_BACKGROUND = (255, 255, 255)

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a tower wants its pixels: square side, normalisation and resize policy."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    #: "shortest": scale the short side to `size`, then centre-crop; "squash": resize to size x size.
    resize_mode: Literal["shortest", "squash"] = "shortest"


def rgb_triple(values: Sequence[float] | float) -> tuple[float, float, float]:
    """A per-channel mean or std from a scalar or a 3-sequence (as model configs give them)."""
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    r, g, b = (float(v) for v in values)
    return r, g, b


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Return an RGB copy; transparency is composited onto `background`, never dropped raw."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer greyscale: rescale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def prepare_pixels(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Resize and crop one image to the tower's square input; returns uint8 (size, size, 3)."""
    image = to_rgb(image)
    size, resample = config.size, _INTERPOLATIONS[config.interpolation]
    if config.resize_mode == "squash":
        image = image.resize((size, size), resample)
    else:
        width, height = image.size
        # The same rounding as torchvision's Resize(int) and CenterCrop, so open_clip towers see
        # exactly the pixels their own transforms would give.
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        image = image.resize((new_w, new_h), resample)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def pixels_to_tensor(pixels: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float32 (n, 3, h, w), scaled to [0, 1] then normalised."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels of shape (n, h, w, 3), got {pixels.shape}")
    if not pixels.flags.writeable:  # torch.from_numpy warns on read-only arrays
        pixels = pixels.copy()
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std
