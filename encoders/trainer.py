"""Contrastive training of dual towers (ALIGN-style or OpenCLIP-style), with accelerate.

    towers = AlignTowers("lite0", "minilm")          # or OpenClipTowers("openclip:ViT-B-32")
    result = train_towers(towers, train_pairs, dev_pairs, "runs/lite0", TrainConfig(loss="siglip"))
    load_encoder(result.spec)                        # the trained tower, ready to index with

Pairs are `(image path or PIL image, [captions])`, as the manifests `mmrag index` reads give them.

How a run goes:
- Each tower is locked except its last `*_unlocked` blocks. The locked prefix of each side is
  computed once per input and cached under `cache_dir` (keyed by the tower, its lock point and
  the inputs: per image, per caption list); with random-crop augmentation the image prefix is recomputed each step from
  cached pixels instead, since its input changes.
- Each epoch pairs every training image with one caption drawn at random; batches are shuffled
  with a generator seeded by (seed, epoch), so a resumed run replays exactly what an
  uninterrupted one does.
- accelerate handles mixed precision, gradient accumulation and devices; launched with
  `accelerate launch` on several GPUs, each process takes its share of every batch and
  computes the loss over it (no feature gathering across processes).
- After each epoch: dev recall, a checkpoint (`checkpoint/`, accelerate state in safetensors,
  plus `trainer_state.json`), `history.json` and `curves.png`. The best epoch by mean dev
  recall is saved as the model (`model.safetensors` or `model/`), whose spec is returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .losses import make_loss
from .metrics import retrieval_recall
from .preprocess import pixels_to_tensor, prepare_pixels
from .towers import AlignTowers, DualTowers

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image
Pair = tuple[ImageInput, Sequence[str]]


@dataclass
class TrainConfig:
    """Everything that shapes a run; saved with the model and in `trainer_state.json`."""

    loss: Literal["clip", "align", "siglip"] = "clip"
    #: ALIGN's label smoothing (used by loss="align" only)
    label_smoothing: float = 0.1
    #: blocks to train at the end of each tower: 0 = locked, -1 = all
    image_unlocked: int = 0
    text_unlocked: int = 0
    #: "none"; "flip": original or mirrored copy (both cached); "flip-gray": original, mirrored or
    #: grey copy (all cached; grey photos are rare in caption sets, common in users' folders);
    #: "crop": random resized crop + flip
    augment: Literal["none", "flip", "flip-gray", "crop"] = "flip"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    #: learning rate of unlocked pretrained blocks (heads and loss scale use `lr`)
    backbone_lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    #: accelerate's mixed_precision: "no", "bf16" or "fp16"
    precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accumulation: int = 1
    #: stop when mean dev recall has not improved for this many epochs (0 = never)
    patience: int = 4
    #: which epoch becomes the model: "best" mean dev recall, or "last" (for a fixed recipe, or
    #: when the dev split is also trained on and so cannot choose; patience is then ignored)
    keep: Literal["best", "last"] = "best"
    seed: int = 0
    extract_batch_size: int = 64
    #: torch intra-op threads; None leaves torch's default
    num_threads: int | None = None


@dataclass
class TrainResult:
    """What a run produced: the spec that loads it, its dev figures, and per-epoch history."""

    spec: str
    path: Path
    best_epoch: int
    dev_recall: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# -- cached prefixes -----------------------------------------------------------------------------
def _identity(image: ImageInput) -> str:
    """A stable cache id: resolved path with size and mtime, or a PIL image's pixel hash."""
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


def _save_atomic(path: Path, values: np.ndarray) -> None:
    """np.save through a temporary file, so an interrupted run never leaves a truncated entry."""
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, values)
    tmp.replace(path)


def _store_dtype(tensor: torch.Tensor) -> np.dtype:
    return np.dtype(np.float16) if tensor.is_floating_point() else np.dtype(np.int32)


class FeatureCache:
    """Prefix outputs on disk as .npy files.

    Image prefixes are stored one file per image (under a folder keyed by the tower's prefix and
    the view), so a training set that grows, or train+dev after train, computes only the new
    images. Caption prefixes are stored one file per caption list: they are quick to recompute.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def images(self, towers: DualTowers, images: Sequence[ImageInput], view: str, batch_size: int) -> np.ndarray:
        """Image prefix outputs (n, ...) for one view (see `apply_view`), or "pixels": raw uint8."""
        side = _digest(towers.prefix_key("image") if view != "pixels" else asdict(towers.preprocess), view)
        folder = self.folder / f"image-{view}-{side}"
        paths = [folder / f"{_digest(_identity(im))}.npy" for im in images]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            with torch.inference_mode():
                for start in tqdm(range(0, len(missing), batch_size), desc=f"image prefixes ({view})", unit="batch"):
                    rows = missing[start : start + batch_size]
                    pixels = np.stack([prepare_pixels(_load_image(images[i]), towers.preprocess) for i in rows])
                    pixels = apply_view(pixels, view)
                    if view != "pixels":
                        pixels = towers.image_prefix(pixels_to_tensor(pixels, towers.preprocess)).numpy().astype(np.float16)
                    for i, values in zip(rows, pixels):
                        _save_atomic(paths[i], values)
        if not paths:
            raise ValueError("no images to featurise")
        return np.stack([np.load(path) for path in tqdm(paths, desc=f"reading {view} cache", unit="image", leave=False)])

    def texts(self, towers: DualTowers, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Text prefix outputs, shortest texts first so that batches pad little; with lengths if sequences."""
        key = _digest(towers.prefix_key("text"), list(texts))
        path, len_path = self.folder / f"text-{key}.npy", self.folder / f"text-{key}-lengths.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r"), (np.load(len_path) if len_path.is_file() else None)
        order = np.argsort([len(t) for t in texts], kind="stable")
        rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), desc="text prefixes", unit="batch"):
                idx = order[start : start + batch_size]
                values, lengths = towers.text_prefix([texts[i] for i in idx])
                rows.append((values.numpy().astype(_store_dtype(values)), None if lengths is None else lengths.numpy()))
        width = max(v.shape[1] for v, _ in rows) if rows[0][1] is not None else None
        first = rows[0][0]
        shape = (len(texts), width, *first.shape[2:]) if width is not None else (len(texts), *first.shape[1:])
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=shape)
        all_lengths = np.zeros(len(texts), np.int64)
        start = 0
        for values, lengths in rows:
            idx = order[start : start + len(values)]
            if width is None:
                out[idx] = values
            else:
                out[idx, : values.shape[1]] = values
                all_lengths[idx] = lengths
            start += len(values)
        out.flush()
        del out
        if width is not None:
            np.save(len_path, all_lengths)
        tmp.replace(path)
        return np.load(path, mmap_mode="r"), (all_lengths if width is not None else None)


@dataclass
class Features:
    """Everything a split contributes to training, in memory: image views, captions, owners."""

    images: list[torch.Tensor]  # one (n, ...) tensor per view; uint8 pixels when augment="crop"
    texts: torch.Tensor  # (m, L, ...) or (m, d)
    lengths: torch.Tensor | None  # (m,) valid tokens per caption, when texts are sequences
    owner: np.ndarray  # (m,) image row of each caption
    pixels: bool = False


def featurise(towers: DualTowers, pairs: Sequence[Pair], cache: FeatureCache, views: Sequence[str], batch_size: int) -> Features:
    """Cached prefixes of a split's images (one array per view) and of all its captions."""
    images = [image for image, _ in pairs]
    arrays = [cache.images(towers, images, view, batch_size) for view in views]
    texts = [caption for _, captions in pairs for caption in captions]
    owner = np.repeat(np.arange(len(pairs)), [len(captions) for _, captions in pairs])
    values, lengths = cache.texts(towers, texts, batch_size=128)
    # captions copied into memory: random batch access to a memmap would re-read the disk every step
    return Features([torch.from_numpy(a) for a in arrays], torch.from_numpy(np.array(values)),
                    None if lengths is None else torch.from_numpy(lengths), owner, pixels=views == ["pixels"])


def text_batch(feats: Features, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caption prefixes for `rows`, trimmed to the longest among them, with their bool mask."""
    if feats.lengths is None:
        return feats.texts[rows], None
    lens = feats.lengths[rows]
    width = int(lens.max())
    mask = torch.arange(width)[None, :] < lens[:, None]
    return feats.texts[rows, :width], mask


# -- augmentation --------------------------------------------------------------------------------
#: the cached image views of each augmentation (with cached prefixes, one is drawn per image per epoch)
VIEWS = {"none": ["orig"], "flip": ["orig", "flip"], "flip-gray": ["orig", "flip", "gray"]}


def grayscale(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> the same shape in grey (ITU-R 601 luma, as PIL's convert("L"))."""
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.round(luma).astype(np.uint8)[..., None], 3, axis=-1)


def apply_view(pixels: np.ndarray, view: str) -> np.ndarray:
    """uint8 (n, s, s, 3) -> one cached view of them: "orig" (or "pixels"), "flip" or "gray"."""
    if view == "flip":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    if view == "gray":
        return grayscale(pixels)
    return pixels


def crop_and_flip(pixels: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, s, s, 3) -> random resized crops (area fraction in `scale`), half mirrored."""
    from torchvision.transforms.v2 import functional as TF

    n, size = len(pixels), pixels.shape[1]
    out = torch.empty_like(pixels)
    area = torch.empty(n).uniform_(*scale, generator=generator)
    ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    flips = torch.rand(n, generator=generator) < 0.5
    for i in range(n):
        w = int(round(min(size, size * math.sqrt(area[i] * ratio[i]))))
        h = int(round(min(size, size * math.sqrt(area[i] / ratio[i]))))
        top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        img = TF.resized_crop(pixels[i].permute(2, 0, 1), top, left, h, w, [size, size], antialias=True)
        out[i] = (img.flip(-1) if flips[i] else img).permute(1, 2, 0)
    return out


# -- evaluation and pictures ----------------------------------------------------------------------
@torch.no_grad()
def embed_split(towers: DualTowers, feats: Features, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of a split's first image view and of all its captions."""
    towers.eval()
    images = feats.images[0]
    norm = torch.nn.functional.normalize
    img = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if feats.pixels:
            chunk = towers.image_prefix(pixels_to_tensor(chunk.numpy(), towers.preprocess))
        img.append(towers.image_rest(chunk).float())
    txt = [towers.text_rest(*text_batch(feats, torch.arange(i, min(i + batch_size, len(feats.texts))))).float()
           for i in range(0, len(feats.texts), batch_size)]
    return norm(torch.cat(img), dim=-1).numpy(), norm(torch.cat(txt), dim=-1).numpy()


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Training loss and dev recall@1/@5 per epoch, as one PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [row["loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("t2i_r1", "text->image R@1"), ("i2t_r1", "image->text R@1"),
                       ("t2i_r5", "text->image R@5"), ("i2t_r5", "image->text R@5")):
        right.plot(epochs, [100 * row[key] for row in history], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="dev recall (%)", title="dev retrieval")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the loop -----------------------------------------------------------------------------------
class ContrastiveModel(torch.nn.Module):
    """Towers plus loss in one module, so accelerate prepares (autocasts, wraps) a single forward."""

    def __init__(self, towers: DualTowers, loss: torch.nn.Module) -> None:
        super().__init__()
        self.towers, self.loss = towers, loss

    def forward(self, image_prefix: torch.Tensor, text_prefix: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        image, text = self.towers(image_prefix, text_prefix, text_mask)
        norm = torch.nn.functional.normalize
        return self.loss(norm(image.float(), dim=-1), norm(text.float(), dim=-1))


def _param_groups(model: ContrastiveModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Heads and loss at `lr`, pretrained blocks at `backbone_lr`; matrices decayed, the rest not."""
    new = {id(p) for p in [*model.towers.head_parameters(), *model.loss.parameters()]}
    if not isinstance(model.towers, AlignTowers):  # open_clip: every unlocked weight is "the model"
        new = {id(p) for p in model.parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.ndim >= 2 and "pos" not in name.split(".")[-1] and "embedding" not in name
            groups.setdefault((id(param) in new, decay), []).append(param)
    return [{"params": params, "lr": config.lr if is_new else config.backbone_lr,
             "weight_decay": config.weight_decay if decay else 0.0}
            for (is_new, decay), params in groups.items()]


def _schedule(total: int, warmup: int):
    return lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def train_towers(
    towers: DualTowers,
    train_pairs: Iterable[Pair],
    dev_pairs: Iterable[Pair],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    cache_dir: str | Path = ".cache/train-features",
    *,
    resume: bool = True,
    stop_after: int | None = None,
    data: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `towers` contrastively; evaluate, checkpoint and plot each epoch; save the best.

    With `resume` (the default) a run continues from `out_dir/checkpoint` when one is there.
    `stop_after` ends this call after that many epochs in total, as an interruption would
    (the next call with `resume` carries on). `data` describes the data, for the model's metadata.
    """
    from accelerate import Accelerator

    config = config or TrainConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    train_pairs, dev_pairs = _check_pairs(train_pairs, "train"), _check_pairs(dev_pairs, "dev")
    torch.manual_seed(config.seed)
    loss_fn = make_loss(config.loss, config.label_smoothing)
    towers.lock(config.image_unlocked, config.text_unlocked)

    cache = FeatureCache(cache_dir)
    # Pixels are cached instead of prefixes when the prefix is the identity (nothing locked at
    # the start of the image tower) or when random crops change its input every step.
    pixels_mode = config.augment == "crop" or not towers.has_image_prefix()
    views = ["pixels"] if pixels_mode else VIEWS[config.augment]
    train = featurise(towers, train_pairs, cache, views, config.extract_batch_size)
    dev = featurise(towers, dev_pairs, cache, ["pixels"] if pixels_mode else ["orig"], config.extract_batch_size)
    log.info("features ready in %.0fs: %d train images, %d captions", time.perf_counter() - started, len(train_pairs), len(train.texts))

    accelerator = Accelerator(mixed_precision=config.precision, gradient_accumulation_steps=config.grad_accumulation, cpu=not torch.cuda.is_available())
    model = ContrastiveModel(towers, loss_fn)
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr)
    n_images = len(train_pairs)
    micro_steps = math.ceil(n_images / config.batch_size)
    total = config.epochs * math.ceil(micro_steps / config.grad_accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state_path, checkpoint = out_dir / "trainer_state.json", out_dir / "checkpoint"
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_score": -1.0, "best_recall": {}, "spec": ""}
    if resume and state_path.is_file() and checkpoint.is_dir():
        saved = json.loads(state_path.read_text())
        if saved.get("config") != _jsonable(config):
            raise ValueError(f"{out_dir} holds a run with another config; pass resume=False (--no-resume) or another folder")
        state = saved
        accelerator.load_state(str(checkpoint))
        log.info("resumed %s after epoch %d", out_dir, state["epoch"])

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if stop_after is not None and epoch > stop_after:
            break
        epoch_start = time.perf_counter()
        losses = _train_epoch(accelerator, model, optimizer, scheduler, train, config, epoch)
        train_seconds = time.perf_counter() - epoch_start
        unwrapped: ContrastiveModel = accelerator.unwrap_model(model)
        recall = retrieval_recall(*embed_split(unwrapped.towers, dev), dev.owner)
        score = float(np.mean(list(recall.values())))
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "temperature": unwrapped.loss.temperature,
               "dev_mean_recall": score, "seconds": time.perf_counter() - epoch_start,
               "pairs_per_second": n_images / train_seconds, **recall}
        state["history"].append(row)
        log.info("epoch %d loss %.3f dev mean R %.4f t2i R@1 %.3f i2t R@1 %.3f (%.0fs)", epoch, row["loss"], score,
                 recall["t2i_r1"], recall["i2t_r1"], row["seconds"])
        if accelerator.is_main_process:
            if score > state["best_score"] or config.keep == "last":
                metadata = {"train_config": _jsonable(config), "dev_recall": recall, "best_epoch": epoch,
                            "data": data or {"train_images": n_images, "dev_images": len(dev_pairs)}}
                state["spec"] = unwrapped.towers.save(_model_path(out_dir, unwrapped.towers), metadata)
                state.update(best_epoch=epoch, best_score=score, best_recall=recall)
            state.update(epoch=epoch, config=_jsonable(config))
            accelerator.save_state(str(checkpoint))
            _write_json(state_path, state)
            _write_json(out_dir / "history.json", state["history"])
            plot_curves(state["history"], out_dir / "curves.png", title=f"{type(towers).__name__}, loss={config.loss}")
        accelerator.wait_for_everyone()
        if config.keep == "best" and config.patience and epoch - state["best_epoch"] >= config.patience:
            log.info("no dev improvement for %d epochs; stopping", config.patience)
            break

    seconds = time.perf_counter() - started
    return TrainResult(state["spec"], _model_path(out_dir, towers), state["best_epoch"], state["best_recall"],
                       state["history"], seconds)


def _train_epoch(accelerator, model, optimizer, scheduler, train: Features, config: TrainConfig, epoch: int) -> list[float]:
    """One pass over the training images, each with one caption drawn for this epoch; the losses.

    Every random choice comes from generators seeded by (seed, epoch), never from the state a
    previous epoch left behind: that is what makes a resumed run equal an uninterrupted one.
    """
    towers: DualTowers = accelerator.unwrap_model(model).towers
    n_images = len(train.images[0])
    counts = np.bincount(train.owner, minlength=n_images)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # captions are grouped by image
    rng = np.random.default_rng([config.seed, epoch])
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    torch.manual_seed(config.seed * 100_003 + epoch)  # dropout
    order = rng.permutation(n_images)
    captions = starts + rng.integers(0, counts)
    view_of = rng.integers(len(train.images), size=n_images)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(0, n_images, config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
               disable=not accelerator.is_local_main_process)
    for start in bar:
        idx = order[start : start + config.batch_size]
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share
        if len(idx) < 2:
            continue
        image_in = _image_batch(towers, train, idx, view_of, config, generator)
        text_in, mask = text_batch(train, torch.from_numpy(captions[idx]))
        device = accelerator.device
        with accelerator.accumulate(model):
            loss = model(image_in.to(device), text_in.to(device), None if mask is None else mask.to(device))
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            accelerator.unwrap_model(model).loss.clamp_()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _image_batch(towers: DualTowers, feats: Features, idx: np.ndarray, view_of: np.ndarray, config: TrainConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """Cached prefixes of the batch's images (random view each), or augmented pixels through the prefix."""
    if not feats.pixels:
        rows = torch.from_numpy(idx)
        if len(feats.images) == 1:
            return feats.images[0][rows]
        picks = torch.from_numpy(view_of[idx])
        return torch.stack([feats.images[v][i] for v, i in zip(picks.tolist(), rows.tolist())])
    pixels = feats.images[0][torch.from_numpy(idx)]
    if config.augment == "crop":
        pixels = crop_and_flip(pixels, config.crop_scale, generator)
    elif config.augment == "flip":
        flips = torch.rand(len(pixels), generator=generator) < 0.5
        pixels = torch.where(flips[:, None, None, None], pixels.flip(2), pixels)
    elif config.augment == "flip-gray":
        picks = torch.randint(len(VIEWS["flip-gray"]), (len(pixels),), generator=generator).tolist()
        pixels = torch.from_numpy(np.stack([apply_view(p[None].numpy(), VIEWS["flip-gray"][v])[0] for p, v in zip(pixels, picks)]))
    if not towers.has_image_prefix():
        return pixels_to_tensor(pixels.numpy(), towers.preprocess)
    with torch.no_grad():
        return towers.image_prefix(pixels_to_tensor(pixels.numpy(), towers.preprocess))


def _model_path(out_dir: Path, towers: DualTowers) -> Path:
    return out_dir / ("model.safetensors" if isinstance(towers, AlignTowers) else "model")


def _check_pairs(pairs: Iterable[Pair], split: str) -> list[tuple[ImageInput, list[str]]]:
    pairs = [(image, [c for c in captions if c.strip()]) for image, captions in pairs]
    if not pairs:
        raise ValueError(f"no {split} (image, captions) pairs given")
    empty = [i for i, (_, captions) in enumerate(pairs) if not captions]
    if empty:
        raise ValueError(f"{split} pair {empty[0]} has no non-empty caption ({len(empty)} such pairs)")
    return pairs


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def remove_checkpoint(out_dir: str | Path) -> None:
    """Drop a finished run's resume state (optimizer moments are large); the model stays."""
    shutil.rmtree(Path(out_dir) / "checkpoint", ignore_errors=True)
