"""End-to-end text query latency at N items: embed with the default tower, then search; one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/query.py [--n 100000] [--queries 1000]

An `Index` over an embedded Qdrant Edge store with the shipped `EdgeOptions`, holding N items'
`image` vectors: the real Flickr8k train-split embeddings topped up with synthetic ones to N (see
`vectors.py`; the store sees only vectors, so synthetic items cost what photos would). It is built
by upserting the vectors and `flush()` (which builds the HNSW graph), as `Index.add` ends.

Each query is a held-out Flickr8k dev caption, searched as `Index.search(text, k=10)` (text ->
image), one at a time after 20 warm-ups: tokenise, embed with the text tower, search, wrap the
hits. `total` times that call; `embed` and `store_search` time its two halves on the same
queries in separate passes (`Index.embed_query`, then `store.search` on the vectors). The target
is total p50 <= 20 ms at 100k items.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import vectors
from machine import machine
from tqdm import tqdm

from mmrag import Index, load_encoder
from mmrag.store import EdgeStore, Point

K = 10
WARMUP = 20


def build(index: Index, base: np.ndarray, batch: int = 1_000) -> float:
    started = time.perf_counter()
    for start in tqdm(range(0, len(base), batch), desc="upserts", unit="batch", leave=False):
        stop = min(len(base), start + batch)
        index.store.upsert([
            Point(str(uuid.UUID(int=i)), {"image": base[i]}, {"uri": f"/photos/{i:07d}.jpg", "modality": "image"})
            for i in range(start, stop)
        ])
    index.store.flush()  # builds the HNSW graph (EdgeOptions.optimize_on_flush)
    return time.perf_counter() - started


def latencies(call, inputs, desc: str) -> np.ndarray:
    for x in inputs[:WARMUP]:
        call(x)
    out = np.empty(len(inputs))
    for i, x in enumerate(tqdm(inputs, desc=desc, unit="query", leave=False)):
        started = time.perf_counter()
        call(x)
        out[i] = (time.perf_counter() - started) * 1000
    return out


def summary(ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="items in the index")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # 1. The tower, the vectors, the queries
    encoder = load_encoder(args.encoder)
    real = vectors.real_vectors(encoder)
    base, n_real = vectors.base_vectors(real, args.n, "mix", args.seed)
    rng = np.random.default_rng(args.seed + 1)
    texts = [real.captions_dev[i] for i in rng.choice(len(real.captions_dev), args.queries, replace=False)]

    # 2. The index, then the three timed passes
    with tempfile.TemporaryDirectory(prefix="bench-query-") as folder:
        with Index(EdgeStore(Path(folder) / "index"), encoder) as index:
            build_s = build(index, base)
            total = latencies(lambda t: index.search(t, k=K), texts, "search")
            embed = latencies(index.embed_query, texts, "embed")
            query_vectors = [index.embed_query(t) for t in texts]
            store_search = latencies(lambda v: index.store.search(v, "image", K), query_vectors, "store search")
            options = index.store.options

    print(json.dumps({
        "bench": "query",
        "encoder": encoder.spec,
        "n": args.n,
        "data": f"{n_real} real Flickr8k train embeddings + {args.n - n_real} synthetic",
        "queries": args.queries,
        "k": K,
        "store": f"EdgeStore, m={options.m} ef_construct={options.ef_construct} quantization={options.quantization} "
                 f"hnsw_ef={options.hnsw_ef} oversampling={options.oversampling}",
        "build_s": round(build_s, 1),
        "total": summary(total),
        "embed": summary(embed),
        "store_search": summary(store_search),
        "threads": args.threads,
        **machine(),
    }))


if __name__ == "__main__":
    main()
