"""runtime="onnx": the image side in ONNX Runtime gives the torch embeddings, exported once and cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag import Index
from mmrag.encoders import DEFAULT_SPEC, load_encoder, parse_spec

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'mmrag[onnx]'")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return [Image.fromarray(f()) for f in (skimage_data.chelsea, skimage_data.rocket, skimage_data.astronaut)]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MMRAG_CACHE/onnx: where `runtime="onnx"` keeps exports when no cache_dir is given."""
    return tmp_path_factory.mktemp("mmrag-cache") / "onnx"


def test_onnx_image_side_matches_torch_and_is_cached(photos, onnx_cache: Path) -> None:
    torch_tower = load_encoder(DEFAULT_SPEC)
    onnx_tower = load_encoder(DEFAULT_SPEC).with_runtime("onnx", cache_dir=onnx_cache)
    assert onnx_tower.runtime == "onnx" and onnx_tower.spec == torch_tower.spec
    exported = list(onnx_cache.glob(f"{parse_spec(DEFAULT_SPEC).family}-*.onnx"))  # named after the family
    assert len(exported) == 1
    expected = torch_tower.embed_images(photos)
    for batch in (photos, photos[:1]):  # the batch axis is dynamic: 3 and 1
        np.testing.assert_allclose(onnx_tower.embed_images(batch), expected[: len(batch)], atol=1e-4)
    # texts stay in torch, unchanged
    np.testing.assert_array_equal(onnx_tower.embed_texts(["a cat"]), torch_tower.embed_texts(["a cat"]))
    # a second encoder with the same weights reuses the file instead of exporting again
    modified = exported[0].stat().st_mtime_ns
    load_encoder(DEFAULT_SPEC).with_runtime("onnx", cache_dir=onnx_cache)
    assert list(onnx_cache.glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == modified


def test_onnx_runtime_refuses_bf16_and_other_devices(onnx_cache: Path) -> None:
    with pytest.raises(ValueError, match="ONNX Runtime runs fp32"):
        load_encoder(DEFAULT_SPEC, precision="bf16").with_runtime("onnx", cache_dir=onnx_cache)
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_encoder(DEFAULT_SPEC, runtime="tensorrt")  # type: ignore[arg-type]


def test_index_built_with_onnx_matches_torch(tmp_path: Path, photo_folder: Path, onnx_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMRAG_CACHE", str(onnx_cache.parent))  # Index.open(runtime=...) uses the default cache
    with Index.open(tmp_path / "torch.mmrag") as plain:
        plain.add(photo_folder, progress=False)
        plain_hits = plain.search("a cat", k=3)
    with Index.open(tmp_path / "onnx.mmrag", runtime="onnx") as fast:
        report = fast.add(photo_folder, progress=False)
        fast_hits = fast.search("a cat", k=3)
    assert report.added == 6 and not report.skipped
    assert [h.uri for h in fast_hits] == [h.uri for h in plain_hits]
    assert [h.score for h in fast_hits] == pytest.approx([h.score for h in plain_hits], abs=1e-4)


def test_cli_index_runtime_onnx(tmp_path: Path, photo_folder: Path, onnx_cache: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from mmrag.cli import app

    monkeypatch.setenv("MMRAG_CACHE", str(onnx_cache.parent))
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(photo_folder), "--index", str(tmp_path / "i"), "--runtime", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["added"] == 6
    bad = runner.invoke(app, ["index", str(photo_folder), "--index", str(tmp_path / "j"), "--runtime", "tvm"])
    assert bad.exit_code != 0 and "runtime must be one of" in bad.output
