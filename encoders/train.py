"""Contrastive training of the default tower's heads on cached, frozen backbone features.

The backbones never change, so their outputs are computed once and cached on disk (keyed by
backbone, view and the exact input list); every epoch after that touches only the small heads.
That makes a full run minutes on a CPU and a rerun with other head settings nearly free.

    result = train_heads(train_pairs, dev_pairs, "heads.safetensors", TrainConfig(), cache_dir)

Pairs are `(image path or PIL image, [captions])`. Images are featurised as the tower sees them at
inference (`prepare_pixels` -> `pixels_to_tensor` -> `image_tokens`), plus a mirrored copy for
augmentation; captions as MiniLM token states. The loss is CLIP's symmetric InfoNCE with a
learnable temperature; the epoch with the best mean dev recall is the one saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .heads import HeadConfig, PoolHead, save_heads
from .metrics import retrieval_recall
from .mmrag_tower import (
    ARCH,
    CONTEXT_LENGTH,
    IMAGE_BACKBONE,
    LITE0_PREPROCESS,
    TEXT_BACKBONE,
    ImageTail,
    image_tokens,
    load_efficientnet_lite0,
    load_minilm,
    text_tokens,
    trunk_tokens,
)
from .preprocess import pixels_to_tensor, prepare_pixels

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image
Pair = tuple[ImageInput, Sequence[str]]


@dataclass
class TrainConfig:
    """Everything that shapes a run; saved into the heads file's metadata."""

    dim: int = 512
    # Measured on Flickr8k dev (see encoders/weights/MODEL_CARD.md): a mean-pooled image side and
    # an attention-pooled text side with linear projections beat the larger variants, which
    # overfit 6k training images within a few epochs.
    image_pool: Literal["mean", "attn"] = "mean"
    text_pool: Literal["mean", "attn"] = "attn"
    image_attn_width: int = 256
    text_attn_width: int = 384
    attn_heads: int = 8
    #: residual MLP width after pooling (0 = linear projection only)
    hidden: int = 0
    dropout: float = 0.0
    #: learned positional embeddings on the 7x7 image grid (attention pooling only)
    image_positions: bool = False
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    init_temperature: float = 0.07
    #: "one": each step pairs every image with one random caption; "all": every caption, in
    #: as many rounds per epoch as an image has captions.
    captions: Literal["one", "all"] = "one"
    #: also featurise a horizontally mirrored copy of each training image and sample between them
    flip: bool = True
    #: stop when mean dev recall hasn't improved for this many epochs (0 = never)
    patience: int = 4
    seed: int = 0
    extract_batch_size: int = 32
    context_length: int = CONTEXT_LENGTH
    #: torch intra-op threads; None leaves torch's default
    num_threads: int | None = None
    #: unlock Lite0's tail: cache the output of its first `image_trunk_blocks` stages and train
    #: the rest (`ImageTail`: blocks[k:], conv_head, bn2; BatchNorm statistics stay frozen)
    #: with the heads, at `tail_lr`. 0 = fully frozen backbone (cached 7x7x1280 maps).
    image_trunk_blocks: int = 0
    #: also train blocks[k:] (else only conv_head and bn2's affine train)
    tail_train_blocks: bool = False
    tail_lr: float = 1e-4
    tail_weight_decay: float = 0.0
    #: storage dtype of the saved heads
    save_dtype: Literal["float16", "float32"] = "float16"


@dataclass
class TrainResult:
    """What a run produced: the file, its dev figures, and per-epoch history."""

    path: Path
    best_epoch: int
    dev_recall: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# -- feature cache -----------------------------------------------------------------------------
def _identity(image: ImageInput) -> str:
    """A stable id for cache keys: a resolved path with size and mtime, or a PIL image's pixel hash."""
    if isinstance(image, Image.Image):
        return "pil:" + hashlib.sha1(image.tobytes()).hexdigest()
    path = Path(image).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _load_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        im.load()
        return im


def image_features(
    net: Callable[[], nn.Module], images: Sequence[ImageInput], cache_dir: Path, flip: bool = False, batch_size: int = 32,
    trunk_blocks: int = 0,
) -> np.ndarray:
    """Backbone tokens (n, 49, 1280) float16 for `images` (mirrored if `flip`), cached on disk.

    With `trunk_blocks` > 0, the tokens are the output of Lite0's first `trunk_blocks` stages
    (`trunk_tokens`) instead, the input of a trainable `ImageTail`.
    `net` is called only on a cache miss, so a warm cache never loads the backbone.
    """
    if trunk_blocks:
        key = _digest(f"tf_efficientnet_lite0:blocks[:{trunk_blocks}]", LITE0_PREPROCESS, flip, [_identity(im) for im in images])
        path = cache_dir / f"img-lite0-b{trunk_blocks}-{'flip' if flip else 'orig'}-{key}.npy"
    else:
        key = _digest(IMAGE_BACKBONE, LITE0_PREPROCESS, flip, [_identity(im) for im in images])
        path = cache_dir / f"img-lite0-{'flip' if flip else 'orig'}-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    out, model = None, net()
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"image features{' (flip)' if flip else ''}", unit="batch"):
            pixels = np.stack([prepare_pixels(_load_image(im), LITE0_PREPROCESS) for im in images[start : start + batch_size]])
            if flip:
                pixels = np.ascontiguousarray(pixels[:, :, ::-1])
            tensor = pixels_to_tensor(pixels, LITE0_PREPROCESS)
            tokens = trunk_tokens(model, tensor, trunk_blocks) if trunk_blocks else image_tokens(model, tensor)
            tokens = tokens.numpy().astype(np.float16)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(images), *tokens.shape[1:]))
            out[start : start + len(tokens)] = tokens
    assert out is not None, "no images"
    out.flush()
    del out
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def text_features(
    backbone: Callable[[], tuple[object, nn.Module]], texts: Sequence[str], cache_dir: Path, context_length: int, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM token states (n, L, 384) float16 and lengths (n,) for `texts`, cached on disk.

    Texts run shortest first so batches pad little; each row is padded to the longest text.
    """
    key = _digest(TEXT_BACKBONE, context_length, list(texts))
    path = cache_dir / f"txt-minilm-{key}.npy"
    len_path = cache_dir / f"txt-minilm-{key}-lengths.npy"
    if path.is_file() and len_path.is_file():
        return np.load(path, mmap_mode="r"), np.load(len_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, model = backbone()
    lengths = np.array(
        [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=context_length)["input_ids"]]
    )
    order = np.argsort(lengths, kind="stable")
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(texts), int(lengths.max()), model.config.hidden_size))
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch"):
            idx = order[start : start + batch_size]
            states, mask = text_tokens(tokenizer, model, [texts[i] for i in idx], context_length)
            if not torch.equal(mask.sum(1), torch.from_numpy(lengths[idx]).to(mask.dtype)):
                raise RuntimeError("tokenizer lengths changed between passes")
            states = states.numpy().astype(np.float16)
            for row, i in enumerate(idx):
                out[i, : lengths[i]] = states[row, : lengths[i]]
    out.flush()
    del out
    tmp.replace(path)
    np.save(len_path, lengths)
    return np.load(path, mmap_mode="r"), lengths


@dataclass
class PairFeatures:
    """Cached backbone outputs for a list of (image, captions) pairs."""

    images: list[np.ndarray]  # one (n, 49, 1280) array per view: original, then mirrored if any
    texts: np.ndarray  # (m, L, 384)
    lengths: np.ndarray  # (m,) valid tokens per caption
    text_to_image: np.ndarray  # (m,) owning image row of each caption


def extract_features(pairs: Iterable[Pair], cache_dir: str | Path, config: TrainConfig, flip: bool = False) -> PairFeatures:
    """Featurise pairs through the frozen backbones (or read them back from `cache_dir`).

    Image tokens are the final 7x7x1280 maps, or the trunk output when
    `config.image_trunk_blocks` is set.
    """
    pairs = [(image, list(captions)) for image, captions in pairs]
    if not pairs:
        raise ValueError("no (image, captions) pairs given")
    for i, (_, captions) in enumerate(pairs):
        if not captions:
            raise ValueError(f"pair {i} has no captions")
    cache_dir = Path(cache_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    images = [image for image, _ in pairs]
    net = lru_cache(maxsize=1)(load_efficientnet_lite0)
    k = config.image_trunk_blocks
    views = [image_features(net, images, cache_dir, flip=False, batch_size=config.extract_batch_size, trunk_blocks=k)]
    if flip:
        views.append(image_features(net, images, cache_dir, flip=True, batch_size=config.extract_batch_size, trunk_blocks=k))
    texts = [caption for _, captions in pairs for caption in captions]
    owner = np.repeat(np.arange(len(pairs)), [len(captions) for _, captions in pairs])
    states, lengths = text_features(load_minilm, texts, cache_dir, config.context_length)
    return PairFeatures(views, states, lengths, owner)


# -- training ----------------------------------------------------------------------------------
def build_heads(config: TrainConfig, image_dim: int = 1280, image_tokens_n: int = 49, text_dim: int = 384) -> tuple[PoolHead, PoolHead]:
    """Fresh image and text heads as `config` describes them."""
    common = dict(out_dim=config.dim, attn_heads=config.attn_heads, hidden=config.hidden, dropout=config.dropout)
    image = HeadConfig(
        in_dim=image_dim, pool=config.image_pool, attn_width=config.image_attn_width,
        positions=image_tokens_n if config.image_positions else 0, **common,
    )
    text = HeadConfig(in_dim=text_dim, pool=config.text_pool, attn_width=config.text_attn_width, positions=0, **common)
    return PoolHead(image), PoolHead(text)


def _text_batch(states: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather caption rows, trimmed to the longest among them, with their mask."""
    lens = lengths[rows]
    width = int(lens.max())
    mask = torch.arange(width)[None, :] < lens[:, None]
    return states[rows, :width], mask


@torch.no_grad()
def embed_features(
    image_head: PoolHead, text_head: PoolHead, feats: PairFeatures, batch_size: int = 1024,
    tail: ImageTail | None = None, images: torch.Tensor | None = None, run_blocks: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of the first (unmirrored) image view and of every caption.

    With `tail`, the image tokens are trunk tokens and go through it first; `images` overrides
    the view (e.g. tokens already through the tail's blocks, with `run_blocks=False`).
    """
    image_head.eval(), text_head.eval()
    if tail is not None:
        tail.eval()
    if images is None:
        images = torch.from_numpy(np.array(feats.images[0]))
    states, lengths = torch.from_numpy(np.array(feats.texts)), torch.from_numpy(feats.lengths)

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        return image_head(tail(x, run_blocks=run_blocks) if tail is not None else x)

    img = torch.cat([image_fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    txt = torch.cat([
        text_head(*_text_batch(states, lengths, torch.arange(i, min(i + batch_size, len(states)))))
        for i in range(0, len(states), batch_size)
    ])
    norm = nn.functional.normalize
    return norm(img, dim=-1).numpy(), norm(txt, dim=-1).numpy()


def _param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms and positional embeddings stay undecayed."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            (decay if param.ndim >= 2 and not name.startswith("pos") else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_heads(
    train_pairs: Iterable[Pair],
    dev_pairs: Iterable[Pair],
    out_path: str | Path,
    config: TrainConfig | None = None,
    cache_dir: str | Path = ".cache/train-features",
    data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train both heads contrastively on frozen features; save the best dev epoch to `out_path`.

    `data` is a free-form description of the training data, stored in the file's metadata.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = extract_features(train_pairs, cache_dir, config, flip=config.flip)
    dev = extract_features(dev_pairs, cache_dir, config, flip=False)
    log.info("features ready in %.0fs: %d train images, %d captions", time.perf_counter() - started, len(train.images[0]), len(train.texts))

    # copied into memory: random batch access to a memmap would re-read the disk every step
    views = [torch.from_numpy(np.array(view)) for view in train.images]
    states, lengths = torch.from_numpy(np.array(train.texts)), torch.from_numpy(train.lengths)
    n_images = len(views[0])
    counts = np.bincount(train.text_to_image, minlength=n_images)
    # extract_features lists captions grouped by image: image i owns rows starts[i] : starts[i] + counts[i]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    tail, dev_images, run_blocks = None, None, True
    if config.image_trunk_blocks:
        tail = ImageTail(load_efficientnet_lite0(), config.image_trunk_blocks)
        for param in tail.blocks.parameters():
            param.requires_grad_(config.tail_train_blocks)
        if not config.tail_train_blocks:  # frozen blocks: run them once, not every epoch
            run_blocks = False
            views = [tail.run_blocks(view) for view in views]
            dev_images = tail.run_blocks(torch.from_numpy(np.array(dev.images[0])))
        with torch.no_grad():
            image_dim = tail(views[0][:1], run_blocks=run_blocks).shape[2]
    else:
        image_dim = views[0].shape[2]
    image_head, text_head = build_heads(config, image_dim, views[0].shape[1], states.shape[2])
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
    groups = _param_groups([image_head, text_head], config.weight_decay)
    groups[1]["params"].append(logit_scale)
    if tail is not None:
        groups.append({"params": [p for p in tail.parameters() if p.requires_grad],
                       "weight_decay": config.tail_weight_decay, "lr": config.tail_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    rounds = int(counts.max()) if config.captions == "all" else 1
    steps_per_epoch = rounds * math.ceil(n_images / config.batch_size)
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, float], dict[str, dict[str, torch.Tensor]]] | None = None
    for epoch in range(1, config.epochs + 1):
        image_head.train(), text_head.train()
        if tail is not None:
            tail.train()
        epoch_start, losses = time.perf_counter(), []
        # per image, captions drawn without replacement across the rounds of one epoch
        pick = rng.permuted(np.tile(np.arange(counts.max()), (n_images, 1)), axis=1) % counts[:, None]
        for r in range(rounds):
            order = rng.permutation(n_images)
            for start in range(0, n_images, config.batch_size):
                idx = order[start : start + config.batch_size]
                if len(idx) < 2:
                    continue
                view = rng.integers(len(views), size=len(idx))
                image_batch = torch.stack([views[v][i] for v, i in zip(view, idx)])
                caption = starts[idx] + pick[idx, r]
                text_batch, mask = _text_batch(states, lengths, torch.from_numpy(caption))
                if tail is not None:
                    image_batch = tail(image_batch, run_blocks=run_blocks)
                img = nn.functional.normalize(image_head(image_batch), dim=-1)
                txt = nn.functional.normalize(text_head(text_batch, mask), dim=-1)
                logits = logit_scale.exp().clamp(max=100) * img @ txt.T
                labels = torch.arange(len(idx))
                loss = (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
        img_emb, txt_emb = embed_features(image_head, text_head, dev, tail=tail, images=dev_images, run_blocks=run_blocks)
        recall = retrieval_recall(img_emb, txt_emb, dev.text_to_image)
        score = float(np.mean(list(recall.values())))
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "temperature": 1 / logit_scale.exp().item(),
               "dev_mean_recall": score, "seconds": time.perf_counter() - epoch_start, **recall}
        history.append(row)
        log.info("epoch %d loss %.3f dev mean R %.4f t2i R@1 %.3f i2t R@1 %.3f (%.0fs)", epoch, row["loss"], score,
                 recall["t2i_r1"], recall["i2t_r1"], row["seconds"])
        if best is None or score > best[0]:
            modules = [("image", image_head), ("text", text_head)] + ([("tail", tail)] if tail is not None else [])
            snapshot = {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in modules}
            best = (score, epoch, recall, snapshot)
        elif config.patience and epoch - best[1] >= config.patience:
            log.info("no dev improvement for %d epochs; stopping", config.patience)
            break

    assert best is not None
    _, best_epoch, best_recall, snapshot = best
    image_head.load_state_dict(snapshot["image"])
    text_head.load_state_dict(snapshot["text"])
    tail_tensors = None
    if tail is not None:
        tail.load_state_dict(snapshot["tail"])
        # only what trained is stored; the rest comes from the pretrained backbone at load time
        tail_tensors = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    seconds = time.perf_counter() - started
    metadata = {
        "arch": ARCH,
        "image_backbone": IMAGE_BACKBONE,
        "text_backbone": TEXT_BACKBONE,
        "context_length": str(config.context_length),
        "preprocess": asdict(LITE0_PREPROCESS),
        "dev_recall": best_recall,
        "best_epoch": str(best_epoch),
        "train_config": asdict(config),
        "data": data or {"train_images": n_images, "dev_images": len(dev.images[0])},
    }
    out_path = Path(out_path)
    save_heads(out_path, image_head, text_head, metadata, dtype=getattr(torch, config.save_dtype),
               image_tail=(config.image_trunk_blocks, tail_tensors) if tail_tensors is not None else None)
    log.info("saved %s (epoch %d, dev %s) in %.0fs", out_path, best_epoch, best_recall, seconds)
    return TrainResult(out_path, best_epoch, best_recall, history, seconds)
