"""Contrastive training of both tower styles: losses, locking, caching, resume, loading back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmrag.encoders import load_encoder
from mmrag.encoders.losses import AlignLoss, ClipLoss, SigLipLoss, make_loss
from mmrag.encoders.metrics import retrieval_recall
from mmrag.encoders.towers import AlignTowers, OpenClipTowers
from mmrag.encoders.preprocess import pixels_to_tensor, prepare_pixels
from mmrag.encoders.trainer import FeatureCache, TrainConfig, grayscale, train_towers

#: hand-written captions for scikit-image's sample photos (mmrag.samples)
CAPTIONS = {
    "astronaut.jpg": ["an astronaut in a white space suit", "a smiling woman astronaut in front of a flag"],
    "cat_chelsea.jpg": ["an orange tabby cat", "a cat looking to the side"],
    "coffee_cup.jpg": ["a cup of coffee on a saucer", "a red coffee cup seen from above"],
    "rocket_launch.jpg": ["a rocket launching into the sky", "a space rocket lifting off in smoke"],
    "cameraman.jpg": ["a man with a camera on a tripod", "a black and white photo of a photographer"],
    "hubble_deep_field.jpg": ["stars and galaxies in deep space", "a telescope image of many galaxies"],
    "coins.jpg": ["old coins laid out in rows", "many round coins on a grey background"],
    "moon_surface.jpg": ["the cratered surface of the moon", "a grey rocky lunar surface"],
    "microscopy_slide.jpg": ["stained cells under a microscope", "a microscope slide of brown and blue cells"],
    "book_page.jpg": ["a page of printed text from a book", "an old book page covered in writing"],
}


@pytest.fixture(scope="module")
def pairs(sample_photos) -> list[tuple[Path, list[str]]]:
    return [(path, CAPTIONS[path.name]) for path in sample_photos]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


def quick(**overrides) -> TrainConfig:
    """A few full-batch steps: enough to see learning on ten photos, seconds on a CPU."""
    base = dict(epochs=4, batch_size=10, lr=5e-3, backbone_lr=1e-4, warmup_steps=1, patience=0, extract_batch_size=10)
    return TrainConfig(**{**base, **overrides})


def loaded_recall(spec: str, pairs) -> dict[str, float]:
    encoder = load_encoder(spec)
    images = encoder.embed_images([Image.open(path) for path, _ in pairs])
    texts = encoder.embed_texts([c for _, captions in pairs for c in captions])
    return retrieval_recall(images, texts, np.repeat(np.arange(len(pairs)), 2))


# -- losses --------------------------------------------------------------------------------------
def test_clip_loss_matches_hand_computation() -> None:
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    loss = ClipLoss(init_temperature=0.5)
    logits = 2.0 * image @ text.T
    expected = (-(logits.log_softmax(1).diagonal().mean()) - logits.log_softmax(0).diagonal().mean()) / 2
    assert loss(image, text).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.temperature == pytest.approx(0.5)


def test_align_loss_smooths_labels_and_siglip_counts_every_pair() -> None:
    image = torch.eye(3)
    text = torch.eye(3)
    clip, align = ClipLoss(0.1), AlignLoss(0.1, label_smoothing=0.1)
    # perfectly matched pairs: CLIP's loss goes to ~0, smoothing keeps a floor above it
    assert clip(image, text).item() < 1e-3
    assert align(image, text).item() > 0.1
    siglip = SigLipLoss(init_scale=10.0, init_bias=-10.0)
    logits = 10.0 * image @ text.T - 10.0
    signs = 2 * torch.eye(3) - 1
    expected = -torch.nn.functional.logsigmoid(signs * logits).sum() / 3
    assert siglip(image, text).item() == pytest.approx(expected.item(), rel=1e-6)
    siglip(image, text).backward()
    assert siglip.logit_bias.grad is not None and siglip.logit_scale.grad is not None


def test_make_loss_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        make_loss("triplet")
    with pytest.raises(ValueError, match="label_smoothing"):
        make_loss("align", label_smoothing=1.0)


# -- the ALIGN-style split ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def align_towers() -> AlignTowers:
    return AlignTowers("lite0", "minilm")


@pytest.mark.parametrize("unlocked", [1, 3, -1])
def test_text_prefix_and_rest_compose_to_the_full_model(align_towers: AlignTowers, unlocked: int) -> None:
    texts = ["a dog runs along the beach at sunset", "two kids"]  # unequal lengths: padding matters
    align_towers.lock(0, 0)
    with torch.no_grad():
        full = align_towers.text_rest(*_prefix_and_mask(align_towers, texts))
        align_towers.lock(0, unlocked)
        split = align_towers.text_rest(*_prefix_and_mask(align_towers, texts))
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def _prefix_and_mask(towers: AlignTowers, texts: list[str]):
    values, lengths = towers.text_prefix(texts)
    return values, torch.arange(values.shape[1])[None, :] < lengths[:, None]


@pytest.mark.parametrize("unlocked", [1, 2, -1])
def test_image_prefix_and_rest_compose_to_the_full_model(align_towers: AlignTowers, unlocked: int) -> None:
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        align_towers.lock(0, 0)
        full = align_towers.image_rest(align_towers.image_prefix(pixels))
        align_towers.lock(unlocked, 0)
        split = align_towers.image_rest(align_towers.image_prefix(pixels))
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)
    assert align_towers.has_image_prefix() == (unlocked != -1)


def test_lock_freezes_all_but_the_last_blocks(align_towers: AlignTowers) -> None:
    align_towers.lock(1, 2)
    trainable = {name for name, p in align_towers.named_parameters() if p.requires_grad}
    assert any(name.startswith("image_net.conv_head") for name in trainable)
    assert not any(name.startswith("image_net.blocks.") for name in trainable)
    assert {name.split(".")[3] for name in trainable if name.startswith("text_net.encoder.layer.")} == {"4", "5"}
    assert any(name.startswith("image_head.") for name in trainable)
    align_towers.lock(0, 0)


def test_feature_cache_computes_only_images_it_has_not_seen(align_towers: AlignTowers, sample_photos, tmp_path: Path) -> None:
    """train+dev after train, or a grown folder, reuses every cached image; batching never matters."""
    align_towers.lock(0, 0)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.images(align_towers, sample_photos[:4], "flip", batch_size=3)
    (folder,) = (tmp_path / "cache").glob("image-flip-*")
    written = {path: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert len(written) == 4

    grown = cache.images(align_towers, sample_photos[2:] + sample_photos[:2], "flip", batch_size=3)
    assert {path: path.stat().st_mtime_ns for path in written} == written  # the four kept, untouched
    assert len(list(folder.iterdir())) == len(sample_photos)
    np.testing.assert_array_equal(grown[-2:], first[:2])
    np.testing.assert_array_equal(grown[:2], first[2:4])

    fresh = FeatureCache(tmp_path / "fresh").images(align_towers, sample_photos, "flip", batch_size=len(sample_photos))
    order = [sample_photos.index(p) for p in sample_photos[2:] + sample_photos[:2]]
    np.testing.assert_allclose(grown.astype(np.float32), fresh[order].astype(np.float32), atol=2e-3, rtol=2e-3)  # fp16 ulps
    with Image.open(sample_photos[0]) as im:
        mirrored = align_towers.image_prefix(pixels_to_tensor(
            np.ascontiguousarray(prepare_pixels(im, align_towers.preprocess)[None, :, ::-1]), align_towers.preprocess))
    np.testing.assert_allclose(first[0].astype(np.float32), mirrored[0].detach().numpy(), atol=2e-2, rtol=1e-2)


# -- training runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "align", "siglip"])
def test_align_style_tower_trains_with_each_loss(pairs, cache, tmp_path: Path, loss: str) -> None:
    out = tmp_path / "run"
    result = train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, out, quick(loss=loss, epochs=5), cache)
    assert result.spec == f"mmrag:lite0-minilm@{(out / 'model.safetensors').resolve()}"
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < history[0]["loss"]
    assert (out / "curves.png").stat().st_size > 10_000
    # ten photos, two captions each: the heads learn them far above chance (R@1 0.1 / 0.2)
    assert result.dev_recall["t2i_r1"] >= 0.5 and result.dev_recall["i2t_r1"] >= 0.5
    # the saved model, loaded through the registry, scores what the trainer measured
    recall = loaded_recall(result.spec, pairs)
    assert recall["t2i_r1"] == pytest.approx(result.dev_recall["t2i_r1"], abs=0.1)


def test_grayscale_is_pils_luma_in_three_channels(sample_photos) -> None:
    with Image.open(sample_photos[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
        luma = np.asarray(im.convert("L")).astype(int)
    grey = grayscale(rgb[None])[0]
    assert grey.shape == rgb.shape and (grey == grey[..., :1]).all()
    assert np.abs(grey[..., 0].astype(int) - luma).max() <= 1  # rounding differs by one at most


def test_flip_gray_caches_a_grey_view_and_trains(pairs, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, tmp_path / "run", quick(augment="flip-gray"), cache)
    assert sorted(p.name.split("-")[1] for p in cache.glob("image-*")) == ["flip", "gray", "orig"]
    (gray,) = cache.glob("image-gray-*")
    assert len(list(gray.iterdir())) == len(pairs)
    assert result.dev_recall["t2i_r1"] >= 0.5 and result.dev_recall["i2t_r1"] >= 0.5
    # with nothing locked the views are drawn from cached pixels each step instead
    whole = train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, tmp_path / "whole",
                         quick(augment="flip-gray", epochs=1, image_unlocked=-1), cache)
    assert math.isfinite(whole.history[0]["loss"]) and list(cache.glob("image-pixels-*"))


def test_unlocked_blocks_are_saved_beside_the_heads(pairs, cache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = quick(epochs=1, image_unlocked=1, text_unlocked=1, backbone_lr=1e-3)
    train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, out, config, cache)
    stored = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("image_tower.conv_head.") for k in stored)
    assert any(k.startswith("text_tower.encoder.layer.5.") for k in stored)
    assert not any(k.startswith(("image_tower.blocks.", "text_tower.encoder.layer.4.")) for k in stored)


def test_saved_towers_load_back_with_their_trained_blocks(sample_photos, tmp_path: Path) -> None:
    towers = AlignTowers("lite0", "minilm")
    towers.lock(2, 1)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for param in towers.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    spec = towers.save(tmp_path / "model.safetensors", {})
    shipped = "mmrag:lite0-minilm@flickr8k-v1"  # shares the pretrained MiniLM with any lite0-minilm tower
    default_before = load_encoder(shipped).embed_texts(["stars"])
    encoder = load_encoder(spec)
    texts = ["a cup of coffee on a saucer", "stars"]
    photos = [Image.open(path) for path in sample_photos[:3]]
    towers.eval()
    with torch.no_grad():
        values, mask = _prefix_and_mask(towers, texts)
        text = torch.nn.functional.normalize(towers.text_rest(values, mask), dim=-1).numpy()
        from mmrag.encoders.preprocess import pixels_to_tensor, prepare_pixels

        pixels = pixels_to_tensor(np.stack([prepare_pixels(p, towers.preprocess) for p in photos]), towers.preprocess)
        image = torch.nn.functional.normalize(towers.image_rest(towers.image_prefix(pixels)), dim=-1).numpy()
    # float16 storage of the trained tensors: close, not bit-equal
    np.testing.assert_allclose(encoder.embed_texts(texts), text, atol=1e-2)
    np.testing.assert_allclose(encoder.embed_images(photos), image, atol=1e-2)
    # the trained blocks are the loaded tower's own copy: the shared backbone stays pretrained
    assert encoder.text_net is not load_encoder(shipped).text_net
    np.testing.assert_array_equal(load_encoder(shipped).embed_texts(["stars"]), default_before)


def test_resumed_run_matches_an_uninterrupted_one(pairs, cache, tmp_path: Path) -> None:
    config = quick(epochs=3, text_unlocked=1, image_unlocked=1, augment="flip")

    def towers() -> AlignTowers:
        torch.manual_seed(0)  # fresh heads start equal; a resumed run loads its own from the checkpoint
        return AlignTowers("lite0", "minilm")

    whole = train_towers(towers(), pairs, pairs, tmp_path / "whole", config, cache)
    part = train_towers(towers(), pairs, pairs, tmp_path / "part", config, cache, stop_after=1)
    assert len(part.history) == 1
    torch.manual_seed(123)  # a different start, overwritten by the checkpoint
    resumed = train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, tmp_path / "part", config, cache)
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in whole.history]
    a, b = load_file(str(tmp_path / "whole/checkpoint/model.safetensors")), load_file(str(tmp_path / "part/checkpoint/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_resume_refuses_another_config(pairs, cache, tmp_path: Path) -> None:
    train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, tmp_path, quick(epochs=1), cache)
    with pytest.raises(ValueError, match="another config"):
        train_towers(AlignTowers("lite0", "minilm"), pairs, pairs, tmp_path, quick(epochs=1, lr=1.0), cache)


# -- OpenCLIP-style -----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "align", "siglip"])
def test_openclip_tower_trains_from_scratch_with_each_loss(tiny_arch: str, pairs, cache, tmp_path: Path, loss: str) -> None:
    out = tmp_path / "run"
    config = quick(loss=loss, epochs=3, image_unlocked=-1, text_unlocked=-1, augment="crop", lr=1e-3)
    result = train_towers(OpenClipTowers(f"openclip:{tiny_arch}"), pairs, pairs, out, config, cache)
    assert result.spec == f"openclip:local-dir:{(out / 'model').resolve()}"
    history = result.history
    assert all(math.isfinite(row["loss"]) for row in history)
    assert history[-1]["loss"] < history[0]["loss"]
    encoder = load_encoder(result.spec)
    assert encoder.dim == 32
    assert np.isfinite(encoder.embed_texts(["a rocket"])).all()


def test_openclip_lit_keeps_the_locked_image_tower(tiny_arch: str, pairs, cache, tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    start = open_clip.create_model(tiny_arch, pretrained=None)
    checkpoint = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(checkpoint))
    spec = f"openclip:{tiny_arch}@{checkpoint}"
    before = load_encoder(spec)
    config = quick(epochs=2, image_unlocked=0, text_unlocked=-1, lr=1e-3)
    result = train_towers(OpenClipTowers(spec), pairs, pairs, tmp_path / "lit", config, cache)
    after = load_encoder(result.spec)
    photos = [Image.open(path) for path, _ in pairs[:3]]
    np.testing.assert_allclose(after.embed_images(photos), before.embed_images(photos), atol=1e-6)
    assert not np.allclose(after.embed_texts(["a rocket"]), before.embed_texts(["a rocket"]), atol=1e-3)


# -- multilingual text tower ------------------------------------------------------------------------
def test_any_transformers_model_is_a_text_tower(tiny_xlmr_dir: Path, pairs, cache, tmp_path: Path) -> None:
    """A (tiny, random) XLM-RoBERTa with a locally built multilingual tokenizer, trained end to end."""
    towers = AlignTowers("lite0", str(tiny_xlmr_dir), context_length=64)
    config = quick(epochs=6, batch_size=5, text_unlocked=-1, lr=3e-4, backbone_lr=3e-4)
    result = train_towers(towers, pairs, pairs, tmp_path / "run", config, cache)
    assert result.spec.startswith("mmrag:lite0-hf@")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    stored = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("text_tower.embeddings.") for k in stored)  # the whole text tower trained
    encoder = load_encoder(result.spec)
    texts = ["eine Katze auf dem Sofa", "月の表面", "a rocket launching into the sky"]
    vectors = encoder.embed_texts(texts)
    assert vectors.shape == (3, 512) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({tuple(v.round(4)) for v in vectors}) == 3


# -- the command line: a small run of each style on coco_mini, then `mmrag eval` --------------------
def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from mmrag.cli import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_trains_and_evaluates_both_styles(coco_mini: Path, tmp_path: Path) -> None:
    import json as _json

    from tests.conftest import TINY_ARCH, TINY_CLIP_CFG

    manifest = str(coco_mini / "captions.jsonl")
    common = ["--train-split", "train2017", "--dev-split", "val2017", "--cache", str(tmp_path / "cache"), "--seed", "0"]
    align = _json.loads(_cli("train", manifest, "--out", str(tmp_path / "align"), "--loss", "siglip", "--epochs", "3",
                             "--batch-size", "40", "--lr", "3e-3", "--warmup-steps", "1", *common).splitlines()[-1])
    assert align["spec"].startswith("mmrag:lite0-minilm@") and (tmp_path / "align" / "curves.png").is_file()

    config = tmp_path / f"{TINY_ARCH}.json"
    config.write_text(_json.dumps(TINY_CLIP_CFG))
    clip = _json.loads(_cli("train", manifest, "--out", str(tmp_path / "clip"), "--style", "openclip", "--model", TINY_ARCH,
                            "--model-config", str(config), "--image-unlocked", "-1", "--text-unlocked", "-1",
                            "--augment", "crop", "--epochs", "2", "--batch-size", "40", *common).splitlines()[-1])
    assert clip["spec"].startswith("openclip:local-dir:")

    for run in (align, clip):
        figures = _json.loads(_cli("eval", manifest, "--split", "val2017", "--encoder", run["spec"], "--json"))
        assert figures["retrieval"]["recall"] == pytest.approx(run["dev_recall"], abs=0.02)
        assert 0.0 < figures["zero_shot"]["mAP"] <= 1.0
    # heads trained on 80 photos over the pretrained backbones beat chance (R@10 of 79 images ~ 0.13)
    assert align["dev_recall"]["t2i_r10"] > 0.3
