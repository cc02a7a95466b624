"""The default tower (an ensemble of the shipped mmrag towers), the shipped files and the retrieval metric;
training is in test_trainer.py, ensembles in test_ensemble.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrag.encoders import DEFAULT_SPEC, Encoder, ModelNotFoundError, load_encoder, prepare_pixels
from mmrag.encoders.heads import load_heads
from mmrag.encoders.metrics import retrieval_recall
from mmrag.encoders.mmrag_tower import DEFAULT_WEIGHTS, SHIPPED, WEIGHTS_DIR, load_mmrag
from mmrag.encoders.preprocess import pixels_to_tensor

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k"
needs_flickr = pytest.mark.skipif(
    not (FLICKR / "captions.jsonl").is_file(), reason=f"shared Flickr8k data not found at {FLICKR}"
)


@pytest.fixture(scope="module")
def tower() -> Encoder:
    return load_encoder(DEFAULT_SPEC)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return {
        "cat": Image.fromarray(skimage_data.chelsea()),
        "rocket": Image.fromarray(skimage_data.rocket()),
        "astronaut": Image.fromarray(skimage_data.astronaut()),
    }


# -- retrieval_recall --------------------------------------------------------------------------
def test_recall_hand_made_case() -> None:
    images = np.eye(3, dtype=np.float32)
    # captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    texts = np.array(
        [[1, 0, 0], [0.5, 0.95, 0.1], [0, 0.9, 0.1], [0.2, 0.0, 1.0], [0.0, 0.8, 0.5]], dtype=np.float32
    )
    owner = [0, 0, 1, 2, 2]
    out = retrieval_recall(images, texts, owner, ks=(1, 2))
    # t2i ranks of the true image: 0, 1 (image 1 scores 0.95 > 0.5), 0, 0, 1 -> R@1 3/5, R@2 5/5
    # i2t: image 0's best own caption #0 ranks 0; image 1's only caption #2 (0.9) is beaten by
    # caption #1 (0.95): rank 1; image 2's best own caption #3 (1.0) ranks 0 -> R@1 2/3, R@2 1
    assert out == pytest.approx({"t2i_r1": 0.6, "t2i_r2": 1.0, "i2t_r1": 2 / 3, "i2t_r2": 1.0})


def test_recall_ties_count_against_the_query() -> None:
    out = retrieval_recall(np.ones((4, 2)), np.ones((4, 2)), [0, 1, 2, 3], ks=(1, 4))
    assert out["t2i_r1"] == 0.0 and out["t2i_r4"] == 1.0
    assert out["i2t_r1"] == 0.0 and out["i2t_r4"] == 1.0


def test_recall_rejects_bad_owner() -> None:
    with pytest.raises(ValueError):
        retrieval_recall(np.eye(2), np.eye(2), [0, 2])


# -- the tower ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", sorted(SHIPPED))
def test_shipped_heads_metadata_rebuilds_the_heads(tag: str) -> None:
    path = WEIGHTS_DIR / SHIPPED[tag]
    image_head, text_head, meta = load_heads(path)
    assert int(meta["dim"]) == image_head.config.out_dim == text_head.config.out_dim
    assert set(json.loads(meta["dev_recall"])) >= {"t2i_r1", "i2t_r10"}
    assert path.name.startswith(meta.get("arch", "lite0-minilm") + "-")


def test_shipped_weights_fit_the_budget() -> None:
    """Every shipped file stays in git history: 25 MB in all."""
    assert sum((WEIGHTS_DIR / name).stat().st_size for name in SHIPPED.values()) <= 25 * 10**6


def test_a_spec_without_weights_loads_its_architectures_shipped_tag() -> None:
    assert load_mmrag("mmrag:lite0-minilm").spec == "mmrag:lite0-minilm@flickr8k-v1"
    assert load_mmrag("mmrag:lite2-minilm").spec == "mmrag:lite2-minilm@flickr8k-v2"
    with pytest.raises(ModelNotFoundError, match="none ship for 'lite1-minilm'"):
        load_mmrag("mmrag:lite1-minilm")


def test_embeddings_are_normalised_float32(tower: Encoder, photos: dict[str, Image.Image]) -> None:
    images = tower.embed_images(list(photos.values()))
    texts = tower.embed_texts(["a cat", "a rocket on a launch pad"])
    for emb, n in ((images, 3), (texts, 2)):
        assert emb.dtype == np.float32 and emb.shape == (n, tower.dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    single = tower.embed_images(photos["cat"])
    assert single.shape == (tower.dim,)
    np.testing.assert_allclose(single, images[0], atol=1e-5)
    assert tower.embed_texts("a cat").shape == (tower.dim,)


def test_text_semantics(tower: Encoder, photos: dict[str, Image.Image]) -> None:
    cat, rocket = tower.embed_images([photos["cat"], photos["rocket"]])
    cat_text, car_text = tower.embed_texts(["a cat lying down and looking at the camera", "a red car parked on a street"])
    assert cat @ cat_text > cat @ car_text
    assert cat @ cat_text > rocket @ cat_text
    dog, dog2, money = tower.embed_texts(["a dog runs on the beach", "a puppy playing in the sand", "quarterly revenue grew"])
    assert dog @ dog2 > dog @ money


@pytest.mark.parametrize("arch", sorted(DEFAULT_WEIGHTS))
def test_channels_last_gives_the_contiguous_features(arch: str, photos: dict[str, Image.Image]) -> None:
    """NHWC is a memory order only: the same features as the NCHW forward pass."""
    tower = load_mmrag(f"mmrag:{arch}")
    pixels = np.stack([prepare_pixels(im, tower.preprocess) for im in photos.values()])
    x = pixels_to_tensor(pixels, tower.preprocess)
    nchw = copy.deepcopy(tower.image_net).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        expected = tower.image_head(nchw.forward_features(x.contiguous()).flatten(2).transpose(1, 2))
        got = tower._image_features(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_precision_stays_close_to_fp32(tower: Encoder, photos: dict[str, Image.Image]) -> None:
    fast = load_encoder(DEFAULT_SPEC, precision="bf16")
    assert fast.precision == "bf16" and fast.spec == tower.spec and tower.precision == "fp32"
    texts = ["a cat lying down and looking at the camera", "a rocket on a launch pad", "a woman in a space suit"]
    images_fp32, images_bf16 = tower.embed_images(list(photos.values())), fast.embed_images(list(photos.values()))
    texts_fp32, texts_bf16 = tower.embed_texts(texts), fast.embed_texts(texts)
    assert images_bf16.dtype == np.float32
    assert np.min(np.sum(images_fp32 * images_bf16, axis=1)) > 0.98
    assert np.min(np.sum(texts_fp32 * texts_bf16, axis=1)) > 0.98
    assert not np.array_equal(images_fp32, images_bf16)  # bf16 really ran
    np.testing.assert_array_equal(np.argmax(texts_bf16 @ images_bf16.T, axis=1), np.argmax(texts_fp32 @ images_fp32.T, axis=1))


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        load_encoder(DEFAULT_SPEC, precision="fp16")  # type: ignore[arg-type]


def test_spec_round_trip(tower: Encoder) -> None:
    assert tower.spec == DEFAULT_SPEC
    assert load_encoder(tower.spec).spec == tower.spec


def test_user_heads_path_round_trip(tmp_path: Path) -> None:
    src = WEIGHTS_DIR / "lite0-minilm-flickr8k-v1.safetensors"
    copy = tmp_path / "heads.safetensors"
    copy.write_bytes(src.read_bytes())
    encoder = load_mmrag(f"mmrag:lite0-minilm@{copy}")
    assert encoder.spec == f"mmrag:lite0-minilm@{copy}"
    assert load_mmrag(encoder.spec).dim == encoder.dim


def test_missing_heads_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelNotFoundError, match="nope.safetensors"):
        load_mmrag(f"mmrag:lite0-minilm@{missing}")


def test_encode_text_tokens(tower: Encoder) -> None:
    states, mask = tower.encode_text_tokens(["a dog", "two dogs play together in the snow"])
    assert states.shape[0] == 2 and states.shape[2] == 384 and mask.shape == states.shape[:2]
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]
    long_states, long_mask = tower.encode_text_tokens(["dog " * 1000])
    assert long_states.shape[1] == tower.context_length == long_mask.sum()
    ids = tower.tokenizer(["dog " * 1000], truncation=True, max_length=tower.context_length)["input_ids"][0]
    assert ids[-1] == tower.tokenizer.sep_token_id


def test_empty_text_rejected(tower: Encoder) -> None:
    with pytest.raises(ValueError):
        tower.embed_texts(["a dog", "  "])
