"""One spec grammar, one parser, one registry of tower families.

A spec is `family:rest`, one string that names a model and its weights exactly, e.g.

    mmrag:lite0-minilm@flickr8k-v1                 shipped heads on Lite0 + MiniLM (half the default)
    ensemble:SPEC+SPEC                             several towers as one (the default is two)
    mmrag:lite0-minilm@/path/to/heads.safetensors  the same towers with heads you trained
    openclip:ViT-B-32@laion2b_s34b_b79k            an open_clip architecture and pretrained tag
    openclip:ViT-B-32@/path/to/checkpoint.pt       ... or a local checkpoint
    openclip:hf-hub:timm/ViT-B-16-SigLIP           ... or a hub name (needs the hub cache)
    openclip:local-dir:/path/to/folder             ... or a folder `mmrag train` wrote
    align:/path/to/align-folder                    a transformers AlignModel folder
    align:kakaobrain/align-base                    ... or a hub id from the cache

Each family registers a loader with `@register_family("name")`; a second registration of the
same name is an error, not a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import Encoder, Precision, Runtime, check_precision, check_runtime

#: the default tower: v1 (Lite0) and a Lite2 tower, scored by the mean of their cosines (MODEL_CARD.md)
DEFAULT_SPEC = "ensemble:mmrag:lite0-minilm@flickr8k-v1+mmrag:lite2-minilm@flickr8k-v2"

Loader = Callable[[str], Encoder]
_FAMILIES: dict[str, Loader] = {}


@dataclass(frozen=True)
class Spec:
    """A parsed spec: `family`, the model `name` and its `weights` (tag, path, or empty)."""

    family: str
    name: str
    weights: str

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" + (f"@{self.weights}" if self.weights else "")


def parse_spec(spec: str) -> Spec:
    """Split `family:name@weights`; `hf-hub:` and `local-dir:` names are kept whole, as open_clip does."""
    family, sep, rest = spec.partition(":")
    if not sep or not family or not rest:
        raise ValueError(f"encoder spec {spec!r} is not of the form 'family:name[@weights]', e.g. {DEFAULT_SPEC!r}")
    if rest.startswith(("hf-hub:", "local-dir:")):
        return Spec(family, rest, "")
    name, _, weights = rest.partition("@")
    return Spec(family, name, weights)


def register_family(name: str) -> Callable[[Loader], Loader]:
    """Register `loader(spec_string) -> Encoder` for specs starting with `name:`."""

    def decorate(loader: Loader) -> Loader:
        if name in _FAMILIES:
            raise ValueError(f"encoder family {name!r} is already registered")
        _FAMILIES[name] = loader
        return loader

    return decorate


def list_families() -> list[str]:
    _import_builtin_families()
    return sorted(_FAMILIES)


def load_encoder(
    spec: str | None = None, device: str = "cpu", precision: Precision = "fp32", runtime: Runtime = "torch"
) -> Encoder:
    """Turn a spec back into a ready encoder (eval mode, on `device`, in `precision`, its image side
    in `runtime`); None means the default tower."""
    check_precision(precision)
    check_runtime(runtime)
    spec = spec or DEFAULT_SPEC
    family = parse_spec(spec).family
    _import_builtin_families()
    if family not in _FAMILIES:
        raise ValueError(f"unknown encoder family {family!r} in spec {spec!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family](spec).eval().to(device).with_precision(precision).with_runtime(runtime)


def _import_builtin_families() -> None:
    """Import the built-in family modules, which register themselves; heavy imports stay lazy."""
    from . import align, ensemble, mmrag_tower, openclip  # noqa: F401
