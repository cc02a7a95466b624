"""A tower's image side in ONNX Runtime: the same numbers as torch, several times the CPU rate.

On the 2-core development machine the default tower's image side runs at about 80 img/s in ONNX
Runtime against 13-23 img/s in eager torch (tests/bench/forward_options.py, docs/benchmarks.md),
with embeddings equal to float32 rounding. So ingest can opt in:

    encoder = load_encoder(runtime="onnx")          # or Index.open(..., runtime="onnx"), mmrag index --runtime onnx

The first use exports `encoder._image_features` (every module of the tower, so any family whose
image side torch.export can trace) to an ONNX file with a dynamic batch axis, and caches it under
`~/.cache/mmrag/onnx` (or `MMRAG_CACHE`), keyed by the spec, the weights' bytes and the versions;
later processes load the file in about a second. Texts stay in torch: they are short and few.
Needs the `onnx` extra: `pip install 'mmrag[onnx]'`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .base import Encoder

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMRAG_CACHE", Path.home() / ".cache" / "mmrag")) / "onnx"


class ImageSide(nn.Module):
    """`encoder._image_features` as one module, so that export sees every weight as a parameter."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.parts = nn.ModuleList(encoder.modules())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder._image_features(pixels)


def export_key(encoder: Encoder) -> str:
    """Changes whenever the exported graph could: spec, input size, any weight, torch or ORT version."""
    import onnxruntime

    h = hashlib.sha256(f"{encoder.spec}|{encoder.preprocess}|{torch.__version__}|{onnxruntime.__version__}".encode())
    for module in encoder.modules():
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def export_image_side(encoder: Encoder, path: Path) -> None:
    """Trace the image side at a batch of 2 with a dynamic batch axis; write `path` atomically."""
    size = encoder.preprocess.size
    example = torch.zeros(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout may be JSON
            torch.onnx.export(ImageSide(encoder).eval(), (example,), str(tmp_path), input_names=["pixels"],
                              output_names=["features"], dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)
        tmp_path.replace(path)


class OnnxImageSide:
    """Callable like `_image_features`: normalised pixels (n, 3, h, w) -> features (n, dim), via ONNX Runtime."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def build(cls, encoder: Encoder, cache_dir: str | Path | None = None) -> "OnnxImageSide":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ImportError("runtime='onnx' needs ONNX Runtime; install it with pip install 'mmrag[onnx]'") from exc
        path = Path(cache_dir or default_cache_dir()) / f"{encoder.spec.split(':')[0]}-{export_key(encoder)}.onnx"
        if not path.is_file():
            log.info("exporting %s's image side to %s (once)", encoder.spec, path)
            with torch.inference_mode(False), torch.no_grad():
                export_image_side(encoder, path)
        return cls(path, threads=torch.get_num_threads())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.session.run(None, {"pixels": np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(features)
