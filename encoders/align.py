"""ALIGN towers: a transformers `AlignModel` (EfficientNet + BERT) and its `AlignProcessor`.

Specs name a folder written by `save_pretrained`, or a hub id already in the HF cache:

    align:/path/to/align-folder
    align:kakaobrain/align-base

Nothing is downloaded: both halves load with `local_files_only=True`, and a missing folder or
cache entry raises `ModelNotFoundError` naming it.

Preprocessing is read from the processor's `EfficientNetImageProcessor` and expressed as a
`PreprocessConfig`. The value transform is exact: rescale (with the optional -1 offset),
normalise and the `include_top` extra division by std are one per-channel affine map, which is
what mean/std in `PreprocessConfig` describe. The geometry is exact when the processor resizes
straight to a square (`do_center_crop=False`) or resizes the shortest edge to the crop size. It
is approximate for processors that squash to `size` and then centre-crop a smaller `crop_size`
(kakaobrain/align-base: 346 -> 289): `PreprocessConfig` has no crop fraction, so mmrag squashes
the whole image to `crop_size`, keeping the aspect distortion but also the border the processor
drops (about 8% per side for 346/289). Resampling also differs slightly: the processor resizes
uint8 tensors with torchvision (antialiased), mmrag uses PIL.

Measured on scikit-image photos (astronaut, chelsea, coffee): with a square resize and no crop
the pixels differ by at most one grey level (1/127.5 after the [-1, 1] rescale, mean ~1e-5) and
the value map alone by 1.2e-7; embeddings of a tiny random ALIGN differ by 1.7e-5. With the
align-base 346 -> 289 crop the field of view differs: mean absolute pixel difference 0.2-0.4.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, ModelNotFoundError, check_texts
from .preprocess import PreprocessConfig, rgb_triple
from .registry import parse_spec, register_family

logger = logging.getLogger(__name__)

#: PIL resampling codes as transformers stores them in `resample`.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


class AlignEncoder(Encoder):
    """`AlignModel` image/text embeddings; per-token states come from the BERT text model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, spec: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.dim = int(model.config.projection_dim)
        self.context_length = _context_length(model, tokenizer)
        self.preprocess = preprocess_from_image_processor(image_processor)

    # -- hooks ---------------------------------------------------------------------------------
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**self.tokenize(texts, padding=True)))

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT last hidden states (n, context_length, hidden) and the tokenizer's attention mask.

        Padded to `context_length`; a truncated text keeps its final [SEP] token.
        """
        inputs = self.tokenize(check_texts(texts), padding="max_length")
        with torch.no_grad():
            hidden = self.model.text_model(**inputs).last_hidden_state
        return hidden, inputs["attention_mask"]

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    # -- helpers -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], padding: bool | str) -> dict[str, torch.Tensor]:
        """BERT ids, token types and mask, truncated to `context_length`, on the tower's device."""
        inputs = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {key: value.to(self.device) for key, value in inputs.items()}


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The tokenizer's limit (64 for align-base), capped by the position table."""
    positions = int(model.config.text_config.max_position_embeddings)
    limit = getattr(tokenizer, "model_max_length", None)
    return min(positions, int(limit)) if isinstance(limit, int) and limit > 0 else positions


# -- preprocessing ---------------------------------------------------------------------------
def preprocess_from_image_processor(processor: Any) -> PreprocessConfig:
    """Express an `EfficientNetImageProcessor` (or any rescale/normalise processor) as PreprocessConfig."""
    size, resize_mode = _geometry(processor)
    mean, std = _affine(processor)
    return PreprocessConfig(
        size=size, mean=mean, std=std, interpolation=_interpolation(processor), resize_mode=resize_mode
    )


def _interpolation(processor: Any) -> str:
    """PIL code (int or PILImageResampling) or torchvision InterpolationMode -> PreprocessConfig name."""
    resample = getattr(processor, "resample", 3)
    value = getattr(resample, "value", resample)
    name = _RESAMPLE.get(value) if isinstance(value, int) else str(value).lower()
    if name not in _RESAMPLE.values():
        raise ValueError(f"image processor resample={resample!r} has no PIL equivalent in PreprocessConfig")
    return name


def _geometry(processor: Any) -> tuple[int, str]:
    """(square side, resize mode); see the module docstring for the one approximate case."""
    if not getattr(processor, "do_resize", True):
        raise ValueError("image processor does not resize; mmrag towers need a fixed square input")
    size = _as_dict(processor.size)
    crop = _as_dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
    if "shortest_edge" in size:
        if crop is None:
            raise ValueError("shortest-edge resize without a centre crop gives non-square inputs")
        crop_side = _square(crop, "crop_size")
        if size["shortest_edge"] != crop_side:
            logger.info(
                "image processor resizes to %d then crops %d; mmrag resizes to %d",
                size["shortest_edge"],
                crop_side,
                crop_side,
            )
        return crop_side, "shortest"
    side = _square(size, "size")
    if crop is None:
        return side, "squash"
    crop_side = _square(crop, "crop_size")
    if crop_side < side:
        logger.info(
            "image processor squashes to %d then centre-crops %d; mmrag squashes to %d (no crop fraction)",
            side,
            crop_side,
            crop_side,
        )
    return min(side, crop_side), "squash"


def _affine(processor: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Fold rescale(+offset), normalise and include_top into `(p/255 - mean) / std` per channel.

    The processor maps a pixel p to a*p + b; PreprocessConfig maps it to (p/255 - m)/s, so
    s = 1/(255 a) and m = -b s.
    """
    mean_in = rgb_triple(getattr(processor, "image_mean", 0.0))
    std_in = rgb_triple(getattr(processor, "image_std", 1.0))
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    offset = 1.0 if getattr(processor, "do_rescale", True) and getattr(processor, "rescale_offset", False) else 0.0
    mean, std = [], []
    for m, s in zip(mean_in, std_in, strict=True):
        a, b = rescale, -offset
        if getattr(processor, "do_normalize", True):
            a, b = a / s, (b - m) / s
        if getattr(processor, "include_top", False):
            a, b = a / s, b / s
        std.append(1.0 / (255.0 * a))
        mean.append(-b * std[-1])
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


def _as_dict(size: Any) -> dict[str, int]:
    if isinstance(size, Mapping):
        return {k: int(v) for k, v in size.items() if v is not None}
    return {k: int(v) for k, v in vars(size).items() if v is not None}  # transformers' SizeDict


def _square(size: Mapping[str, int], what: str) -> int:
    if "shortest_edge" in size and len(size) == 1:
        return size["shortest_edge"]
    if size.get("height") != size.get("width"):
        raise ValueError(f"image processor {what} {dict(size)} is not square; mmrag towers take square inputs")
    return size["height"]


# -- loading ---------------------------------------------------------------------------------
@register_family("align")
def load_align(spec: str) -> AlignEncoder:
    """`align:FOLDER` or `align:ORG/NAME` (HF cache only) -> an encoder (CPU, eval mode)."""
    parsed = parse_spec(spec)
    if parsed.family != "align":
        raise ValueError(f"spec {spec!r} is not an align spec")
    if parsed.weights:
        raise ValueError(f"align spec {spec!r}: the folder or hub id is the weights; drop '@{parsed.weights}'")
    source = _resolve_source(parsed.name)
    model, processor = _from_pretrained(source)
    return AlignEncoder(model.eval(), processor.tokenizer, processor.image_processor, spec=str(parsed))


def _resolve_source(name: str) -> str:
    """A folder (which must exist) or an `org/name` hub id; anything path-like counts as a folder."""
    hub_like = name.count("/") == 1 and not name.startswith(("/", ".", "~"))
    path = Path(name).expanduser()
    if path.is_dir() or hub_like:
        return str(path) if path.is_dir() else name
    raise ModelNotFoundError(f"ALIGN model folder not found: {path} (from spec 'align:{name}')")


def _from_pretrained(source: str) -> tuple[torch.nn.Module, Any]:
    """Load model and processor from disk only; a cache miss names the source and the fix."""
    from transformers import AlignModel, AlignProcessor

    try:
        model = AlignModel.from_pretrained(source, local_files_only=True)
        processor = AlignProcessor.from_pretrained(source, local_files_only=True)
    except OSError as error:
        raise ModelNotFoundError(
            f"ALIGN model {source!r} is not on disk ({error}). Pass a folder written by save_pretrained, "
            f"or fetch the hub id once online: hf download {source}"
        ) from error
    return model, processor
