"""diffusers bridge: condition a Stable Diffusion pipeline on an mmrag text tower.

    from mmrag.encoders import load_encoder
    from mmrag.integrations.diffusers import swap_text_encoder

    encoder = load_encoder("openclip:ViT-H-14@laion2b_s32b_b79k")
    swapped = swap_text_encoder(pipe, encoder, layer="penultimate")   # SD 2.x conditioning
    images = swapped("a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=25).images

Design: the pipeline is not forked and not patched. `encode_prompt` turns prompts into the
per-token hidden states a UNet cross-attends to, and `swap_text_encoder` returns a thin callable
that passes them to the pipeline as `prompt_embeds` / `negative_prompt_embeds`, the path diffusers
documents for bringing your own text encoder. A tokenizer shim would have to imitate
`CLIPTokenizer` and `CLIPTextModel` outputs and would still truncate long prompts at
`tokenizer.model_max_length`; the embeds path lets mmrag chunk long prompts and needs neither.

Needs the `diffusers` extra (`pip install 'mmrag[diffusers]'`). See docs/diffusers.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

try:
    import diffusers  # noqa: F401  (the extra's marker; pipelines are duck-typed below)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mmrag.integrations.diffusers needs diffusers; install it with pip install 'mmrag[diffusers]'"
    ) from exc

from mmrag.encoders import Encoder

__all__ = [
    "PromptEmbeds",
    "SwappedPipeline",
    "TextAdapter",
    "encode_prompt",
    "enable_memory_efficient_attention",
    "split_prompt",
    "swap_text_encoder",
    "train_adapter",
]

log = logging.getLogger(__name__)

Layer = int | Literal["last", "penultimate"]


@dataclass
class PromptEmbeds:
    """What `encode_prompt` returns; shapes are (n * num_images_per_prompt, chunks * context, width).

    The pooled fields are for pipelines that want a pooled vector (SDXL); they are None here,
    since SD 1.x/2.x UNets read only the per-token states.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


# -- prompts -> per-token states ------------------------------------------------------------------
def split_prompt(encoder: Encoder, text: str) -> list[str]:
    """Cut `text` at word boundaries into pieces that each fit the tower's context.

    A prompt that fits is returned whole, so its first (only) chunk is exactly its standalone
    encoding. Words are packed greedily by their token counts; a single word longer than the
    context is left to the tower, which truncates it.
    """
    context = encoder.context_length
    if encoder.count_tokens([text])[0] <= context:
        return [text]
    words = text.split()
    specials = encoder.count_tokens([""])[0]  # start/end tokens every piece carries
    budget = context - specials
    sizes = [count - specials for count in encoder.count_tokens(words)]
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for word, size in zip(words, sizes):
        if current and used + size > budget:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(word)
        used += size
    chunks.append(" ".join(current))
    return chunks


def encode_prompt(
    encoder: Encoder,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    layer: Layer = -1,
    num_images_per_prompt: int = 1,
    adapter: nn.Module | None = None,
) -> PromptEmbeds:
    """Prompts -> `prompt_embeds` and `negative_prompt_embeds` for a diffusers pipeline.

    layer: -1 or "last" (the last block, through the final layer norm), "penultimate" (the
        second-to-last block through the final layer norm: SD 2.x's OpenCLIP conditioning and
        diffusers' `clip_skip=1`), or a block index. Only towers with selectable layers
        (open_clip) accept anything but the last.
    Chunking: a prompt over the tower's context is split at word boundaries (`split_prompt`);
        each chunk is encoded alone at full context length and the chunks are concatenated.
        Every prompt and negative prompt in the call is padded with encodings of the empty
        prompt to the largest chunk count, so all share one length.
    negative_prompts: None means the empty prompt; one string applies to every prompt.
    adapter: optional module applied last, mapping the tower's width to the UNet's.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompt needs at least one prompt")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")

    index = _resolve_layer(encoder, layer)
    texts = prompts + negative_prompts
    pieces = [split_prompt(encoder, text) if text.strip() else [] for text in texts]
    flat = [piece for chunks in pieces for piece in chunks]
    with _text_layer(encoder, index), torch.no_grad():
        states = _encode_pieces(encoder, flat) if flat else None
        empty = _encode_empty(encoder, states)

    most = max(1, *(len(chunks) for chunks in pieces))
    rows, start = [], 0
    for chunks in pieces:
        own = [states[start + i] for i in range(len(chunks))]
        start += len(chunks)
        rows.append(torch.cat(own + [empty] * (most - len(own)), dim=0))
    embeds = torch.stack(rows)
    if adapter is not None:
        with torch.no_grad():
            embeds = adapter(embeds.to(next(adapter.parameters()).device))
    embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
    n = len(prompts) * num_images_per_prompt
    return PromptEmbeds(prompt_embeds=embeds[:n], negative_prompt_embeds=embeds[n:])


def _resolve_layer(encoder: Encoder, layer: Layer) -> int:
    index = {"last": -1, "penultimate": -2}.get(layer, layer) if isinstance(layer, str) else layer
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"layer must be an int, 'last' or 'penultimate', got {layer!r}")
    if index == -1:
        return index
    if not hasattr(encoder, "text_layer"):
        raise ValueError(
            f"{type(encoder).__name__} exposes only its last text layer; layer={layer!r} needs a tower "
            "with selectable layers (an open_clip tower)"
        )
    blocks = _text_block_count(encoder)
    if blocks is not None and not -blocks <= index < blocks:
        raise ValueError(f"layer {layer!r} is out of range for a text tower with {blocks} blocks")
    return index


def _text_block_count(encoder: Encoder) -> int | None:
    model = getattr(encoder, "model", None)
    transformer = getattr(model, "transformer", None) or getattr(getattr(model, "text", None), "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    return len(blocks) if blocks is not None else None


class _text_layer:
    """Set `encoder.text_layer` for the duration of a call (open_clip towers only)."""

    def __init__(self, encoder: Encoder, index: int) -> None:
        self.encoder, self.index = encoder, index

    def __enter__(self) -> None:
        self.saved = getattr(self.encoder, "text_layer", None)
        if self.saved is not None:
            self.encoder.text_layer = self.index

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.encoder.text_layer = self.saved


def _keeps_pad_states(encoder: Encoder) -> bool:
    """CLIP-style towers pad to the full context and UNets trained on them read the pad-token
    states (SD feeds all 77); other towers pad per batch, so their pad states are zeroed."""
    return hasattr(encoder, "text_layer")


def _encode_pieces(encoder: Encoder, pieces: list[str]) -> torch.Tensor:
    """Chunk texts -> (m, context, width), the same for a chunk whatever else is in the batch."""
    hidden, mask = encoder.encode_text_tokens(pieces)
    hidden = hidden.clone()  # leave inference mode, so an adapter can train on it
    context = encoder.context_length
    if _keeps_pad_states(encoder) and hidden.shape[1] == context:
        return hidden
    hidden = hidden * mask[..., None].to(hidden.dtype)
    if hidden.shape[1] >= context:
        return hidden[:, :context]
    pad = hidden.new_zeros(hidden.shape[0], context - hidden.shape[1], hidden.shape[2])
    return torch.cat([hidden, pad], dim=1)


def _encode_empty(encoder: Encoder, states: torch.Tensor | None) -> torch.Tensor:
    """The empty prompt: open_clip encodes "" (start, end, padding) as diffusers does; towers
    that refuse empty text get zeros, as SDXL's `force_zeros_for_empty_prompt` does."""
    if _keeps_pad_states(encoder) and hasattr(encoder, "tokenize") and hasattr(encoder, "_token_states"):
        return encoder._token_states(encoder.tokenize([""]))[0].clone()
    if states is None:
        states, _ = encoder.encode_text_tokens(["a"])
    return states.new_zeros(encoder.context_length, states.shape[-1])


# -- width adapter ---------------------------------------------------------------------------------
class TextAdapter(nn.Module):
    """A learned linear map from the tower's width to the UNet's `cross_attention_dim`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.proj = nn.Linear(self.in_dim, self.out_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.proj(states)

    def save(self, path: str | Path) -> Path:
        """Weights and widths in one safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"in_dim": str(self.in_dim), "out_dim": str(self.out_dim)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TextAdapter":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "in_dim" not in meta or "out_dim" not in meta:
            raise ValueError(f"{path} has no in_dim/out_dim metadata; was it written by TextAdapter.save?")
        adapter = cls(int(meta["in_dim"]), int(meta["out_dim"]))
        adapter.load_state_dict(load_file(str(path)))
        return adapter.eval()


def train_adapter(
    encoder: Encoder,
    target: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[str],
    adapter: TextAdapter | None = None,
    layer: Layer = -1,
    steps: int = 200,
    lr: float = 1e-2,
) -> tuple[TextAdapter, list[float]]:
    """Fit a `TextAdapter` so the tower's states, mapped, regress onto a target text encoder's.

    `target(prompts)` returns (n, L_t, out_dim) states for the same prompts, e.g. the pipeline's
    own CLIP text encoder (see docs/diffusers.md). When the tower's length (chunks x context)
    equals L_t the loss is token-wise MSE (same tokenizer, e.g. CLIP BPE at 77); otherwise the
    token-averaged states are matched, since positions of different tokenizers do not line up.
    Full-batch Adam for `steps` steps; returns the adapter (eval mode) and the loss per step.
    """
    prompts = list(prompts)
    source = encode_prompt(encoder, prompts, layer=layer).prompt_embeds.float()
    with torch.no_grad():
        goal = target(prompts).float().to(source.device)
    if adapter is None:
        adapter = TextAdapter(source.shape[-1], goal.shape[-1])
    adapter.to(source.device).train()
    if source.shape[1] != goal.shape[1]:
        source, goal = source.mean(dim=1), goal.mean(dim=1)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(adapter(source), goal)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return adapter.eval(), losses


# -- pipelines --------------------------------------------------------------------------------------
def enable_memory_efficient_attention(pipe: Any) -> bool:
    """xformers attention when xformers is installed and the UNet is on a CUDA GPU; else log why not."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        log.info("xformers is not installed; keeping the pipeline's default attention (pip install 'mmrag[gpu]')")
        return False
    device = getattr(pipe, "device", torch.device("cpu"))
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        log.info("memory-efficient attention needs a CUDA GPU; the pipeline is on %s, keeping default attention", device)
        return False
    pipe.enable_xformers_memory_efficient_attention()
    return True


class SwappedPipeline:
    """A diffusers pipeline conditioned by an mmrag tower: call it like the pipeline.

    Prompts go through `encode_prompt` and reach the pipeline as `prompt_embeds` and
    `negative_prompt_embeds`; every other keyword is the pipeline's own. The pipeline itself
    is unchanged and stays reachable as `.pipe`.
    """

    def __init__(self, pipe: Any, encoder: Encoder, adapter: nn.Module | None = None, layer: Layer = -1) -> None:
        self.pipe, self.encoder, self.adapter, self.layer = pipe, encoder, adapter, layer

    def encode_prompt(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
    ) -> PromptEmbeds:
        return encode_prompt(self.encoder, prompt, negative_prompt, layer=self.layer, adapter=self.adapter)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        **kwargs: Any,
    ) -> Any:
        clash = sorted({"prompt_embeds", "negative_prompt_embeds"} & kwargs.keys())
        if clash:
            raise ValueError(f"SwappedPipeline computes {clash} itself; call .pipe directly to pass your own")
        embeds = self.encode_prompt(prompt, negative_prompt)
        return self.pipe(
            prompt_embeds=embeds.prompt_embeds,
            negative_prompt_embeds=embeds.negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"SwappedPipeline({type(self.pipe).__name__}, {self.encoder!r}, layer={self.layer!r})"


def swap_text_encoder(
    pipe: Any,
    encoder: Encoder,
    adapter: nn.Module | None = None,
    layer: Layer = -1,
    memory_efficient_attention: bool = True,
) -> SwappedPipeline:
    """Condition a StableDiffusionPipeline-layout pipeline (SD 1.x/2.x) on `encoder`'s text tower.

    The tower's width must equal the UNet's `cross_attention_dim`, or `adapter` must map one to
    the other (a `TextAdapter`); a mismatch raises ValueError naming both widths. SDXL (two text
    encoders plus pooled embeds) raises NotImplementedError. The pipeline's own tokenizer and
    text encoder are not used; build it with `text_encoder=None, tokenizer=None` to save memory.
    """
    if hasattr(pipe, "text_encoder_2") or "XL" in type(pipe).__name__:
        raise NotImplementedError(
            f"{type(pipe).__name__} needs two text encoders' states plus pooled embeds (SDXL); "
            "mmrag swaps the single text encoder of SD 1.x/2.x pipelines only"
        )
    unet = getattr(pipe, "unet", None)
    cross = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if not isinstance(cross, int):
        raise ValueError(
            f"{type(pipe).__name__} has no UNet with an int cross_attention_dim (got {cross!r}); "
            "expected a StableDiffusionPipeline layout"
        )
    _resolve_layer(encoder, layer)
    width = int(encoder.encode_text_tokens(["a"])[0].shape[-1])
    if adapter is None and width != cross:
        raise ValueError(
            f"the text tower {encoder.spec!r} is {width} wide but the UNet's cross_attention_dim is {cross}; "
            f"pass adapter=TextAdapter({width}, {cross}) (trained with train_adapter) to map between them"
        )
    if adapter is not None:
        in_dim, out_dim = getattr(adapter, "in_dim", None), getattr(adapter, "out_dim", None)
        if (in_dim, out_dim) != (None, None) and (in_dim, out_dim) != (width, cross):
            raise ValueError(
                f"the adapter maps {in_dim} -> {out_dim}, but the tower is {width} wide "
                f"and the UNet's cross_attention_dim is {cross}"
            )
    if memory_efficient_attention:
        enable_memory_efficient_attention(pipe)
    return SwappedPipeline(pipe, encoder, adapter=adapter, layer=layer)
