"""Trainable heads that map frozen backbone outputs into the shared embedding space.

Both towers feed a head the same shape: a token sequence (n, T, C) plus a mask (n, T). The image
side's tokens are the 7x7 cells of the backbone's last feature map; the text side's are MiniLM's
per-token hidden states. One module type serves both, so training and inference can't drift.

A heads file is a safetensors file whose metadata holds everything needed to rebuild the modules
(`HeadConfig` per side, `dim`, format tag), so the file alone is a complete checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

HEADS_FORMAT = "mmrag-heads/1"


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of one head; stored in the weights file's metadata."""

    in_dim: int
    out_dim: int
    #: "mean": masked mean of the tokens; "attn": mean plus a mean-token-queried attention pool.
    pool: Literal["mean", "attn"] = "attn"
    attn_heads: int = 8
    #: total width of the attention pool's query/value space (split over `attn_heads`).
    attn_width: int = 256
    #: learned positional embeddings for a fixed token grid (image side); 0 = none (text side).
    positions: int = 0
    #: width of the residual MLP after pooling; 0 = a plain linear projection.
    hidden: int = 512
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens; (n, T, C), (n, T) -> (n, C)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class AttentionPool(nn.Module):
    """Multi-head attention with one query (the mean token), computed in input space.

    With a single query, q.(W_k x) = (W_k^T q).x and sum(a W_v x) = W_v sum(a x), so the keys
    and values never need projecting token by token: the cost is O(T*C) per head instead of
    O(T*C*C), which keeps training on 49 x 1280 image tokens fast on a CPU. (A key bias would
    shift every score equally, so it is left out.)
    """

    def __init__(self, dim: int, heads: int, width: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attn_width {width} is not divisible by attn_heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(dim, width)
        self.k = nn.Parameter(torch.empty(width, dim))
        self.v = nn.Parameter(torch.empty(width, dim))
        self.v_bias = nn.Parameter(torch.zeros(width))
        nn.init.xavier_uniform_(self.k)
        nn.init.xavier_uniform_(self.v)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (n, C), keys/values (n, T, C), mask (n, T) bool -> (n, width)."""
        n, h, d = query.shape[0], self.heads, self.head_dim
        q = self.q(query).view(n, h, 1, d)
        k_in = (q @ self.k.view(h, d, -1)).squeeze(2)  # (n, h, C): each head's query in input space
        scores = torch.einsum("ntc,nhc->nht", keys, k_in) / d**0.5
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        pooled = torch.einsum("nht,ntc->nhc", scores.softmax(-1), values)  # (n, h, C)
        out = torch.einsum("nhc,hdc->nhd", pooled, self.v.view(h, d, -1))
        return out.reshape(n, h * d) + self.v_bias


class PoolHead(nn.Module):
    """Pool a token sequence, then project it: LayerNorm -> pool -> linear + residual MLP."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_dim
        self.norm = nn.LayerNorm(c)
        self.pos = nn.Parameter(torch.zeros(1, config.positions, c)) if config.positions else None
        self.attn = AttentionPool(c, config.attn_heads, config.attn_width) if config.pool == "attn" else None
        width = c + (config.attn_width if self.attn is not None else 0)
        self.drop = nn.Dropout(config.dropout)
        self.proj = nn.Linear(width, config.out_dim)
        if config.hidden:
            self.mlp = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, config.hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, config.out_dim),
            )
        else:
            self.mlp = None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T, C) tokens, optional (n, T) bool mask -> (n, out_dim) unnormalised features."""
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        mask = mask.bool()
        x = self.norm(tokens.float())
        pooled = masked_mean(x, mask)
        if self.attn is not None:
            keys = x + self.pos if self.pos is not None else x
            pooled = torch.cat([pooled, self.attn(pooled, keys, x, mask)], dim=-1)
        pooled = self.drop(pooled)
        out = self.proj(pooled)
        if self.mlp is not None:
            out = out + self.mlp(pooled)
        return out


def save_heads(
    path: str | Path,
    image_head: PoolHead,
    text_head: PoolHead,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write both heads to one safetensors file; configs and extra `metadata` go in its header.

    `extra_tensors` (e.g. `image_tower.<name>`: trained backbone blocks) are stored as named;
    backbone tensors not listed keep their pretrained values at load time.
    """
    tensors = {f"image.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in image_head.state_dict().items()}
    tensors |= {f"text.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in text_head.state_dict().items()}
    header = {
        "format": HEADS_FORMAT,
        "dim": str(image_head.config.out_dim),
        "image_head": json.dumps(asdict(image_head.config)),
        "text_head": json.dumps(asdict(text_head.config)),
    }
    for key, value in (extra_tensors or {}).items():
        if key.split(".")[0] in ("image", "text"):
            raise ValueError(f"extra tensor {key!r} would collide with a head's tensors")
        tensors[key] = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
    for key, value in (metadata or {}).items():
        header.setdefault(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)


def load_heads(path: str | Path) -> tuple[PoolHead, PoolHead, dict[str, str]]:
    """Rebuild both heads (float32, eval mode) from a file written by `save_heads`."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != HEADS_FORMAT:
            raise ValueError(f"{path} is not an mmrag heads file (format={meta.get('format')!r})")
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    heads = []
    for side in ("image", "text"):
        head = PoolHead(HeadConfig.from_dict(json.loads(meta[f"{side}_head"])))
        prefix = f"{side}."
        head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        heads.append(head.eval())
    if heads[0].config.out_dim != heads[1].config.out_dim:
        raise ValueError(f"{path}: image and text heads disagree on dim")
    return heads[0], heads[1], meta


def load_prefixed_tensors(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a heads file stored under `prefix` (e.g. "image_tower."), prefix removed, float32."""
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix) :]: _as_float32(f.get_tensor(k)) for k in f.keys() if k.startswith(prefix)}


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor
