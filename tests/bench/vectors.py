"""Vectors for the search benchmarks: real Flickr8k embeddings, realistic synthetic ones, exact top k.

Not a benchmark itself; `search.py` and `query.py` import it (run them as scripts from the
repository root, so this folder is on `sys.path`).

Real vectors: the default tower (or `--encoder`) embeds every Flickr8k caption (6,999 photos x 5)
and every photo once; the arrays are cached in `.cache/bench/` (git-ignored), keyed by the
encoder spec, so later runs load them in a second.

Synthetic vectors, to reach 100k and 1M: for each modality, a mixture of Gaussians fitted to that
modality's real *train-split* vectors (k-means centres, one shared full 512 x 512 covariance of the
offsets from them), sampled and L2-normalised. Random standard-normal vectors would be far harder
for HNSW than real ones (no structure, every point almost equidistant), so they would misstate
recall; so, less so, does a single fitted Gaussian. With 1,024 clusters for the captions (205 for
the photos: about 29 vectors per cluster) recall on synthetic vectors matches recall on the real
ones at the 36k that both exist, within 0.02 and on the low side (docs/benchmarks.md, "Search").

A base set of N vectors: every real train-split vector first (29,995 captions and 5,999 photos),
then synthetic vectors from the two mixtures in the same 5:1 caption:photo ratio until N. Below
the real count, a seeded subsample of the real vectors. Queries: held-out dev-split vectors, half
captions and half photos (cross-modal and same-modal queries, as `Index.search` serves both), never
part of any base set.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CACHE = ROOT / ".cache" / "bench"

#: Kinds of base set: real first and synthetic to fill; real only; synthetic only; half and half.
DATA_KINDS = ("mix", "real", "synthetic", "half")
#: Gaussian clusters fitted to the caption vectors (the photos get as many per vector).
DEFAULT_CLUSTERS = 1024


@dataclass
class RealVectors:
    """Flickr8k embeddings of one encoder, by split and modality (float32, L2-normalised rows)."""

    encoder_spec: str
    text_train: np.ndarray
    image_train: np.ndarray
    text_dev: np.ndarray
    image_dev: np.ndarray
    captions_dev: list[str]


def flickr8k_manifest() -> Path:
    manifest = SHARED / "flickr8k" / "captions.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"needs {manifest} (the project's shared data beside the checkout); absent here")
    return manifest


def real_vectors(encoder=None, encoder_spec: str | None = None, batch_size: int = 64) -> RealVectors:
    """Every Flickr8k caption and photo embedded by the encoder, from the cache or computed now."""
    from mmrag.encoders import DEFAULT_SPEC

    from mmrag.sources import read_manifest

    spec = encoder.spec if encoder is not None else (encoder_spec or DEFAULT_SPEC)
    manifest = flickr8k_manifest()
    splits = {split: read_manifest(manifest, split=split) for split in ("train", "dev")}
    captions_dev = [c for e in splits["dev"] for c in e.captions]
    path = CACHE / f"flickr8k-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}.npz"
    if path.is_file():
        data = np.load(path)
        return RealVectors(spec, data["text_train"], data["image_train"], data["text_dev"], data["image_dev"],
                           captions_dev)
    if encoder is None:
        from mmrag import load_encoder

        encoder = load_encoder(spec)
    arrays = {}
    started = time.perf_counter()
    for split, entries in splits.items():
        captions = [c for e in entries for c in e.captions]
        arrays[f"text_{split}"] = _embed_texts(encoder, captions, batch_size, f"captions ({split})")
        arrays[f"image_{split}"] = _embed_photos(encoder, [e.image for e in entries], 32, f"photos ({split})")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    print(f"embedded Flickr8k in {time.perf_counter() - started:.0f} s; cached in {path}", flush=True)
    return RealVectors(spec, captions_dev=captions_dev, **arrays)


def _embed_texts(encoder, texts: list[str], batch_size: int, what: str) -> np.ndarray:
    chunk = 16 * batch_size
    parts = [encoder.embed_texts(texts[i : i + chunk], batch_size=batch_size)
             for i in tqdm(range(0, len(texts), chunk), desc=f"embedding {what}", unit="chunk")]
    return np.concatenate(parts).astype(np.float32)


def _embed_photos(encoder, paths: list[Path], batch_size: int, what: str) -> np.ndarray:
    from mmrag.encoders import prepare_pixels

    from mmrag.media import load_image

    parts = []
    for start in tqdm(range(0, len(paths), batch_size), desc=f"embedding {what}", unit="batch"):
        pixels = np.stack([prepare_pixels(load_image(p), encoder.preprocess) for p in paths[start : start + batch_size]])
        parts.append(encoder.embed_pixels(pixels))
    return np.concatenate(parts).astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class FittedGaussian:
    """A mixture of Gaussians fitted to `x`; `sample(n)` gives L2-normalised rows.

    k-means (on cosine) puts `clusters` centres on the data; every cluster shares one full
    covariance, that of the rows' offsets from their centres (about 30,000 offsets pin down a
    512 x 512 covariance well; a few hundred per cluster would not). `clusters=1` is a single
    Gaussian with the data's mean and covariance.
    """

    def __init__(self, x: np.ndarray, clusters: int = 1, seed: int = 0, iterations: int = 20) -> None:
        x = x.astype(np.float64)
        rng = np.random.default_rng(seed)
        centres = x[rng.choice(len(x), clusters, replace=False)] if clusters > 1 else x.mean(axis=0, keepdims=True)
        for _ in range(iterations if clusters > 1 else 0):
            assign = np.argmax(x @ centres.T, axis=1)
            for c in range(clusters):
                members = x[assign == c]
                centres[c] = members.mean(axis=0) if len(members) else x[rng.integers(len(x))]
        assign = np.argmax(x @ centres.T, axis=1) if clusters > 1 else np.zeros(len(x), np.int64)
        self.centres = centres
        self.weights = np.bincount(assign, minlength=clusters) / len(x)
        covariance = np.cov(x - centres[assign], rowvar=False)
        # a tiny ridge keeps the Cholesky factor defined if the covariance is rank-deficient
        ridge = 1e-6 * np.trace(covariance) / len(covariance)
        self.factor = np.linalg.cholesky(covariance + ridge * np.eye(len(covariance)))

    def sample(self, n: int, rng: np.random.Generator, chunk: int = 65_536) -> np.ndarray:
        dim = self.centres.shape[1]
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            which = rng.choice(len(self.centres), stop - start, p=self.weights)
            z = rng.standard_normal((stop - start, dim))
            out[start:stop] = normalise(self.centres[which] + z @ self.factor.T)
        return out


def base_vectors(real: RealVectors, n: int, kind: str = "mix", seed: int = 0,
                 clusters: int = DEFAULT_CLUSTERS) -> tuple[np.ndarray, int]:
    """N base vectors (see the module docstring) and how many of them are real.

    `kind="mix"` below the real count, and `"real"`: a seeded subsample of the real vectors.
    `"synthetic"`: none of them. `"half"`: half real (subsampled), half synthetic, for the check.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    text, image = real.text_train, real.image_train
    pool = np.concatenate([text, image])
    share_text = len(text) / len(pool)
    if kind == "real" or (kind == "mix" and n <= len(pool)):
        if n > len(pool):
            raise ValueError(f"only {len(pool)} real train-split vectors; ask for fewer or use --data mix")
        return pool[np.sort(rng.choice(len(pool), n, replace=False))], n
    n_real = {"mix": len(pool), "synthetic": 0, "half": n // 2}[kind]
    real_part = pool[np.sort(rng.choice(len(pool), n_real, replace=False))]
    missing = n - n_real
    n_text = round(missing * share_text)
    synthetic = [FittedGaussian(text, clusters, seed).sample(n_text, rng),
                 FittedGaussian(image, max(1, round(clusters * (1 - share_text) / share_text)), seed).sample(missing - n_text, rng)]
    return np.concatenate([real_part, *synthetic]), n_real


def query_vectors(real: RealVectors, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`n` held-out dev-split vectors, half captions and half photos (alternating, so any prefix is
    mixed too), and which are captions."""
    rng = np.random.default_rng(seed)
    n_text = n - n // 2
    text = real.text_dev[rng.choice(len(real.text_dev), n_text, replace=False)]
    image = real.image_dev[rng.choice(len(real.image_dev), n - n_text, replace=False)]
    is_text = np.arange(n) % 2 == 0
    out = np.empty((n, text.shape[1]), np.float32)
    out[is_text], out[~is_text] = text, image
    return out, is_text


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top k (rows are normalised, so the dot product): indices and scores, best first."""
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ base.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1)
        ids[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        scores[start : start + chunk] = np.take_along_axis(top_scores, order, axis=1)
    return ids, scores


def recall_at_k(base: np.ndarray, queries: np.ndarray, found: list[list[int]], exact_scores: np.ndarray) -> np.ndarray:
    """Per-query recall@k against exact search, tie-aware.

    A returned point counts if its exact similarity is at least the exact k-th best similarity
    (less 1e-5, float32 rounding): duplicate captions give exact ties, and either of two tied
    points is a correct answer. Missing results (fewer than k returned) count as misses.
    """
    k = exact_scores.shape[1]
    out = np.empty(len(queries))
    for i, ids in enumerate(found):
        ids = np.asarray(list(dict.fromkeys(ids))[:k], np.int64)
        if len(ids) == 0:
            out[i] = 0.0
            continue
        true = base[ids] @ queries[i]
        out[i] = min(k, int(np.sum(true >= exact_scores[i, -1] - 1e-5))) / k
    return out
