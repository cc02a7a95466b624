"""Index end to end with the real default tower on real Qdrant engines (Edge and :memory:)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import mmrag
from mmrag import Index, IndexMismatchError


@pytest.fixture(params=["edge", "memory"])
def index(request, tmp_path, encoder):
    location = str(tmp_path / "index.mmrag") if request.param == "edge" else ":memory:"
    with Index.open(location, encoder) as idx:
        yield idx


def test_folder_is_indexed_once_and_searchable(index, photo_folder):
    report = index.add(photo_folder, progress=False)
    assert (report.added, report.already_present, report.skipped) == (6, 0, [])
    assert index.count() == 6

    again = index.add(photo_folder, progress=False)
    assert (again.added, again.already_present) == (0, 6)
    assert index.count() == 6


def test_home_relative_paths_are_expanded(index, photo_folder, monkeypatch):
    monkeypatch.setenv("HOME", str(photo_folder.parent))
    report = index.add("~/photos", progress=False)
    assert (report.added, report.skipped) == (6, [])
    assert all(not hit.uri.startswith("~") for hit in index.search("a cat", k=6))


def test_a_lone_path_that_names_nothing_is_an_error_not_a_text(index):
    """A mistyped folder must not be stored as a text item that later matches text queries."""
    for missing in ("/nonexistent/folder", "~/no such folder here", "./nope"):
        with pytest.raises(FileNotFoundError, match="pass it in a list"):
            index.add(missing, progress=False)
    assert index.count() == 0
    assert index.add(["~/no such folder here"], progress=False).added == 1  # asked for as a text: a text


def test_image_query_finds_itself_first(index, photo_folder):
    index.add(photo_folder, progress=False)
    for photo in sorted(photo_folder.rglob("*.jpg"))[:3]:
        hits = index.search(photo, k=3)
        assert hits[0].uri == str(photo)
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_text_query_finds_the_cat_photo(index, sample_photos):
    index.add(sample_photos, progress=False)
    hits = index.search("a photo of a cat", k=1)
    assert hits[0].uri.endswith("cat_chelsea.jpg")


def test_texts_pil_arrays_and_bytes_are_items(index, sample_photos):
    cat = Image.open(sample_photos[1])
    report = index.add(
        ["a red double-decker bus", "a bowl of soup", cat, np.asarray(cat.convert("L")), sample_photos[0].read_bytes()],
        progress=False,
    )
    assert report.added == 5 and report.skipped == []
    text_hits = index.search("a london bus", k=2, target="text")
    assert text_hits[0].captions == ["a red double-decker bus"] and text_hits[0].modality == "text"
    # image -> text: a photo query against the text vectors
    assert index.search(cat, k=5, target="text")[0].modality == "text"


def test_captions_give_both_vectors_and_fused_search(index, sample_photos):
    from mmrag.sources import Item

    items = [Item(uri=str(p), image=p, captions=[f"caption {i}", "a picture"]) for i, p in enumerate(sample_photos[:4])]
    items.append(Item(uri=str(sample_photos[4]), image=sample_photos[4], captions=["", "  "]))  # image-only
    assert index.add(items, progress=False).added == 5
    fused = index.search("a picture", k=5, target="both")
    assert len(fused) == 5 and {h.uri for h in fused} == {str(p) for p in sample_photos[:5]}
    assert index.get([fused[0].id])[0].id == fused[0].id
    image_only = [h for h in fused if h.uri == str(sample_photos[4])][0]
    assert image_only.captions == []


def test_similar_searches_by_a_stored_item_and_leaves_it_out(index, sample_photos):
    index.add(sample_photos, progress=False)
    cat = index.search(sample_photos[1], k=1)[0]
    like_cat = index.similar(cat.id, k=3)
    by_pixels = [h.id for h in index.search(sample_photos[1], k=4)][1:]
    assert [h.id for h in like_cat] == by_pixels  # the stored vector is the query, the item itself left out
    assert len(index.similar(cat.id.upper(), k=20, target="both")) == len(sample_photos) - 1
    with pytest.raises(KeyError):
        index.similar("00000000-0000-0000-0000-000000000000")


def test_delete_by_id(index, photo_folder):
    index.add(photo_folder, progress=False)
    doomed = index.search("a cat", k=2)
    assert index.delete([h.id for h in doomed] + ["00000000-0000-0000-0000-000000000000"]) == 2
    assert index.count() == 4
    assert all(h.id not in {d.id for d in doomed} for h in index.search("a cat", k=4))


def test_bad_files_are_skipped_by_name_and_good_ones_indexed(index, photo_folder):
    good = sorted(photo_folder.rglob("*.jpg"))
    data = good[0].read_bytes()
    (photo_folder / "truncated.jpg").write_bytes(data[: int(len(data) * 0.7)])
    (photo_folder / "empty.jpg").write_bytes(b"")
    (photo_folder / "nested" / "notes.jpg").write_text("not a photo at all\n")
    report = index.add(photo_folder, progress=False)
    assert report.added == len(good) == 6
    reasons = {s.item.rsplit("/", 1)[-1]: s.reason for s in report.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert reasons["truncated.jpg"].startswith("truncated image")
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["notes.jpg"].startswith("not an image")
    assert index.count() == 6


def test_empty_query_is_a_clear_error(index):
    for query in ["", "   ", "\n\t"]:
        with pytest.raises(ValueError, match="empty"):
            index.search(query)


def test_index_records_its_encoder_and_refuses_another(tmp_path, encoder, sample_photos):
    location = tmp_path / "idx"
    with Index.open(location, encoder) as idx:
        idx.add(sample_photos[:2], progress=False)
    with Index.open(location) as reopened:  # no encoder given: the recorded one
        assert reopened.encoder.spec == encoder.spec and reopened.count() == 2
    with pytest.raises(IndexMismatchError, match="built with encoder"):
        Index.open(location, "openclip:ViT-B-32@laion2b_s34b_b79k")
    with Index.open(location) as still_there:  # the refused open lost nothing
        assert still_there.count() == 2


def test_edge_index_persists_across_reopen(tmp_path, encoder, photo_folder):
    location = tmp_path / "persist"
    with Index.open(location, encoder) as idx:
        idx.add(photo_folder, progress=False)
        before = [h.id for h in idx.search("a rocket launch", k=6)]
    copy = tmp_path / "copied"
    shutil.copytree(location, copy)  # an index folder is self-contained
    with Index.open(copy, encoder) as idx:
        assert idx.count() == 6
        assert [h.id for h in idx.search("a rocket launch", k=6)] == before


def test_public_names():
    assert mmrag.Index is Index and callable(mmrag.load_encoder)
