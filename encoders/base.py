"""The one contract every tower meets.

A tower subclasses `Encoder` and implements three small hooks: `_image_features` (a normalised
pixel batch -> features), `_text_features` (a list of strings -> features) and
`encode_text_tokens` (per-token hidden states, for diffusion). Batching, `eval()`/no-grad,
L2 normalisation, float32 numpy output and input checks live here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from PIL import Image

from .preprocess import PreprocessConfig, pixels_to_tensor, prepare_pixels


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
        x = pixels_to_tensor(pixels, self.preprocess).to(self.device)
        with torch.inference_mode():
            return l2_normalize(self._image_features(x))

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
        with torch.inference_mode():
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
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def eval(self) -> "Encoder":
        for module in self.modules():
            module.eval()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device})"
