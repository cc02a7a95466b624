"""The default tower's image forward pass under CPU speed options; prints one JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/forward_options.py [--images 256] [--rounds 3] [--compile]

Options, each timed on the same decoded photos at the same batch size and thread count, in
interleaved rounds (A B C A B C ...) so that a busy machine slows them alike:
- `fp32`: contiguous (NCHW) tensors, as torch lays them out by default;
- `channels_last`: model and input in NHWC memory format (same arithmetic, other memory order;
  what `MmragTower` runs since this benchmark);
- `bf16`: `torch.autocast("cpu", torch.bfloat16)`, channels-last (uses AVX512-BF16/AMX if present);
- `compile` (with --compile): `torch.compile` of the fp32 channels-last backbone;
- `onnxruntime` (when `onnxruntime` is installed): the image side exported to ONNX (fp32), run by
  ONNX Runtime's CPU provider with the same thread count.
Each option's embeddings are compared with fp32's: `min_cosine` over all photos, and how many of
each photo's 10 nearest neighbours (among the photos) stay the same (`knn10_overlap`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ingest import real_photos
from machine import machine
from mmrag.encoders import prepare_pixels
from mmrag.encoders.preprocess import pixels_to_tensor

from mmrag import load_encoder
from mmrag.media import load_image


def forward(encoder, batches: list[torch.Tensor], channels_last: bool, dtype: torch.dtype | None) -> np.ndarray:
    """The image side (backbone + head) over every batch, in the memory format asked; float32 unit rows.

    Calls the backbone itself rather than `_image_features`, which always runs channels-last.
    """
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    with torch.inference_mode(), autocast:
        for batch in batches:
            cells = encoder.image_net.forward_features(batch.contiguous(memory_format=layout))
            features = encoder.image_head(cells.flatten(2).transpose(1, 2))
            out.append(torch.nn.functional.normalize(features.float(), dim=-1))
    return torch.cat(out).numpy()


class ImageSide(torch.nn.Module):
    """Backbone + head as one module, for export."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.net, self.head = encoder.image_net, encoder.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.forward_features(pixels).flatten(2).transpose(1, 2))


def onnx_runner(encoder, batches: list[torch.Tensor], threads: int) -> Callable[[], np.ndarray]:
    """Export the image side to ONNX (fp32, dynamic batch) and run it in ONNX Runtime on the CPU."""
    import onnxruntime as ort

    encoder.image_net.to(memory_format=torch.contiguous_format)
    path = Path(tempfile.mkdtemp(prefix="mmrag-onnx-")) / "image_side.onnx"
    torch.onnx.export(ImageSide(encoder).eval(), (batches[0],), str(path), input_names=["pixels"],
                      output_names=["features"], dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def go() -> np.ndarray:
        out = [session.run(None, {"pixels": batch.numpy()})[0] for batch in batches]
        return torch.nn.functional.normalize(torch.from_numpy(np.concatenate(out)), dim=-1).numpy()

    return go


def knn_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest rows (by cosine, itself excluded) that both agree on."""

    def knn(x: np.ndarray) -> np.ndarray:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = knn(reference), knn(other)
    return float(np.mean([len(set(r) & set(o)) / k for r, o in zip(a, b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder(None)
    photos = real_photos(args.images)
    pixels = np.stack([prepare_pixels(load_image(p), encoder.preprocess) for p in photos])
    batches = [pixels_to_tensor(pixels[i : i + args.batch_size], encoder.preprocess)
               for i in range(0, len(pixels), args.batch_size)]

    net = encoder.image_net
    eager = net.forward
    options: dict[str, Callable[[], np.ndarray]] = {}

    def run(channels_last: bool, dtype: torch.dtype | None = None, compiled=None) -> Callable[[], np.ndarray]:
        def go() -> np.ndarray:
            net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            net.forward = compiled or eager
            try:
                return forward(encoder, batches, channels_last, dtype)
            finally:
                net.forward = eager
        return go

    options["fp32"] = run(False)
    options["channels_last"] = run(True)
    options["bf16"] = run(True, torch.bfloat16)
    compile_seconds = None
    if args.compile:
        net.to(memory_format=torch.channels_last)
        compiled = torch.compile(net.forward)
        started = time.perf_counter()
        forward_compiled = run(True, compiled=compiled)
        forward_compiled()  # compiles
        compile_seconds = round(time.perf_counter() - started, 1)
        options["compile"] = forward_compiled

    export_seconds = None
    if importlib.util.find_spec("onnxruntime") is not None:
        started = time.perf_counter()
        options["onnxruntime"] = onnx_runner(encoder, batches, args.threads)
        export_seconds = round(time.perf_counter() - started, 1)

    embeddings = {name: go() for name, go in options.items()}  # warm-up, and the outputs compared
    rates: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(args.rounds):
        for name, go in options.items():
            started = time.perf_counter()
            go()
            rates[name].append(len(pixels) / (time.perf_counter() - started))
    reference = embeddings["fp32"]
    base = statistics.median(rates["fp32"])
    results = {
        name: {
            "img_per_s": round(statistics.median(rates[name]), 1),
            "speedup": round(statistics.median(rates[name]) / base, 3),
            "min_cosine": round(float(np.min(np.sum(reference * embeddings[name], axis=1))), 5),
            "knn10_overlap": round(knn_overlap(reference, embeddings[name]), 4),
        }
        for name in options
    }
    print(json.dumps({
        "bench": "forward_options", "encoder": encoder.spec, "images": len(pixels), "batch_size": args.batch_size,
        "threads": args.threads, "rounds": args.rounds, "compile_seconds": compile_seconds, "onnx_export_seconds": export_seconds, "options": results,
        "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None,
        **machine(),
    }))


if __name__ == "__main__":
    main()
