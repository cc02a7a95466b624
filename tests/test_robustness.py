"""Issue 3: bad inputs, faults and concurrent use lose nothing and explain themselves.

Each test is one numbered case of the issue, with the real default tower and real engines.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag import Index, IndexMismatchError, ModelNotFoundError, load_encoder
from mmrag.media import load_image
from mmrag.sources import Item, read_manifest
from mmrag.store import StoreLockedError


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture()
def index(tmp_path, encoder):
    with Index.open(tmp_path / "robust.mmrag", encoder) as idx:
        yield idx


def coco_photos(coco_mini: Path, n: int) -> list[Path]:
    return [entry.image for entry in read_manifest(coco_mini / "captions.jsonl")[:n]]


# -- 1. transparency ---------------------------------------------------------------------------
def test_1_transparent_images_flatten_onto_white(tmp_path, index, encoder):
    logo = np.zeros((256, 256, 4), np.uint8)
    logo[64:192, 96:160, 3] = 255  # opaque black bar on a fully transparent field
    red_under = logo.copy()
    red_under[..., 0] = np.where(logo[..., 3] == 0, 255, 0)
    # palette: entry 0 black (the bar), entry 1 bright red, marked transparent, fills the field
    palette = Image.fromarray(np.where(logo[..., 3] == 255, 0, 1).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    grey_alpha = Image.fromarray(np.stack([np.zeros((256, 256), np.uint8), logo[..., 3]], -1), mode="LA")
    files = {
        "black.png": Image.fromarray(logo, "RGBA"),
        "red_under.png": Image.fromarray(red_under, "RGBA"),
        "palette.png": palette,
        "grey_alpha.png": grey_alpha,
    }
    for name, image in files.items():
        image.save(tmp_path / name, **({"transparency": 1} if name == "palette.png" else {}))
    assert Image.open(tmp_path / "palette.png").info.get("transparency") == 1

    report = index.add([tmp_path / name for name in files], progress=False)
    assert (report.added, report.skipped) == (4, [])
    flat = {name: np.asarray(load_image(tmp_path / name)) for name in files}
    for name, pixels in flat.items():  # one documented background: white
        assert tuple(pixels[0, 0]) == (255, 255, 255), name
        assert tuple(pixels[128, 128]) == (0, 0, 0), name
    black, red = encoder.embed_images([load_image(tmp_path / "black.png"), load_image(tmp_path / "red_under.png")])
    assert cosine(black, red) >= 0.999


# -- 2. 16-bit and 2-D inputs ------------------------------------------------------------------
def test_2_sixteen_bit_and_2d_ramps_embed_alike(encoder):
    ramp16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    ramp8 = (ramp16 // 257).astype(np.uint8)
    as_i16 = Image.fromarray(ramp16)
    assert as_i16.mode == "I;16"
    images = [load_image(as_i16), load_image(Image.fromarray(ramp8)), load_image(ramp8)]
    assert len(np.unique(np.asarray(images[0])[..., 0])) >= 250  # about 256 grey levels survive
    vectors = encoder.embed_images(images)
    assert min(cosine(vectors[0], v) for v in vectors[1:]) >= 0.99


# -- 3. tiny images ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1), (3, 3)])
def test_3_tiny_images_get_finite_embeddings(index, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    report = index.add([image], progress=False)
    assert (report.added, report.skipped) == (1, [])
    hit = index.search(image, k=1)[0]
    assert np.isfinite(hit.score) and hit.score == pytest.approx(1.0, abs=1e-3)


# -- 4. a truncated JPEG among 100 good photos -------------------------------------------------
def test_4_truncated_jpeg_is_skipped_unless_allowed(tmp_path, coco_mini, encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco_photos(coco_mini, 100):
        shutil.copy(photo, folder)
    victim = sorted(folder.iterdir())[50]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.7)])

    with Index.open(tmp_path / "strict.mmrag", encoder) as strict:
        started = time.perf_counter()
        report = strict.add(folder, progress=False)
        assert time.perf_counter() - started < 300  # bounded: no hang on the broken file
        assert report.added == 99 == strict.count()
        assert [(Path(s.item).name, s.reason.split(":")[0]) for s in report.skipped] == [(victim.name, "truncated image")]
        assert str(victim) not in {h.uri for h in strict.search("a photo", k=100)}  # no partial embedding

    with Index.open(tmp_path / "lenient.mmrag", encoder) as lenient:
        report = lenient.add(folder, progress=False, allow_truncated=True)
        assert (report.added, report.skipped) == (100, [])


# -- 5. files that lie -------------------------------------------------------------------------
def test_5_files_that_lie_are_reported_one_by_one(tmp_path, coco_mini, index):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for photo in coco_photos(coco_mini, 20):
        shutil.copy(photo, folder)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("shopping list: eggs, milk\n")
    (folder / "error.jpg").write_text("<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>")
    report = index.add(folder, progress=False)
    assert report.added == 20 == index.count()
    reasons = {Path(s.item).name: s.reason for s in report.skipped}
    assert reasons == {
        "zero.jpg": f"empty file: {folder / 'zero.jpg'} has 0 bytes",
        "notes.png": "not an image: looks like a text file",
        "error.jpg": "not an image: looks like an HTML page",
    }
    assert len({h.uri for h in index.search("a photo", k=50)}) == 20  # each stored once


# -- 7. empty text -----------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_7_empty_query_fails_before_any_model_call(index, encoder, monkeypatch, query):
    def must_not_run(texts):
        raise AssertionError("the text tower ran")

    monkeypatch.setattr(encoder, "_text_features", must_not_run)
    with pytest.raises(ValueError, match="empty or whitespace"):
        index.search(query)


def test_7_empty_caption_gives_an_image_only_item(index, sample_photos):
    report = index.add([Item(uri="mem://cat", image=Image.open(sample_photos[1]), captions=["", "  "])], progress=False)
    assert report.added == 1
    assert index.search("a cat", k=5, target="text") == []  # no text vector was stored
    hit = index.search("a cat", k=1)[0]
    assert hit.captions == [] and hit.modality == "image"


# -- 8. ids ------------------------------------------------------------------------------------
def test_8_ids_are_deterministic_and_retries_add_nothing(tmp_path, encoder, sample_photos):
    records = [Item(image=Image.open(p), captions=[f"photo {i}"]) for i, p in enumerate(sample_photos)]
    ids = []
    for name in ("first", "second"):
        with Index.open(tmp_path / name, encoder) as idx:
            idx.add(records, progress=False)
            retry = idx.add(records, progress=False)  # a retry after, say, a timeout
            assert (retry.added, retry.already_present, idx.count()) == (0, 10, 10)
            ids.append(sorted(h.id for h in idx.search("photo", k=10, target="text")))
    assert ids[0] == ids[1]


def test_8_same_caption_different_pixels_are_two_points(index):
    a = Image.new("RGB", (64, 64), (200, 10, 10))
    b = Image.new("RGB", (64, 64), (10, 10, 200))
    report = index.add([Item(image=a, captions=["a square"]), Item(image=b, captions=["a square"])], progress=False)
    assert report.added == 2 == index.count()


# -- 10. dimension change ----------------------------------------------------------------------
def test_10_index_opened_with_another_width_fails_before_any_write(tmp_path, encoder, tiny_arch, sample_photos):
    location = tmp_path / "dims"
    with Index.open(location, encoder) as idx:
        idx.add(sample_photos[:2], progress=False)
    tiny = load_encoder(f"openclip:{tiny_arch}")
    with pytest.raises(IndexMismatchError) as caught:
        Index.open(location, tiny)
    message = str(caught.value)
    assert f"{encoder.dim}-d" in message and f"({tiny.dim}-d)" in message and encoder.spec in message
    with Index.open(location) as idx:
        assert idx.count() == 2


# -- 13. delete and update ---------------------------------------------------------------------
def test_13_deleted_items_stay_deleted_and_updates_replace(tmp_path, encoder, photo_folder):
    location = tmp_path / "updates"
    with Index.open(location, encoder) as idx:
        idx.add(photo_folder, progress=False)
        gone = idx.search("a cat", k=1)[0]
        assert idx.delete([gone.id]) == 1 and idx.count() == 5
        assert idx.delete(["00000000-0000-0000-0000-000000000001"]) == 0
    with Index.open(location) as idx:  # reopened: the delete held
        assert idx.count() == 5 and idx.get([gone.id]) == []
        assert gone.id not in {h.id for h in idx.search("a cat", k=5)}

        # replace one photo's content in place: re-adding leaves only the new version
        target = next(photo_folder.rglob("rocket_launch.jpg"))
        old = [h for h in idx.search(target, k=1)][0]
        shutil.copy(next(photo_folder.rglob("coffee_cup.jpg")), target)
        report = idx.add(photo_folder, progress=False)
        assert (report.added, report.updated, report.already_present) == (1, 1, 4)  # the deleted cat comes back as new
        assert idx.count() == 6
        new = idx.get([old.id])[0]
        assert new.payload["content_hash"] != old.payload["content_hash"]
        assert idx.search(target, k=1)[0].score == pytest.approx(1.0, abs=1e-3)


# -- 14. crash in the middle of ingest ---------------------------------------------------------
def test_14_kill_during_ingest_then_rerun_loses_and_duplicates_nothing(tmp_path, flickr8k):
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = [entry.image for entry in read_manifest(flickr8k / "captions.jsonl", split="dev")[:500]]
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    location = tmp_path / "crash.mmrag"
    command = [sys.executable, "-m", "mmrag.cli", "index", str(folder), "--index", str(location), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (location / "shard").exists():
            time.sleep(0.2)
        time.sleep(6)  # let some batches land
        assert child.poll() is None, "ingest finished before it could be killed; use more photos"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    # The decode workers (forked, so they share the lock) may outlive `wait()` by a few ms: the
    # index must open as soon as the last of them is gone, without any cleanup.
    deadline = time.monotonic() + 10
    while True:
        try:
            idx = Index.open(location)
            break
        except StoreLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with idx:  # opens cleanly after kill -9
        partial = idx.count()
    assert 0 < partial < 500
    with Index.open(location) as idx:
        report = idx.add(folder, progress=False)
        assert report.already_present == partial and report.added == 500 - partial
        assert idx.count() == 500


# -- 15. offline -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("mmrag:lite0-minilm@/nonexistent/heads.safetensors", "/nonexistent/heads.safetensors"),
        ("openclip:ViT-B-32@laion2b_s34b_b79k", "laion2b_s34b_b79k"),
        ("align:/nonexistent/align-base", "/nonexistent/align-base"),
    ],
)
def test_15_missing_weights_fail_at_once_naming_the_file(spec, names, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has
    import open_clip  # noqa: F401  (import time is not load time)
    import transformers  # noqa: F401

    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as caught:
        load_encoder(spec)
    assert time.perf_counter() - started < 1.0
    assert names in str(caught.value)


# -- 16. safe loading --------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs code: a checkpoint that contains it must never be unpickled fully."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_16_pickled_code_in_a_checkpoint_is_never_run(tmp_path, tiny_arch):
    import torch

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, checkpoint)
    with pytest.raises(Exception) as caught:
        load_encoder(f"openclip:{tiny_arch}@{checkpoint}")
    assert not marker.exists()
    assert "weights_only" in str(caught.value) or "Unsupported" in str(caught.value) or "global" in str(caught.value)


def test_16_an_index_folder_holds_no_pickle(tmp_path, encoder, sample_photos):
    location = tmp_path / "nopickle"
    with Index.open(location, encoder) as idx:
        idx.add(sample_photos[:3], progress=False)
    for path in location.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), f"{path} looks like a pickle"


# -- 6. long text ------------------------------------------------------------------------------
def test_6_long_texts_truncate_keeping_the_end_token_and_are_reported(index, encoder):
    context = encoder.context_length
    numbers = " ".join(str(10_000 + 7919 * i) for i in range(40))
    words = " ".join(["the", "dog", "runs", "on", "a", "sunny", "beach"] * 72)[: 500 * 6]  # about 500 words
    just_under = " ".join(["dog"] * (context - 3))  # [CLS] + words + [SEP] = context - 1 tokens
    just_over = " ".join(["dog"] * (context - 1))  # context + 1 tokens
    texts = [numbers, words, just_under, just_over]
    counts = encoder.count_tokens(texts)
    assert counts[2:] == [context - 1, context + 1]
    vectors = encoder.embed_texts(texts)  # nothing raises
    assert np.isfinite(vectors).all()

    states, mask = encoder.encode_text_tokens([just_over, "a dog"])
    assert states.shape[1] == context and mask.sum(1).tolist() == [context, 4]
    for text in (words, just_over):  # a truncated text embeds as its own truncated prefix, end token kept
        ids = encoder.tokenizer(text)["input_ids"]
        prefix = encoder.tokenizer.decode(ids[1 : context - 1])
        assert encoder.count_tokens([prefix]) == [context]
        assert cosine(encoder.embed_texts(text), encoder.embed_texts(prefix)) >= 0.9999

    report = index.add(texts, progress=False)
    assert report.added == 4
    long_ones = {t[:40] for t, n in zip(texts, counts) if n > context}
    assert {label[6:46] for label in report.truncated} == long_ones and len(report.truncated) == len(long_ones) >= 2


def test_6_openclip_counts_tokens_like_its_tokenizer(tiny_arch):
    import open_clip

    tower = load_encoder(f"openclip:{tiny_arch}")
    long_text = "a photo of a dog " * 30
    assert tower.count_tokens(["a cat", long_text]) == [4, 2 + 5 * 30]
    ids = open_clip.get_tokenizer(tiny_arch)([long_text])[0]
    assert int(ids[-1]) == tower.tokenizer.eot_token_id  # truncated, the end token kept


# -- 11. sharing an index in one process -------------------------------------------------------
def test_11_ingest_and_retriever_in_one_process_share_the_index(tmp_path, encoder, sample_photos):
    location = tmp_path / "shared"
    with Index.open(location, encoder) as writer, Index.open(location) as reader:
        writer.add(sample_photos[:4], progress=False)
        assert reader.count() == 4
        assert reader.search(sample_photos[1], k=1)[0].uri == str(sample_photos[1])
    with Index.open(location) as again:
        assert again.count() == 4
