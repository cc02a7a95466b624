"""The one contract every tower meets.

A tower subclasses `Encoder` and implements three small hooks: `_image_features` (a normalised
pixel batch -> features), `_text_features` (a list of strings -> features) and
`encode_text_tokens` (per-token hidden states, for diffusion). Batching, `eval()`/no-grad,
L2 normalisation, float32 numpy output and input checks live here, once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, get_args, overload

import numpy as np
import torch
from PIL import Image

from .preprocess import PreprocessConfig, pixels_to_tensor, prepare_pixels


#: Arithmetic of the forward passes: "fp32", or "bf16" autocast (about 1.8x faster on CPUs with
#: AVX512-BF16 or AMX; embeddings move by up to ~0.005 in cosine, docs/benchmarks.md).
Precision = Literal["fp32", "bf16"]


#: What runs the image side: "torch", or "onnx" (ONNX Runtime, same numbers, several times the CPU
#: rate; exported once and cached, see `onnx_runtime`).
Runtime = Literal["torch", "onnx"]


def _one_of(choices: object, value: str, name: str) -> str:
    """`value` if it is one of the Literal type `choices`, else ValueError listing them."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")
    return value


def check_precision(precision: str) -> Precision:
    return _one_of(Precision, precision, "precision")  # type: ignore[return-value]


def check_runtime(runtime: str) -> Runtime:
    return _one_of(Runtime, runtime, "runtime")  # type: ignore[return-value]


class ModelNotFoundError(FileNotFoundError):
    """A tower's weights or tokenizer are not on disk; the message names the file and the fix."""


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject empty or whitespace-only strings before any model call."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        if not text.strip():
            raise ValueError(f"text {i} is empty or whitespace only: {text!r}")
    return texts


def l2_normalize(features: torch.Tensor) -> np.ndarray:
    """float32 rows of unit length, as numpy (what every public embed method returns)."""
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32)


class Encoder(ABC):
    """A dual-encoder tower pair mapping images and texts into one `dim`-wide space.

    Subclasses set `spec`, `dim`, `context_length` and `preprocess`, hold their modules, and
    implement the three hooks. Devices are the caller's choice: CPU unless `.to()` says otherwise.
    """

    spec: str
    dim: int
    context_length: int
    preprocess: PreprocessConfig
    device: torch.device = torch.device("cpu")
    precision: Precision = "fp32"
    runtime: Runtime = "torch"
    _onnx_images: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float pixels (n, 3, h, w) -> unnormalised features (n, dim)."""

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Non-empty strings -> unnormalised features (n, dim); truncation is the tower's."""

    @abstractmethod
    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token hidden states (n, L, h) and attention mask (n, L), for conditioning diffusion."""

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules this tower runs, so `.to()` and `eval()` can reach them."""

    # -- public API ----------------------------------------------------------------------------
    @overload
    def embed_images(self, images: Image.Image, batch_size: int = ...) -> np.ndarray: ...
    @overload
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = ...) -> np.ndarray: ...
    def embed_images(self, images, batch_size: int = 32):
        """PIL image(s) -> L2-normalised float32 embeddings; one image gives a 1-D vector."""
        single = isinstance(images, Image.Image)
        batch = [images] if single else list(images)
        pixels = [prepare_pixels(image, self.preprocess) for image in batch]
        if not pixels:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate(
            [self.embed_pixels(np.stack(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
        )
        return out[0] if single else out

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) from `prepare_pixels` -> L2-normalised (n, dim)."""
        x = pixels_to_tensor(pixels, self.preprocess)
        if self._onnx_images is not None:
            return l2_normalize(self._onnx_images(x))
        with torch.inference_mode(), self._autocast():
            return l2_normalize(self._image_features(x.to(self.device)))

    @overload
    def embed_texts(self, texts: str, batch_size: int = ...) -> np.ndarray: ...
    @overload
    def embed_texts(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...
    def embed_texts(self, texts, batch_size: int = 64):
        """String(s) -> L2-normalised float32 embeddings; one string gives a 1-D vector.

        Raises ValueError on empty or whitespace-only text before any model call.
        """
        single = isinstance(texts, str)
        batch = check_texts([texts] if single else texts)
        if not batch:
            return np.zeros((0, self.dim), np.float32)
        # Sort by length so each batch pads little, then restore the caller's order.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        out = np.empty((len(batch), self.dim), np.float32)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                out[idx] = l2_normalize(self._text_features([batch[i] for i in idx]))
        return out[0] if single else out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs, special tokens included, before truncation to `context_length`.

        A text with more than `context_length` tokens is embedded truncated (its end token kept);
        ingest reports such texts. Works for towers that keep a Hugging Face tokenizer in
        `self.tokenizer`; others override it.
        """
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None or not callable(tokenizer):
            raise NotImplementedError(f"{type(self).__name__} does not count tokens")
        return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]

    def to(self, device: str | torch.device) -> "Encoder":
        """Move every module to `device`; returns self, as torch does."""
        if self._onnx_images is not None and torch.device(device).type != "cpu":
            raise ValueError("this encoder runs its image side in ONNX Runtime on the CPU; with_runtime('torch') first")
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def with_precision(self, precision: Precision) -> "Encoder":
        """Run forward passes in `precision` ("fp32" or "bf16" autocast); returns self.

        The spec stays the same: bf16 is a speed option of one process, not another model.
        """
        if check_precision(precision) != "fp32" and self.runtime != "torch":
            raise ValueError(f"precision {precision!r} is for the torch runtime; ONNX Runtime runs fp32")
        self.precision = precision
        return self

    def with_runtime(self, runtime: Runtime, cache_dir: str | Path | None = None) -> "Encoder":
        """Run the image side in `runtime`: "torch", or "onnx" (ONNX Runtime on the CPU, exported
        once and cached under `cache_dir`, default ~/.cache/mmrag/onnx); returns self."""
        if check_runtime(runtime) == "onnx":
            if self.precision != "fp32":
                raise ValueError(f"ONNX Runtime runs fp32; this encoder is set to {self.precision!r}")
            if self.device.type != "cpu":
                raise ValueError(f"runtime='onnx' runs on the CPU; this encoder is on {self.device}")
            from .onnx_runtime import OnnxImageSide

            self._onnx_images = OnnxImageSide.build(self, cache_dir)
        else:
            self._onnx_images = None
        self.runtime = runtime
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def eval(self) -> "Encoder":
        for module in self.modules():
            module.eval()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device})"
