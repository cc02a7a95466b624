"""Dual-encoder towers behind one contract: `embed_images`, `embed_texts`, `encode_text_tokens`.

This package imports nothing from the rest of mmrag: the core builds on it, never the reverse.

    >>> from mmrag.encoders import load_encoder
    >>> encoder = load_encoder()            # the default tower, offline
    >>> encoder.embed_texts(["a dog on a beach"]).shape
    (1, 512)
"""

from .base import Encoder, ModelNotFoundError, Precision, Runtime
from .preprocess import PreprocessConfig, prepare_pixels, to_rgb
from .registry import DEFAULT_SPEC, Spec, list_families, load_encoder, parse_spec, register_family

__all__ = [
    "DEFAULT_SPEC",
    "Encoder",
    "ModelNotFoundError",
    "Precision",
    "PreprocessConfig",
    "Runtime",
    "Spec",
    "list_families",
    "load_encoder",
    "parse_spec",
    "prepare_pixels",
    "register_family",
    "to_rgb",
]
