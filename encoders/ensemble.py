"""Several towers as one: `ensemble:SPEC+SPEC`, scored by the mean of the members' cosines.

Two towers trained on the same pairs but on different image backbones make different mistakes;
on Flickr8k dev the mean of v1's (Lite0) and a Lite2 tower's cosines lifts recall@1 by 3-7 points
over either alone (encoders/weights/MODEL_CARD.md). Concatenating the members' unit embeddings,
each scaled by 1/sqrt(n), gives exactly that score as one dot product, so the store, filters and
every search path treat an ensemble like any other tower of width sum(dims).

    load_encoder("ensemble:mmrag:lite0-minilm@flickr8k-v1+mmrag:lite2-minilm@flickr8k-v2")

Images are decoded once, at the largest member's input size, and resized on the tensor
(bicubic, antialiased) for smaller members; member specs may not contain '+'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Encoder
from .registry import load_encoder, register_family

SEPARATOR = "+"


class EnsembleEncoder(Encoder):
    """Member towers side by side: embeddings are their unit embeddings concatenated, / sqrt(n)."""

    def __init__(self, members: Sequence[Encoder]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two towers, got {len(members)}")
        normalisations = {(tuple(m.preprocess.mean), tuple(m.preprocess.std)) for m in members}
        if len(normalisations) > 1:
            raise ValueError(f"ensemble members normalise pixels differently ({sorted(normalisations)}); "
                             "they must share mean and std, as images are decoded once")
        self.members = list(members)
        self.spec = "ensemble:" + SEPARATOR.join(m.spec for m in self.members)
        self.dim = sum(m.dim for m in self.members)
        self.context_length = min(m.context_length for m in self.members)
        self.preprocess = max((m.preprocess for m in self.members), key=lambda config: config.size)
        #: the first member's tokenizer: the text tower `encode_text_tokens` runs
        self.tokenizer = getattr(self.members[0], "tokenizer", None)
        self._scale = 1.0 / math.sqrt(len(self.members))

    def _joined(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(f.float(), dim=-1) * self._scale for f in features], dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = []
        for member in self.members:
            size = member.preprocess.size
            x = pixels if pixels.shape[-1] == size else F.interpolate(
                pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            features.append(member._image_features(x))
        return self._joined(features)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Members that share a text backbone (same `text_states_key`) run it once."""
        states: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        features = []
        for member in self.members:
            key = getattr(member, "text_states_key", None)
            if key is None:
                features.append(member._text_features(texts))
                continue
            if key not in states:
                states[key] = member.text_states(texts)
            features.append(member.text_from_states(*states[key]))
        return self._joined(features)

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first member's token states: a diffusion pipeline conditions on one text tower."""
        return self.members[0].encode_text_tokens(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs in the member with the shortest context (where truncation bites first)."""
        shortest = min(self.members, key=lambda m: m.context_length)
        return shortest.count_tokens(texts)

    def modules(self) -> list[nn.Module]:
        unique: dict[int, nn.Module] = {}
        for member in self.members:
            for module in member.modules():
                unique.setdefault(id(module), module)  # members may share a backbone
        return list(unique.values())

    def to(self, device: str | torch.device) -> "EnsembleEncoder":
        for member in self.members:
            member.to(device)
        super().to(device)
        return self


def split_members(spec: str) -> list[str]:
    """`ensemble:A+B` -> ["A", "B"], with a clear error for empty or nested members."""
    family, _, rest = spec.partition(":")
    members = [part.strip() for part in rest.split(SEPARATOR)]
    if family != "ensemble" or len(members) < 2 or not all(members):
        raise ValueError(f"ensemble spec {spec!r} is not of the form 'ensemble:SPEC{SEPARATOR}SPEC[{SEPARATOR}...]'")
    if any(member.startswith("ensemble:") for member in members):
        raise ValueError(f"ensemble spec {spec!r} nests an ensemble; list its members instead")
    return members


@register_family("ensemble")
def load_ensemble(spec: str) -> EnsembleEncoder:
    return EnsembleEncoder([load_encoder(member) for member in split_members(spec)])
