"""Safe decoding: real photos decode; empty, truncated, lying and oversized files say exactly why not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmrag.encoders.preprocess import ALPHA_BACKGROUND, PreprocessConfig, prepare_pixels
from mmrag.media import ImageDecodeError, decode_bytes, load_image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_real_photo_decodes_to_rgb(sample_photos):
    image = load_image(sample_photos[0])
    assert image.mode == "RGB" and image.size == (512, 512)


def test_empty_file_is_reported(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(empty)
    assert caught.value.reason == "empty file"


def test_truncated_jpeg_is_reported(sample_photos):
    data = sample_photos[0].read_bytes()
    with pytest.raises(ImageDecodeError) as caught:
        decode_bytes(data[: int(len(data) * 0.7)])
    assert caught.value.reason == "truncated image"


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"just some notes\n", "looks like a text file"), (b"<!DOCTYPE html><html><body>404</body></html>", "looks like an HTML page")],
)
def test_files_that_lie_about_being_images(tmp_path, content, expected):
    liar = tmp_path / "photo.png"
    liar.write_bytes(content)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(liar)
    assert caught.value.reason == "not an image"
    assert expected in str(caught.value)


def test_oversized_image_is_refused_before_decoding():
    data = jpeg_bytes(Image.new("RGB", (300, 300)))
    with pytest.raises(ImageDecodeError) as caught:
        decode_bytes(data, max_pixels=300 * 299)
    assert caught.value.reason == "image too large"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_bytes(buffer.getvalue()).size == (20, 40)


def test_transparency_is_flattened_onto_the_documented_background():
    black_logo = np.zeros((64, 64, 4), np.uint8)
    black_logo[16:48, 16:48, 3] = 255  # opaque black square, transparent elsewhere
    red_under = black_logo.copy()
    red_under[..., 0] = np.where(red_under[..., 3] == 0, 255, 0)
    a = np.asarray(load_image(Image.fromarray(black_logo, "RGBA")))
    b = np.asarray(load_image(Image.fromarray(red_under, "RGBA")))
    assert (a == b).all()
    assert tuple(a[0, 0]) == ALPHA_BACKGROUND and tuple(a[32, 32]) == (0, 0, 0)


def test_16bit_greyscale_keeps_its_range():
    ramp16 = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    image = load_image(Image.fromarray(ramp16))  # mode I;16
    assert Image.fromarray(ramp16).mode == "I;16"
    assert len(np.unique(np.asarray(image)[..., 0])) >= 250
    assert np.array_equal(np.asarray(image), np.asarray(load_image(ramp16)))


def test_prepare_pixels_gives_the_towers_square():
    pixels = prepare_pixels(Image.new("RGB", (640, 333)), PreprocessConfig(size=224))
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
