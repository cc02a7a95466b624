"""Shared fixtures: the real default tower (loaded once), real photos, and the shared data sets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: A tiny open_clip architecture with random weights: tests the wiring, not model quality.
TINY_ARCH = "mmrag-test-TinyViT"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def shared_dataset(name: str) -> Path:
    """A data set under ../shared/data, or a skip that says why (a user's fresh checkout lacks it)."""
    path = SHARED_DATA / name
    if not (path / "captions.jsonl").is_file():
        pytest.skip(f"needs {path} (the project's shared data beside the checkout); absent here")
    return path


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return shared_dataset("coco_mini")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return shared_dataset("flickr8k")


@pytest.fixture(scope="session")
def encoder():
    """The default tower with its shipped heads (or $MMRAG_TEST_ENCODER), loaded once per session."""
    from mmrag.encoders import load_encoder

    return load_encoder(os.environ.get("MMRAG_TEST_ENCODER") or None)


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> list[Path]:
    """scikit-image's bundled real photos, written as JPEG files."""
    from mmrag.samples import export_sample_photos

    return export_sample_photos(tmp_path_factory.mktemp("samples"))


@pytest.fixture()
def photo_folder(tmp_path, sample_photos) -> Path:
    """A fresh folder of real photos, with one nested subfolder, that a test may spoil."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, photo in enumerate(sample_photos[:6]):
        shutil.copy(photo, (folder / "nested" if i % 2 else folder) / photo.name)
    return folder


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory) -> str:
    """Register TINY_ARCH with open_clip (from a JSON config, as users add their own)."""
    import json

    import open_clip

    config = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(config)
    return TINY_ARCH
