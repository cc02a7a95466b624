"""Train a tiny text-to-image diffusion model conditioned on the default tower's text tokens.

    python examples/train_generator.py --quick --out runs/generator-quick   # seconds; used by tests
    python examples/train_generator.py --full                               # opt-in, ~15 min on 2 CPU cores

A small pixel-space `UNet2DConditionModel` (32x32, no VAE) learns to denoise Flickr8k photos,
cross-attending to the frozen MiniLM token states that `load_encoder().encode_text_tokens` returns.
Images and token states are cached once (under --cache), so training never runs the backbones.
Afterwards it samples one image per dev caption (DDIM, classifier-free guidance) and measures the
conditioning effect with mmrag's own retrieval tower: each image's cosine similarity to its own
prompt against a shuffled prompt, with a paired sign-flip permutation test and a paired t-test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from mmrag.encoders import load_encoder
from mmrag.sources import read_manifest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k"


@dataclass
class Config:
    """Everything that decides a run; written next to the results so figures can be traced back."""

    data: str = str(DEFAULT_DATA)
    cache: str = str(REPO / ".cache" / "generator")
    out: str = str(REPO / "runs" / "generator")
    grid: str = ""  # where the prompt/image grid goes; "" means <out>/grid.png
    resolution: int = 32
    train_images: int = 4000
    captions_per_image: int = 2
    tokens: int = 32  # MiniLM positions kept; Flickr8k captions rarely exceed this
    batch_size: int = 32
    lr: float = 1e-3
    max_steps: int = 100_000
    minutes: float = 12.0  # wall-clock training budget; training stops at whichever limit comes first
    cond_dropout: float = 0.1  # caption dropout so one model learns both conditional and null scores
    prompts: int = 64
    grid_prompts: int = 16
    sample_steps: int = 50
    guidance: float = 4.0
    permutations: int = 10_000
    seed: int = 0
    threads: int = 1  # on 2 shared cores one thread measured ~4x faster per step than two


def quick_config(out: str) -> Config:
    """Small enough for a test in well under a minute; exercises every stage, proves nothing."""
    return Config(
        out=out,
        cache=str(Path(out) / "cache"),
        train_images=32,
        captions_per_image=1,
        batch_size=8,
        max_steps=3,
        minutes=1.0,
        prompts=8,
        grid_prompts=8,
        sample_steps=4,
        permutations=200,
    )


def full_config() -> Config:
    return Config(grid=str(REPO / "docs" / "generator_grid.png"))


# -- data -----------------------------------------------------------------------------------------
def load_pixels(path: Path, size: int) -> np.ndarray:
    """A photo -> (3, size, size) uint8; the 224 px JPEGs are already square, so only resize."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def encode_tokens(encoder, texts: list[str], tokens: int, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> float16 token states (n, tokens, 384) and bool mask (n, tokens), padded/cut to `tokens`."""
    states_out, masks_out = [], []
    for i in tqdm(range(0, len(texts), batch), desc="token states", leave=False):
        states, mask = encoder.encode_text_tokens(texts[i : i + batch])
        states, mask = states[:, :tokens].float(), mask[:, :tokens].bool()
        pad = tokens - states.shape[1]
        if pad > 0:
            states = F.pad(states, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
        states_out.append(states.half())
        masks_out.append(mask)
    return torch.cat(states_out), torch.cat(masks_out)


def build_cache(cfg: Config, encoder) -> dict[str, torch.Tensor]:
    """Cache 32 px train images and their captions' token states; reruns load the file instead."""
    cache = Path(cfg.cache) / f"train-{cfg.train_images}x{cfg.captions_per_image}-{cfg.resolution}px-{cfg.tokens}t.pt"
    if cache.is_file():
        return torch.load(cache)
    entries = read_manifest(Path(cfg.data) / "captions.jsonl", split="train")[: cfg.train_images]
    pixels = np.stack([load_pixels(e.image, cfg.resolution) for e in tqdm(entries, desc="images", leave=False)])
    texts, image_index = [], []
    for i, entry in enumerate(entries):
        for caption in entry.captions[: cfg.captions_per_image]:
            texts.append(caption)
            image_index.append(i)
    states, mask = encode_tokens(encoder, texts, cfg.tokens)
    data = {
        "pixels": torch.from_numpy(pixels),
        "states": states,
        "mask": mask,
        "image_index": torch.tensor(image_index),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


# -- model ----------------------------------------------------------------------------------------
def make_unet(cfg: Config, width: int) -> UNet2DConditionModel:
    """~1.6M parameters; attention only at 8x8 (down, mid, up): at 32x32 it cost ~4x per step on CPU.

    cross_attention_dim is MiniLM's width, so the token states go in without an adapter.
    """
    return UNet2DConditionModel(
        sample_size=cfg.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=4,  # diffusers reads this as the number of heads here
        norm_num_groups=16,
    )


def null_condition(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'no caption' input: zero states, one visible position (an all-masked row would give NaNs)."""
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    return torch.zeros_like(states), null_mask


def train(cfg: Config, data: dict[str, torch.Tensor]) -> tuple[UNet2DConditionModel, dict]:
    """Epsilon-prediction DDPM training until `max_steps` or `minutes` runs out."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    unet = make_unet(cfg, data["states"].shape[-1])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    device = accelerator.device
    n = len(data["image_index"])
    generator = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.minutes * 60
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    bar = tqdm(total=cfg.max_steps, desc="train", disable=not accelerator.is_local_main_process)
    unet.train()
    while step < cfg.max_steps and time.perf_counter() - start < budget:
        pick = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        images = data["pixels"][data["image_index"][pick]].float().div(127.5).sub(1.0)
        flip = torch.rand(cfg.batch_size, generator=generator) < 0.5
        images[flip] = images[flip].flip(-1)
        states, mask = data["states"][pick].float(), data["mask"][pick].clone()
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.cond_dropout
        null_states, null_mask = null_condition(states[drop], mask[drop])
        states[drop], mask[drop] = null_states, null_mask
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        noisy = scheduler.add_noise(images, noise, t)
        # Short linear warm-up: the first few hundred steps otherwise overshoot at this lr.
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        pred = unet(noisy.to(device), t.to(device), encoder_hidden_states=states.to(device),
                    encoder_attention_mask=mask.to(device)).sample
        loss = F.mse_loss(pred, noise.to(device))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    stats = {
        "steps": step,
        "train_seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "training_pairs": n,
    }
    return accelerator.unwrap_model(unet).eval(), stats


@torch.no_grad()
def sample(cfg: Config, unet: UNet2DConditionModel, states: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """DDIM with classifier-free guidance -> uint8 images (n, size, size, 3)."""
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(cfg.sample_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn((len(states), 3, cfg.resolution, cfg.resolution), generator=generator).to(device)
    null_states, null_mask = null_condition(states, mask)
    both_states = torch.cat([null_states, states]).float().to(device)
    both_mask = torch.cat([null_mask, mask]).to(device)
    for t in tqdm(scheduler.timesteps, desc="sample", leave=False):
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=both_states, encoder_attention_mask=both_mask).sample
        uncond, cond = eps.chunk(2)
        x = scheduler.step(uncond + cfg.guidance * (cond - uncond), t, x).prev_sample
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return images


# -- evaluation -----------------------------------------------------------------------------------
def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point, so every 'shuffled' prompt really is another prompt."""
    while True:
        perm = rng.permutation(n)
        if n < 2 or not np.any(perm == np.arange(n)):
            return perm


def paired_tests(diff: np.ndarray, permutations: int, rng: np.random.Generator) -> dict[str, float]:
    """Two-sided sign-flip permutation p-value and paired t-test on per-prompt differences."""
    from scipy import stats as scipy_stats

    observed = abs(diff.mean())
    signs = rng.choice([-1.0, 1.0], size=(permutations, len(diff)))
    extreme = np.sum(np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12)
    t = scipy_stats.ttest_1samp(diff, 0.0)
    return {
        "p_permutation": float((extreme + 1) / (permutations + 1)),
        "t_statistic": float(t.statistic),
        "p_ttest": float(t.pvalue),
    }


def conditioning_effect(cfg: Config, encoder, images: list[Image.Image], prompts: list[str]) -> dict:
    """Own-prompt vs shuffled-prompt cosine, on mmrag's retrieval tower; the tower sees 224 px upsamples."""
    rng = np.random.default_rng(cfg.seed)
    upsampled = [image.resize((224, 224), Image.BICUBIC) for image in images]
    image_emb = encoder.embed_images(upsampled)
    text_emb = encoder.embed_texts(prompts)
    sims = image_emb @ text_emb.T
    own = np.diag(sims)
    perm = derangement(len(prompts), rng)
    shuffled = sims[np.arange(len(prompts)), perm]
    # Mean over every other prompt: the same comparison without one shuffle's luck.
    others = (sims.sum(axis=1) - own) / max(1, len(prompts) - 1)
    diff = own - shuffled
    result = {
        "prompts": len(prompts),
        "mean_own": float(own.mean()),
        "mean_shuffled": float(shuffled.mean()),
        "margin": float(diff.mean()),
        "margin_vs_all_others": float((own - others).mean()),
        "top1_accuracy": float(np.mean(sims.argmax(axis=1) == np.arange(len(prompts)))),
    }
    result.update(paired_tests(diff, cfg.permutations, rng))
    result["p_permutation_vs_all_others"] = paired_tests(own - others, cfg.permutations, rng)["p_permutation"]
    return result


def save_grid(path: Path, images: list[Image.Image], prompts: list[str], columns: int = 4) -> None:
    """Generated images (nearest-upsampled to 128 px) with their prompt wrapped underneath."""
    cell, text_h, pad = 128, 64, 6
    rows = math.ceil(len(images) / columns)
    width = columns * (cell + 2 * pad) + 3 * cell  # wide cells: captions are long
    cell_w = width // columns
    grid = Image.new("RGB", (width, rows * (cell + text_h + 2 * pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x0 = (i % columns) * cell_w
        y0 = (i // columns) * (cell + text_h + 2 * pad)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x0 + (cell_w - cell) // 2, y0 + pad))
        lines, line = [], ""
        for word in prompt.split():
            if len(line) + len(word) + 1 > cell_w // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:5]):
            draw.text((x0 + pad, y0 + cell + pad + 2 + 12 * j), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="tiny smoke run (tests); figures mean nothing")
    mode.add_argument("--full", action="store_true", help="the opt-in real run; writes docs/generator_grid.png")
    parser.add_argument("--out", type=Path, help="output folder (results.json, grid.png, unet/)")
    parser.add_argument("--data", type=Path, help="folder holding captions.jsonl")
    parser.add_argument("--minutes", type=float, help="training wall-clock budget")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--guidance", type=float)
    args = parser.parse_args()

    cfg = quick_config(str(args.out or REPO / "runs" / "generator-quick")) if args.quick else full_config()
    if args.full and args.out:
        cfg.out = str(args.out)
    for name in ("data", "minutes", "max_steps", "train_images", "guidance"):
        if getattr(args, name) is not None:
            setattr(cfg, name, str(getattr(args, name)) if name == "data" else getattr(args, name))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_path = Path(cfg.grid) if cfg.grid else out / "grid.png"

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    wall = time.perf_counter()

    encoder = load_encoder()  # frozen: only its outputs are used, and under inference_mode
    data = build_cache(cfg, encoder)
    unet, train_stats = train(cfg, data)

    dev = read_manifest(Path(cfg.data) / "captions.jsonl", split="dev")[: cfg.prompts]
    prompts = [entry.captions[0] for entry in dev]
    states, mask = encode_tokens(encoder, prompts, cfg.tokens)
    generated = sample(cfg, unet, states.float(), mask)
    if not np.isfinite(generated.astype(np.float32)).all():
        raise RuntimeError("sampling produced non-finite pixels")
    images = [Image.fromarray(array) for array in generated]
    effect = conditioning_effect(cfg, encoder, images, prompts)
    # Scale for the figure above: the same statistic on the real dev photos, downsampled alike.
    real = [Image.fromarray(load_pixels(entry.image, cfg.resolution).transpose(1, 2, 0)) for entry in dev]
    reference = conditioning_effect(cfg, encoder, real, prompts)

    save_grid(grid_path, images[: cfg.grid_prompts], prompts[: cfg.grid_prompts])
    unet.save_pretrained(out / "unet")
    for i, image in enumerate(images):
        (out / "samples").mkdir(exist_ok=True)
        image.save(out / "samples" / f"{i:03d}.png")
    results = {
        "mode": "quick" if args.quick else "full",
        **train_stats,
        **effect,
        "real_photos_32px": {k: reference[k] for k in ("margin", "p_permutation", "top1_accuracy")},
        "image_shape": list(generated.shape[1:]),
        "grid": str(grid_path),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "config": asdict(cfg),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "config"}))


if __name__ == "__main__":
    main()
