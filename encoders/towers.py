"""Dual towers as the trainer sees them: each side split into a locked prefix and a trainable rest.

Locking is what makes training on a CPU possible. Whatever is locked at the start of a tower
(everything before its first unlocked block) gives the same output every epoch, so the trainer
computes it once and caches it on disk (`image_prefix` / `text_prefix`); each step then runs only
the trainable rest (`image_rest` / `text_rest`). With a tower fully locked the rest is just the
head (ALIGN-style) or nothing at all (OpenCLIP-style LiT: the locked tower's embeddings are fixed).

Two styles, one interface:

    AlignTowers     a timm EfficientNet and a transformers text model, with trained pooling heads;
                    saved as an mmrag heads file -> `mmrag:<arch>@/path/model.safetensors`
    OpenClipTowers  any open_clip architecture, from scratch or from a checkpoint;
                    saved as an open_clip folder -> `openclip:local-dir:/path/folder`

`unlocked` counts blocks from the end of each tower: 0 locks the whole backbone, N unlocks its
last N blocks, -1 trains all of it. What a block is: an EfficientNet stage (plus the stem and
the final 1x1 conv as a block each), a transformer layer (plus the embeddings as the first).
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .heads import HeadConfig, PoolHead, save_heads
from .preprocess import PreprocessConfig

TextPrefix = tuple[torch.Tensor, torch.Tensor | None]  # values (n, L, ...) and lengths (n,), or fixed (n, d) and None


class DualTowers(nn.Module, ABC):
    """A trainable image tower and text tower, split at their lock points."""

    preprocess: PreprocessConfig
    dim: int

    @abstractmethod
    def lock(self, image_unlocked: int, text_unlocked: int) -> None:
        """Freeze each tower except its last `*_unlocked` blocks (-1: all of it trains)."""

    @abstractmethod
    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (n, 3, s, s) -> output of the locked part (no grad needed)."""

    @abstractmethod
    def image_rest(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prefix output -> unnormalised embeddings (n, dim), through everything that trains."""

    @abstractmethod
    def text_prefix(self, texts: list[str]) -> TextPrefix:
        """Strings -> output of the locked part, with per-text lengths when it is a sequence."""

    @abstractmethod
    def text_rest(self, prefix: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Prefix output (and its (n, L) bool mask) -> unnormalised embeddings (n, dim)."""

    @abstractmethod
    def prefix_key(self, side: Literal["image", "text"]) -> dict[str, Any]:
        """What determines a side's prefix output; cache files are keyed by it."""

    @abstractmethod
    def save(self, path: Path, metadata: dict[str, Any]) -> str:
        """Write the trained weights at `path`; returns the spec that loads them."""

    def has_image_prefix(self) -> bool:
        """Whether anything is locked at the start of the image tower (else the prefix is the identity)."""
        return True

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that are new with training (heads): trained at the full learning rate."""
        return []

    def forward(self, image_prefix: torch.Tensor, text_prefix: torch.Tensor, text_mask: torch.Tensor | None):
        """Both embeddings from cached prefixes; one call, so accelerate's autocast and DDP wrap it."""
        return self.image_rest(image_prefix), self.text_rest(text_prefix, text_mask)


def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm statistics stay those of pretraining: batches of one data set would skew them."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# -- ALIGN-style: EfficientNet (timm) + BERT-family (transformers) + pooling heads ---------------
@dataclass(frozen=True)
class AlignHeadsConfig:
    """The two pooling heads of an ALIGN-style tower (see `heads.PoolHead`)."""

    dim: int = 512
    image_pool: Literal["mean", "attn"] = "mean"
    text_pool: Literal["mean", "attn"] = "attn"
    image_attn_width: int = 256
    text_attn_width: int = 384
    attn_heads: int = 8
    hidden: int = 0
    dropout: float = 0.0


class AlignTowers(DualTowers):
    """EfficientNet image tower and transformers text tower, each followed by a pooling head.

    Blocks of the image tower: [stem, stage 0, ..., stage k, final conv]; of the text tower:
    [embeddings, layer 0, ..., layer L-1]. Locked blocks keep their pretrained values and are
    not saved; unlocked ones are saved in full beside the heads.
    """

    def __init__(self, image_backbone: str = "lite0", text_backbone: str = "minilm",
                 heads: AlignHeadsConfig | None = None, context_length: int = 256) -> None:
        super().__init__()
        from .backbones import image_preprocess, load_image_backbone, load_text_backbone

        self.image_backbone_name, self.text_backbone_name = image_backbone, text_backbone
        # channels-last: the same numbers as NCHW, about twice as fast on CPU (docs/benchmarks.md)
        self.image_net = load_image_backbone(image_backbone).to(memory_format=torch.channels_last)
        self.tokenizer, self.text_net = load_text_backbone(text_backbone)
        self.preprocess = image_preprocess(image_backbone)
        self.context_length = context_length
        self.heads_config = heads or AlignHeadsConfig()
        self.dim = self.heads_config.dim
        self.image_head, self.text_head = self._build_heads()
        self.image_unlocked = self.text_unlocked = 0
        self.lock(0, 0)

    # -- structure ------------------------------------------------------------------------------
    def _build_heads(self) -> tuple[PoolHead, PoolHead]:
        h = self.heads_config
        common = dict(out_dim=h.dim, attn_heads=h.attn_heads, hidden=h.hidden, dropout=h.dropout)
        image_width = self.image_net.num_features
        text_width = self.text_net.config.hidden_size
        image = HeadConfig(in_dim=image_width, pool=h.image_pool, attn_width=h.image_attn_width, positions=0, **common)
        text = HeadConfig(in_dim=text_width, pool=h.text_pool, attn_width=h.text_attn_width, positions=0, **common)
        return PoolHead(image), PoolHead(text)

    def image_blocks(self) -> list[nn.Module]:
        net = self.image_net
        return [nn.ModuleList([net.conv_stem, net.bn1]), *net.blocks, nn.ModuleList([net.conv_head, net.bn2])]

    def text_blocks(self) -> list[nn.Module]:
        return [self.text_net.embeddings, *self.text_net.encoder.layer]

    @staticmethod
    def _split(n_blocks: int, unlocked: int) -> int:
        """Index of the first trainable block."""
        if unlocked < -1:
            raise ValueError(f"unlocked must be -1 (all), 0 (none) or a block count, got {unlocked}")
        return 0 if unlocked == -1 else max(0, n_blocks - unlocked)

    def lock(self, image_unlocked: int, text_unlocked: int) -> None:
        self.image_unlocked, self.text_unlocked = image_unlocked, text_unlocked
        for blocks, unlocked in ((self.image_blocks(), image_unlocked), (self.text_blocks(), text_unlocked)):
            start = self._split(len(blocks), unlocked)
            for i, block in enumerate(blocks):
                for param in block.parameters():
                    param.requires_grad_(i >= start)
        # anything not in a block (e.g. BERT's pooler, timm's classifier) is never used
        for module in (self.text_net.pooler if getattr(self.text_net, "pooler", None) is not None else None,
                       getattr(self.image_net, "classifier", None)):
            if module is not None:
                for param in module.parameters():
                    param.requires_grad_(False)

    def train(self, mode: bool = True) -> "AlignTowers":
        super().train(mode)
        _freeze_batchnorm(self.image_net)
        return self

    def has_image_prefix(self) -> bool:
        return self._split(len(self.image_blocks()), self.image_unlocked) > 0

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.image_head.parameters(), *self.text_head.parameters()]

    # -- image side -----------------------------------------------------------------------------
    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        blocks = self.image_blocks()
        x = pixels.contiguous(memory_format=torch.channels_last)
        for block in blocks[: self._split(len(blocks), self.image_unlocked)]:
            x = _run_block(block, x)
        return x

    def image_rest(self, prefix: torch.Tensor) -> torch.Tensor:
        blocks = self.image_blocks()
        x = prefix.float()
        for block in blocks[self._split(len(blocks), self.image_unlocked) :]:
            x = _run_block(block, x)
        return self.image_head(x.flatten(2).transpose(1, 2))

    # -- text side ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                              return_tensors="pt")

    def text_prefix(self, texts: list[str]) -> TextPrefix:
        batch = self.tokenize(texts)
        lengths = batch["attention_mask"].sum(1)
        start = self._split(len(self.text_blocks()), self.text_unlocked)
        if start == 0:
            return batch["input_ids"], lengths
        out = self.text_net(**batch, output_hidden_states=True)
        return out.hidden_states[start - 1], lengths

    def text_rest(self, prefix: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        assert mask is not None, "the text prefix is always a sequence"
        start = self._split(len(self.text_blocks()), self.text_unlocked)
        if start == 0:
            states = self.text_net(input_ids=prefix.long(), attention_mask=mask.long()).last_hidden_state
        else:
            states = prefix.float()
            additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            for layer in self.text_net.encoder.layer[start - 1 :]:
                out = layer(states, attention_mask=additive)
                states = out[0] if isinstance(out, tuple) else out
        return self.text_head(states, mask)

    # -- identity and saving --------------------------------------------------------------------
    @property
    def arch(self) -> str:
        text = self.text_backbone_name if "/" not in self.text_backbone_name else "hf"
        return f"{self.image_backbone_name}-{text}".replace(":", "_")

    def prefix_key(self, side: Literal["image", "text"]) -> dict[str, Any]:
        if side == "image":
            return {"backbone": self.image_backbone_name, "unlocked": self.image_unlocked,
                    "preprocess": asdict(self.preprocess)}
        return {"backbone": self.text_backbone_name, "unlocked": self.text_unlocked,
                "context_length": self.context_length}

    def trained_backbone_tensors(self) -> dict[str, torch.Tensor]:
        """Unlocked backbone parameters (and BatchNorm buffers of unlocked blocks) by saved name."""
        out: dict[str, torch.Tensor] = {}
        for prefix, net in (("image_tower.", self.image_net), ("text_tower.", self.text_net)):
            trained = {name for name, p in net.named_parameters() if p.requires_grad}
            out |= {prefix + name: t for name, t in net.state_dict().items() if name in trained}
        return out

    def save(self, path: Path, metadata: dict[str, Any]) -> str:
        meta = {
            "arch": self.arch,
            "image_backbone_name": self.image_backbone_name,
            "text_backbone_name": self.text_backbone_name,
            "context_length": str(self.context_length),
            "preprocess": asdict(self.preprocess),
            "unlocked": {"image": self.image_unlocked, "text": self.text_unlocked},
            **metadata,
        }
        save_heads(path, self.image_head, self.text_head, meta, dtype=torch.float16,
                   extra_tensors=self.trained_backbone_tensors())
        return f"mmrag:{self.arch}@{Path(path).resolve()}"


def _run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block may be a ModuleList of layers applied in turn (stem, final conv)."""
    if isinstance(block, nn.ModuleList):
        for layer in block:
            x = layer(x)
        return x
    return block(x)


# -- OpenCLIP-style: any open_clip architecture --------------------------------------------------
class OpenClipTowers(DualTowers):
    """An open_clip model, locked with open_clip's own `lock_image_tower` / `lock_text_tower`.

    A fully locked tower's embeddings are its prefix (cached: LiT); a tower with anything
    unlocked runs whole from pixels / token ids each step.
    """

    def __init__(self, spec: str) -> None:
        super().__init__()
        from .openclip import load_openclip

        encoder = load_openclip(spec)
        self.spec = spec
        self.model = encoder.model
        self.tokenizer = encoder.tokenizer
        self.preprocess = encoder.preprocess
        self.dim = encoder.dim
        self.context_length = encoder.context_length
        self.image_unlocked = self.text_unlocked = -1
        self.model_name = spec.partition(":")[2].partition("@")[0]

    def lock(self, image_unlocked: int, text_unlocked: int) -> None:
        self.image_unlocked, self.text_unlocked = image_unlocked, text_unlocked
        for param in self.model.parameters():
            param.requires_grad_(True)
        if image_unlocked != -1:
            self.model.lock_image_tower(unlocked_groups=image_unlocked, freeze_bn_stats=True)
        if text_unlocked != -1:
            self.model.lock_text_tower(unlocked_layers=text_unlocked, freeze_layer_norm=True)

    def has_image_prefix(self) -> bool:
        return self.image_unlocked == 0

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels) if self.image_unlocked == 0 else pixels

    def image_rest(self, prefix: torch.Tensor) -> torch.Tensor:
        return prefix.float() if self.image_unlocked == 0 else self.model.encode_image(prefix)

    def text_prefix(self, texts: list[str]) -> TextPrefix:
        ids = self.tokenizer(texts, context_length=self.context_length)
        return (self.model.encode_text(ids), None) if self.text_unlocked == 0 else (ids, None)

    def text_rest(self, prefix: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return prefix.float() if self.text_unlocked == 0 else self.model.encode_text(prefix.long())

    def prefix_key(self, side: Literal["image", "text"]) -> dict[str, Any]:
        unlocked = self.image_unlocked if side == "image" else self.text_unlocked
        return {"spec": self.spec, "unlocked": unlocked, "preprocess": asdict(self.preprocess)}

    def save(self, path: Path, metadata: dict[str, Any]) -> str:
        """An open_clip `local-dir:` folder: open_clip_config.json + open_clip_model.safetensors."""
        import open_clip
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "model_cfg": open_clip.get_model_config(self.model_name),
            "preprocess_cfg": dict(self.model.visual.preprocess_cfg),
            "mmrag": metadata,
        }
        (path / "open_clip_config.json").write_text(json.dumps(config, indent=2, default=str))
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(_untie(state), str(path / "open_clip_model.safetensors"))
        return f"openclip:local-dir:{path.resolve()}"


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy, so training never touches a backbone shared with inference towers."""
    return copy.deepcopy(module)
