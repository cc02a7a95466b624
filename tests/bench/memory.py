"""Peak memory of ingest (`Index.add` over a folder of image files) at two sizes; one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/memory.py [--sizes 1000,20000]

Each size runs in its own fresh Python process (so each peak is its own): load the default
tower, open a new embedded index in a temp folder, then `Index.add(folder)` with the defaults
(batch 32, decode workers = cores / 2) in two sampled phases: "ingest", the add itself (read,
decode, encode, upsert) with the index build held back, then "build", the `optimize()` that
the add's closing `flush()` runs by default (HNSW graph and int8 copy). Figures per phase, peaks
sampled every 50 ms:
  peak_anon_mb  anonymous memory of the ingesting process: the model, batches, Python objects;
  peak_file_mb  file-backed pages it maps: libraries, and the Edge shard's memory-mapped
                vectors, graph and payloads (these grow with the index by design: the shard's
                files take about 5 KB a point with the default settings, and the kernel can drop
                such pages under memory pressure);
  peak_tree_mb  resident set of the process plus its decode workers (shared pages counted twice);
and `peak_rss_mb`, the process's peak resident set over both (`getrusage`). The target: the
ingest phase flat within 10% between the sizes (`growth_ingest_anon`, `growth_ingest_tree`);
`growth_peak_rss` also counts the index's own memory.

Inputs: Flickr8k has 6,999 photos, so the folder for N > 6,999 holds N symbolic links named
000000.jpg, 000001.jpg, ... to the photos in turn (photo i % 6,999). mmrag identifies a file by
its absolute path (`sources.file_item`: the link's path, not its target), and nothing dedupes
by content across paths, so every link is decoded, encoded and stored as its own item: N
distinct points, the same work as N distinct photos. (Repeated photos do hit the page cache.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import vectors
from machine import machine

MB = 2**20


def photo_folder(folder: Path, size: int) -> Path:
    """`size` symbolic links to the Flickr8k photos under distinct names."""
    from mmrag.sources import read_manifest

    photos = [e.image for e in read_manifest(vectors.flickr8k_manifest())]
    folder.mkdir(parents=True)
    for i in range(size):
        (folder / f"{i:06d}.jpg").symlink_to(photos[i % len(photos)].resolve())
    return folder


class Sampler:
    """Peak memory of this process (and its decode workers) while a phase runs, sampled every 50 ms.

    `anon` is anonymous memory (heaps: the model, batches, Python objects); `file` is file-backed
    pages mapped in (the Edge shard's memory-mapped vectors, graph and payloads, and the
    libraries), from /proc/self/status; `tree` adds the workers' resident sets.
    """

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peaks = {"anon": 0, "file": 0, "tree": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> dict[str, int]:
        import psutil

        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        anon, file = (int(status[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile"))
        try:
            tree = self.me.memory_info().rss + sum(c.memory_info().rss for c in self.me.children(recursive=True))
        except psutil.Error:  # a worker exited between listing and reading
            tree = 0
        return {"anon": anon, "file": file, "tree": tree}

    def _run(self) -> None:
        while not self._done.wait(0.05):
            for key, value in self.read().items():
                self.peaks[key] = max(self.peaks[key], value)

    def __enter__(self) -> "Sampler":
        self.peaks = self.read()  # a phase shorter than one sampling interval still has its figures
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def mb(self) -> dict[str, int]:
        return {f"peak_{key}_mb": round(value / MB) for key, value in self.peaks.items()}


def child(folder: Path, index_dir: Path) -> dict:
    """Runs in the measured process: `Index.add(folder)` in two phases, each sampled.

    Phase "ingest" is the add (read, decode, encode, upsert) with the index build held back
    (`optimize_on_flush=False`); phase "build" is the `optimize()` that `flush()` would have run
    at the end of the add: the same work as a plain `Index.add` with the defaults, in two parts.
    """
    from dataclasses import replace

    from mmrag import Index, load_encoder
    from mmrag.store import EdgeOptions, EdgeStore

    store = EdgeStore(index_dir, replace(EdgeOptions(), optimize_on_flush=False))
    index = Index(store, load_encoder(None), str(index_dir))
    before = Sampler().read()
    with Sampler() as ingest:
        report = index.add(folder, progress=False)
    with Sampler() as build:
        started = time.perf_counter()
        store.optimize()
        build_s = time.perf_counter() - started
    after = Sampler().read()
    count = index.count()
    index.close()
    return {
        "images": report.added,
        "skipped": len(report.skipped),
        "stored": count,
        "ingest_s": round(report.seconds, 1),
        "images_per_s": round(report.added / report.seconds, 1),
        "build_s": round(build_s, 1),
        "before_add_mb": {f"{k}_mb": round(v / MB) for k, v in before.items()},
        "ingest": ingest.mb(),
        "build": build.mb(),
        "after_mb": {f"{k}_mb": round(v / MB) for k, v in after.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB),  # KiB on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,20000", help="two or more numbers of images, comma-separated")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for size in sizes:
            folder = photo_folder(Path(tmp) / f"photos-{size}", size)
            print(f"ingesting {size} images in a fresh process ...", file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(folder), str(Path(tmp) / f"index-{size}")],
                check=True, stdout=subprocess.PIPE, text=True,
            ).stdout
            results[str(size)] = json.loads(out.strip().splitlines()[-1])
    small, large = results[str(sizes[0])], results[str(sizes[-1])]

    def growth(phase: str, key: str) -> float:
        return round(large[phase][key] / small[phase][key] - 1, 3)

    print(json.dumps({
        "bench": "memory",
        "sizes": results,
        "growth_peak_rss": round(large["peak_rss_mb"] / small["peak_rss_mb"] - 1, 3),
        "growth_ingest_anon": growth("ingest", "peak_anon_mb"),
        "growth_ingest_tree": growth("ingest", "peak_tree_mb"),
        "inputs": "symbolic links under distinct names to Flickr8k photos (photo i % 6,999)",
        **machine(),
    }))


if __name__ == "__main__":
    main()
