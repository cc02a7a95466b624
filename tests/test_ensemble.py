"""`ensemble:` towers: one embedding whose dot product is the mean of the members' cosines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmrag.encoders import DEFAULT_SPEC, load_encoder
from mmrag.encoders.ensemble import EnsembleEncoder

V1, V2 = "mmrag:lite0-minilm@flickr8k-v1", "mmrag:lite2-minilm@flickr8k-v2"
TEXTS = ["a cat lying down and looking at the camera", "a rocket on a launch pad", "two dogs play in the snow"]


@pytest.fixture(scope="module")
def members():
    return load_encoder(V1), load_encoder(V2)


@pytest.fixture(scope="module")
def ensemble():
    return load_encoder(f"ensemble:{V1}+{V2}")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.rocket())]


def test_the_default_tower_is_the_two_shipped_towers(ensemble: EnsembleEncoder) -> None:
    assert ensemble.spec == DEFAULT_SPEC
    assert ensemble.dim == 1024 and ensemble.preprocess.size == 260  # Lite2's input; Lite0 gets a resize
    assert load_encoder(ensemble.spec).spec == ensemble.spec
    # both members read one MiniLM, loaded once, and a text runs through it once
    assert ensemble.members[0].text_net is ensemble.members[1].text_net
    assert ensemble.members[0].text_states_key == ensemble.members[1].text_states_key


def test_text_scores_are_the_mean_of_the_members(ensemble: EnsembleEncoder, members) -> None:
    joint = ensemble.embed_texts(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1.0, atol=1e-5)
    mean = sum(m.embed_texts(TEXTS) @ m.embed_texts(TEXTS).T for m in members) / 2
    np.testing.assert_allclose(joint @ joint.T, mean, atol=1e-5)


def test_image_text_scores_are_the_mean_of_the_members(ensemble: EnsembleEncoder, members, photos) -> None:
    """Exact for the 260 px member. The 224 px one sees a tensor resize of the same 260 px crop, not
    PIL's resize of the photo: its embeddings move by up to 0.02 in cosine (the rocket; 0.0014 the cat)."""
    joint = ensemble.embed_images(photos) @ ensemble.embed_texts(TEXTS).T
    mean = sum(m.embed_images(photos) @ m.embed_texts(TEXTS).T for m in members) / 2
    np.testing.assert_allclose(joint, mean, atol=0.03)
    lite2_part = ensemble.embed_images(photos)[:, 512:] * np.sqrt(2)
    np.testing.assert_allclose(lite2_part, members[1].embed_images(photos), atol=1e-5)
    assert np.argmax(joint[0]) == 0 and np.argmax(joint[1]) == 1  # cat -> the cat caption, rocket -> rocket


def test_text_tokens_and_counts_come_from_the_first_member(ensemble: EnsembleEncoder, members) -> None:
    states, mask = ensemble.encode_text_tokens(["a dog"])
    first_states, first_mask = members[0].encode_text_tokens(["a dog"])
    assert states.shape == first_states.shape and bool((mask == first_mask).all())
    assert ensemble.count_tokens(["a dog", "two dogs"]) == members[0].count_tokens(["a dog", "two dogs"])


@pytest.mark.parametrize("spec, message", [
    (f"ensemble:{V1}", "not of the form"),
    (f"ensemble:{V1}+", "not of the form"),
    (f"ensemble:ensemble:{V1}+{V2}", "nests an ensemble"),
])
def test_bad_ensemble_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_encoder(spec)


def test_members_must_normalise_pixels_alike(members, tiny_arch: str) -> None:
    clip = load_encoder(f"openclip:{tiny_arch}")  # CLIP's mean and std, not the Lite towers' 0.5
    with pytest.raises(ValueError, match="normalise pixels differently"):
        EnsembleEncoder([members[0], clip])
