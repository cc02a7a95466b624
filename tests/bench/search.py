"""Search latency, recall@10 and build time per store configuration; one JSON line per configuration.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/search.py --n 100000                 # every engine, shipped settings
    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/search.py --n 1000000 --engines edge-plain,edge,numpy
    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/search.py --n 100000 --engines edge \\
        --m 16,32 --ef-construct 64,100 --quantization none,int8,binary --hnsw-ef 32,64,128 --oversampling 1,2,4

Data (`vectors.py`): N base vectors of the default tower's width (512-d, L2-normalised, cosine):
the real Flickr8k train-split caption and photo embeddings, then synthetic ones drawn from
Gaussian mixtures fitted to them (`--data mix`, the default; `real`, `synthetic` and `half` for
the fidelity check, `--clusters` for the mixture). Queries: held-out dev-split embeddings, half
captions, half photos.

Engines (`--engines`, comma-separated):
  edge-plain  Qdrant Edge as `EdgeStore` created it before issue 7: never optimized, so every
              search scans every point (exact, in Rust);
  edge-hnsw   Qdrant Edge optimized with Qdrant's own defaults (HNSW m=16, ef_construct=100,
              no quantization, search ef = ef_construct);
  edge        Qdrant Edge with `EdgeOptions` (the shipped default, or the grid given by --m,
              --ef-construct, --quantization, --hnsw-ef, --oversampling: one shard per build
              setting, every search setting tried on it);
  client      qdrant-client's local mode (`ClientStore(":memory:")`);
  langchain   langchain-qdrant's `QdrantVectorStore` on qdrant-client's local mode;
  numpy       exact search: one matrix-vector product and a partial sort per query.

Measured:
  build_s      empty store to searchable: upserts in batches of 1,000 points through the store
               (with a small payload, as `Index.add` writes), then `flush()`, which optimizes
               (builds the HNSW graph and quantized copy) where the configuration does;
  p50/p99_ms   single queries, k=10, one at a time after 20 warm-ups (and, for Edge, after one
               untimed pass over all queries on a freshly built shard, so the first search setting
               does not pay for paging the vectors in), through the store's
               `search` (the path `Index.search` takes after embedding the query; payloads included);
  recall_at_10 mean over queries of the share of the 10 results that are among the exact 10 best
               (numpy over the same vectors; tie-aware, see `vectors.recall_at_k`), also apart
               for caption and photo queries.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import vectors
from machine import machine
from tqdm import tqdm

from mmrag.store import EdgeOptions, EdgeStore, IndexManifest, Point

ENGINES = ("edge-plain", "edge-hnsw", "edge", "client", "langchain", "numpy")
K = 10
WARMUP = 20
UPSERT_BATCH = 1_000

#: Before issue 7: nothing ever optimized the shard.
PLAIN = EdgeOptions(m=16, ef_construct=100, quantization=None, hnsw_ef=None, oversampling=None, optimize_on_flush=False)
#: Qdrant's own defaults, optimized.
QDRANT_DEFAULTS = EdgeOptions(m=16, ef_construct=100, quantization=None, hnsw_ef=None, oversampling=None)


def point_id(i: int) -> str:
    return str(uuid.UUID(int=i))


def payload(i: int) -> dict:
    return {"uri": f"/photos/{i:07d}.jpg", "modality": "image", "content_hash": f"{i:064x}"}


def timed_queries(search: Callable[[np.ndarray], list[int]], queries: np.ndarray, desc: str) -> tuple[np.ndarray, list]:
    """Latencies (ms) of one search per query, after WARMUP untimed ones, and the ids each returned."""
    for q in queries[:WARMUP]:
        search(q)
    latencies, found = np.empty(len(queries)), []
    for i, q in enumerate(tqdm(queries, desc=desc, unit="query", leave=False)):
        started = time.perf_counter()
        ids = search(q)
        latencies[i] = (time.perf_counter() - started) * 1000
        found.append(ids)
    return latencies, found


# --- engines: each yields (configuration, build seconds, extra figures, search function) -------------


def edge_runs(base: np.ndarray, queries: np.ndarray, builds: list[EdgeOptions], searches: list[dict],
              folder: Path) -> Iterator[tuple]:
    manifest = IndexManifest(encoder_spec="bench", dim=base.shape[1])
    for build in builds:
        path = folder / f"edge-{uuid.uuid4().hex[:8]}"
        store = EdgeStore(path, build)
        store.create(manifest)
        started = time.perf_counter()
        for start in tqdm(range(0, len(base), UPSERT_BATCH), desc="edge upserts", unit="batch", leave=False):
            stop = min(len(base), start + UPSERT_BATCH)
            store.upsert([Point(point_id(i), {"image": base[i]}, payload(i)) for i in range(start, stop)])
        upserted = time.perf_counter()
        store.flush()  # optimizes where build.optimize_on_flush
        built = time.perf_counter()
        info = store._live().info()  # the shard's own figures: is the graph there?
        extra = {
            "upsert_s": round(upserted - started, 2),
            "optimize_s": round(built - upserted, 2),
            "segments": info.segments_count,
            "indexed_vectors": info.indexed_vectors_count,
            # blocks allocated, not file sizes: appendable segments reserve sparse chunks
            "segments_mb": round(sum(f.stat().st_blocks * 512 for f in (path / "shard" / "segments").rglob("*")
                                     if f.is_file()) / 2**20, 1),
        }
        store.close()
        with EdgeStore(path, build) as reader:  # one untimed pass first: pages the vectors in
            for q in queries:
                reader.search(q, "image", K)
        settings = searches if build.optimize_on_flush else [{}]
        if build.quantization is None:  # oversampling and rescoring mean nothing then: one run per hnsw_ef
            settings = list({s.get("hnsw_ef"): {**s, "oversampling": None} for s in settings}.values())
        for search_settings in settings:
            options = replace(build, **search_settings)
            with EdgeStore(path, options) as reader:  # a fresh handle per search setting (options are per handle)
                def search(q, reader=reader):
                    return [uuid.UUID(h.id).int for h in reader.search(q, "image", K)]

                if not build.optimize_on_flush:
                    config = {"index": "none (plain segment: every search scans every point)"}
                else:
                    config = {k: v for k, v in asdict(options).items() if k != "optimize_on_flush"}
                    if build.quantization is None:
                        del config["oversampling"], config["rescore"]
                yield config, built - started, extra, search
        shutil.rmtree(path, ignore_errors=True)


def client_run(base: np.ndarray) -> Iterator[tuple]:
    from mmrag.store import ClientStore

    store = ClientStore(":memory:", collection="bench")
    store.create(IndexManifest(encoder_spec="bench", dim=base.shape[1]))
    started = time.perf_counter()
    for start in tqdm(range(0, len(base), UPSERT_BATCH), desc="client upserts", unit="batch", leave=False):
        stop = min(len(base), start + UPSERT_BATCH)
        store.upsert([Point(point_id(i), {"image": base[i]}, payload(i)) for i in range(start, stop)])
    built = time.perf_counter() - started

    def search(q):
        return [uuid.UUID(h.id).int for h in store.search(q, "image", K)]

    yield {"qdrant_client": _version("qdrant-client")}, built, {}, search
    store.close()


def langchain_run(base: np.ndarray) -> Iterator[tuple]:
    from langchain_core.embeddings import Embeddings

    try:
        from langchain_qdrant import QdrantVectorStore
    except ImportError:
        raise SystemExit("the langchain engine needs langchain-qdrant: pip install -e '.[bench]'") from None

    class Precomputed(Embeddings):
        """Texts are row numbers of `base`: the vectors were computed before. (langchain also embeds
        "dummy_text" to learn the width; row 0 answers.)"""

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return base[[int(t) if t.isdigit() else 0 for t in texts]].tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    started = time.perf_counter()
    texts = [str(i) for i in range(len(base))]
    store = QdrantVectorStore.from_texts(
        texts, Precomputed(), metadatas=[payload(i) for i in range(len(base))], location=":memory:",
        collection_name="bench", batch_size=UPSERT_BATCH,
    )
    built = time.perf_counter() - started

    def search(q):
        return [int(d.page_content) for d in store.similarity_search_by_vector(q.tolist(), k=K)]

    yield {"langchain_qdrant": _version("langchain-qdrant"), "qdrant_client": _version("qdrant-client")}, built, {}, search
    store.client.close()


def numpy_run(base: np.ndarray) -> Iterator[tuple]:
    def search(q):
        sims = base @ q
        top = np.argpartition(-sims, K - 1)[:K]
        return top[np.argsort(-sims[top])].tolist()

    yield {"numpy": np.__version__}, 0.0, {}, search


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# --- arguments and output ------------------------------------------------------------------------


def _ints(text: str) -> list[int | None]:
    return [None if t in ("none", "default") else int(t) for t in text.split(",")]


def _floats(text: str) -> list[float | None]:
    return [None if t in ("none", "default") else float(t) for t in text.split(",")]


def edge_grid(args) -> tuple[list[EdgeOptions], list[dict]]:
    """Build settings (one shard each) and search settings (tried on each shard) from the arguments."""
    shipped = EdgeOptions()
    builds = [
        replace(shipped, m=m or shipped.m, ef_construct=efc or shipped.ef_construct,
                quantization=None if q == "none" else q)
        for m, efc, q in itertools.product(
            _ints(args.m), _ints(args.ef_construct),
            [shipped.quantization or "none"] if args.quantization == "default" else args.quantization.split(","),
        )
    ]
    searches = [
        {"hnsw_ef": ef if args.hnsw_ef != "default" else shipped.hnsw_ef,
         "oversampling": os_ if args.oversampling != "default" else shipped.oversampling}
        for ef, os_ in itertools.product(_ints(args.hnsw_ef), _floats(args.oversampling))
    ]
    return builds, searches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--n", type=int, default=100_000, help="base vectors")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--slow-queries", type=int, default=200,
                        help="queries for client and langchain (a full scan in Python each)")
    parser.add_argument("--data", choices=vectors.DATA_KINDS, default="mix")
    parser.add_argument("--clusters", type=int, default=vectors.DEFAULT_CLUSTERS,
                        help="Gaussian clusters fitted to the caption vectors, for the synthetic ones")
    parser.add_argument("--engines", default="edge-plain,edge-hnsw,edge,client,langchain,numpy")
    parser.add_argument("--m", default="default", help="HNSW m values, comma-separated")
    parser.add_argument("--ef-construct", default="default")
    parser.add_argument("--quantization", default="default", help="none, int8, binary, comma-separated")
    parser.add_argument("--hnsw-ef", default="default")
    parser.add_argument("--oversampling", default="default")
    parser.add_argument("--encoder", default=None, help="tower whose Flickr8k embeddings to use (default: the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="folder for the Edge shards (default: the system's temp)")
    args = parser.parse_args()
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")

    # 1. Data and exact answers
    real = vectors.real_vectors(encoder_spec=args.encoder)
    base, n_real = vectors.base_vectors(real, args.n, args.data, args.seed, args.clusters)
    queries, is_text = vectors.query_vectors(real, args.queries, args.seed + 1)
    _, exact_scores = vectors.exact_top_k(base, queries, K)
    common = {
        "bench": "search",
        "n": args.n,
        "dim": base.shape[1],
        "data": f"{args.data}: {n_real} real Flickr8k train embeddings + {args.n - n_real} synthetic "
                f"({args.clusters} clusters; {real.encoder_spec})",
        "k": K,
    }

    # 2. One JSON line per configuration
    folder = Path(tempfile.mkdtemp(prefix="bench-search-", dir=args.tmp))
    try:
        for engine in engines:
            if engine == "edge-plain":
                runs = edge_runs(base, queries, [PLAIN], [{}], folder)
            elif engine == "edge-hnsw":
                runs = edge_runs(base, queries, [QDRANT_DEFAULTS], [{}], folder)
            elif engine == "edge":
                runs = edge_runs(base, queries, *edge_grid(args), folder)
            elif engine == "client":
                runs = client_run(base)
            elif engine == "langchain":
                runs = langchain_run(base)
            else:
                runs = numpy_run(base)
            n_queries = args.slow_queries if engine in ("client", "langchain") else args.queries
            for config, build_s, extra, search in runs:
                latencies, found = timed_queries(search, queries[:n_queries], engine)
                recall = vectors.recall_at_k(base, queries[:n_queries], found, exact_scores[:n_queries])
                text = is_text[:n_queries]
                print(json.dumps({
                    **common,
                    "engine": engine,
                    "config": config,
                    "queries": n_queries,
                    "build_s": round(build_s, 2),
                    **extra,
                    "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                    "p99_ms": round(float(np.percentile(latencies, 99)), 3),
                    "mean_ms": round(float(latencies.mean()), 3),
                    "recall_at_10": round(float(recall.mean()), 4),
                    "recall_caption_queries": round(float(recall[text].mean()), 4),
                    "recall_photo_queries": round(float(recall[~text].mean()), 4),
                    **machine(),
                    "qdrant_edge": _version("qdrant-edge-py"),
                }), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
