"""Curation: pair scores on real Flickr8k dev pairs with known wrong ones, filtering and the
filtered manifest, exact and near duplicate photos, a tiny open_clip tower, and `mmrag score`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmrag import load_encoder
from mmrag.cli import app
from mmrag.curation import (
    PairScore,
    duplicate_groups,
    filtered_entries,
    near_duplicate_vectors,
    parse_keep_top,
    roc_auc,
    score_pairs,
    select_pairs,
    shuffle_captions,
    write_manifest,
    write_scores,
)
from mmrag.sources import read_manifest

runner = CliRunner(env={"COLUMNS": "400"})


# -- the pieces, by hand -------------------------------------------------------------------------

def pairs_with(scores: list[float]) -> list[PairScore]:
    return [PairScore(i // 2, f"/img{i // 2}.jpg", i % 2, f"caption {i}", s) for i, s in enumerate(scores)]


def test_roc_auc_counts_ties_half_and_matches_scikit_learn():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [True, True])
    rng = np.random.default_rng(0)
    scores, positive = rng.integers(0, 5, 300).astype(float), rng.random(300) < 0.3  # many ties
    pytest.importorskip("sklearn")
    from sklearn.metrics import roc_auc_score

    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))


def test_select_pairs_by_score_count_and_fraction():
    pairs = pairs_with([0.30, 0.10, 0.25, 0.25, 0.05, 0.40])
    assert [p.score for p in select_pairs(pairs, min_score=0.25)] == [0.30, 0.25, 0.25, 0.40]
    assert [p.score for p in select_pairs(pairs, keep_count=3)] == [0.30, 0.25, 0.40]  # a tie: manifest order
    assert [p.score for p in select_pairs(pairs, keep_fraction=0.5)] == [0.30, 0.25, 0.40]
    assert [p.score for p in select_pairs(pairs, keep_count=3, min_score=0.3)] == [0.30, 0.40]
    assert select_pairs(pairs) == pairs and select_pairs(pairs, keep_fraction=0.0) == []
    with pytest.raises(ValueError, match="not both"):
        select_pairs(pairs, keep_count=1, keep_fraction=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        select_pairs(pairs, keep_fraction=1.5)


def test_keep_top_is_a_count_or_a_percentage():
    assert parse_keep_top("4000") == (4000, None) and parse_keep_top("80%") == (None, 0.8)
    for bad in ("0.8", "80 percent", "-3", "120%"):
        with pytest.raises(ValueError, match="percentage"):
            parse_keep_top(bad)


def test_duplicate_groups_link_near_pairs_and_collapse_exact_copies(tmp_path):
    for name, data in (("a", b"one"), ("a_copy", b"one"), ("b", b"two"), ("c", b"three"), ("d", b"four")):
        (tmp_path / f"{name}.jpg").write_bytes(data)  # only hashed here, never decoded
    paths = [str(tmp_path / f"{n}.jpg") for n in ("a", "a_copy", "b", "c", "d", "a")]  # `a` listed twice
    vectors = np.array([[np.cos(np.radians(d)), np.sin(np.radians(d))] for d in (0, 0, 15, 30, 90, 0)], dtype=np.float32)
    groups = duplicate_groups(paths, vectors, near_threshold=float(np.cos(np.radians(16))))
    assert groups.exact == [paths[:2]]
    assert groups.near == [[paths[0], paths[2], paths[3]]]  # a~b and b~c at 15 degrees: one group; d apart
    assert duplicate_groups(paths, vectors, near_threshold=0.999).near == []
    with pytest.raises(ValueError, match="cosine"):
        duplicate_groups(paths, vectors, near_threshold=1.5)


# -- Flickr8k dev: real pairs, 20% deliberately wrong --------------------------------------------

@pytest.fixture(scope="module")
def flickr_scored(encoder, flickr8k, tmp_path_factory):
    """200 dev images x 5 captions, the captions of 20% of the images moved to others (seeded)."""
    entries, moved = shuffle_captions(read_manifest(flickr8k / "captions.jsonl", split="dev")[:200], 0.2, seed=0)
    manifest = tmp_path_factory.mktemp("flickr") / "shuffled" / "captions.jsonl"
    write_manifest(entries, manifest)
    return manifest, moved, score_pairs(encoder, manifest, progress=False)


def test_shuffled_captions_all_moved_to_another_image(flickr8k):
    original = read_manifest(flickr8k / "captions.jsonl", split="dev")[:50]
    entries, moved = shuffle_captions(original, 0.2, seed=3)
    assert sum(moved) == 10
    for before, after, was_moved in zip(original, entries, moved):
        assert after.image == before.image and (after.captions != before.captions) == was_moved
    assert sorted(map(tuple, (e.captions for e in entries))) == sorted(map(tuple, (e.captions for e in original)))


def test_score_separates_right_pairs_from_shuffled_ones(flickr_scored):
    _, moved, scored = flickr_scored
    assert (len(scored.entries), len(scored.pairs), sum(moved)) == (200, 1000, 40)
    right = [not moved[p.entry] for p in scored.pairs]
    auc = roc_auc([p.score for p in scored.pairs], right)
    assert auc >= 0.9, auc  # measured: 0.986 on these 200; 0.975-0.982 on all 1,000 (tests/bench/curation.py)
    kept = select_pairs(scored.pairs, keep_fraction=0.8)
    dropped_wrong = sum(moved[p.entry] for p in scored.pairs) - sum(moved[p.entry] for p in kept)
    assert len(kept) == 800 and dropped_wrong >= 150  # of the 200 wrong pairs; measured: 175


def test_filtered_manifest_resolves_from_its_new_folder(flickr_scored, tmp_path):
    manifest, _, scored = flickr_scored
    kept = select_pairs(scored.pairs, min_score=float(np.median([p.score for p in scored.pairs])))
    out = tmp_path / "elsewhere" / "clean" / "captions.jsonl"
    write_manifest(filtered_entries(scored.entries, kept), out)
    reread = read_manifest(out)
    assert sum(len(e.captions) for e in reread) == len(kept) and 0 < len(reread) <= 200
    assert all(e.image.is_file() for e in reread)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["image"].startswith("../") and first["split"] == "dev"  # relative to the new file, metadata kept
    by_pair = {(str(Path(p.image).resolve()), p.caption) for p in kept}
    assert all((str(e.image.resolve()), c) in by_pair for e in reread for c in e.captions)


def test_scores_written_as_jsonl_and_csv(flickr_scored, tmp_path):
    _, _, scored = flickr_scored
    write_scores(scored.pairs[:7], tmp_path / "s.jsonl")
    write_scores(scored.pairs[:7], tmp_path / "s.csv")
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = list(csv.DictReader((tmp_path / "s.csv").open(encoding="utf-8")))
    assert len(lines) == len(rows) == 7
    assert lines[0] == {"entry": 0, "image": scored.pairs[0].image, "caption_index": 0,
                        "caption": scored.pairs[0].caption, "score": scored.pairs[0].score}
    assert float(rows[6]["score"]) == pytest.approx(scored.pairs[6].score) and rows[6]["caption"] == scored.pairs[6].caption
    with pytest.raises(ValueError, match="jsonl or .csv"):
        write_scores(scored.pairs, tmp_path / "s.txt")


# -- duplicates, any encoder, the command line ---------------------------------------------------

@pytest.fixture()
def photos_with_copies(sample_photos, tmp_path) -> Path:
    """A manifest of 5 real photos, plus an exact copy of one under a new name and a resized copy of another."""
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    chosen = [p for p in sample_photos if p.stem in ("astronaut", "cat_chelsea", "coffee_cup", "rocket_launch", "coins")]
    for photo in chosen:
        shutil.copy(photo, folder / "images" / photo.name)
    shutil.copy(folder / "images" / "cat_chelsea.jpg", folder / "images" / "kitty_copy.jpg")
    with Image.open(folder / "images" / "rocket_launch.jpg") as image:
        image.resize((image.width // 2, image.height // 2)).save(folder / "images" / "rocket_small.jpg", quality=80)
    captions = {"astronaut": "a smiling woman in front of a flag", "cat_chelsea": "a cat looks up",
                "kitty_copy": "a ginger cat", "coffee_cup": "a cup of coffee on a saucer",
                "rocket_launch": "a rocket launches into the sky", "rocket_small": "a black dog runs through the snow",
                "coins": "a pile of old coins"}
    lines = [{"image": f"images/{name}.jpg", "captions": [caption], "split": "x"} for name, caption in captions.items()]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder / "captions.jsonl"


def test_cli_score_filters_and_finds_duplicates(photos_with_copies, tmp_path):
    folder = photos_with_copies.parent
    result = runner.invoke(app, ["score", str(photos_with_copies), "--out", str(tmp_path / "scores.csv"),
                                 "--keep-top", "6", "--filtered", str(tmp_path / "out" / "captions.jsonl"), "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["pairs"], report["kept"], report["dropped"], report["filtered_images"]) == (7, 6, 1, 6)
    scores = {Path(row["image"]).stem: float(row["score"]) for row in csv.DictReader((tmp_path / "scores.csv").open())}
    assert min(scores, key=scores.get) == "rocket_small"  # the one wrong caption: 0.04, the others 0.13 or more
    kept = read_manifest(tmp_path / "out" / "captions.jsonl")
    assert {e.image.stem for e in kept} == set(scores) - {"rocket_small"} and all(e.image.is_file() for e in kept)
    images = folder / "images"
    assert report["exact_duplicates"] == [[str(images / "cat_chelsea.jpg"), str(images / "kitty_copy.jpg")]]
    assert report["near_duplicates"] == [[str(images / "rocket_launch.jpg"), str(images / "rocket_small.jpg")]]
    text = runner.invoke(app, ["score", str(photos_with_copies), "--min-score=-1"], catch_exceptions=False).stdout
    assert "dropped 0 of 7 pairs" in text and "cat_chelsea.jpg = " in text and "rocket_launch.jpg ~ " in text


def test_cli_score_refuses_bad_options_before_embedding(photos_with_copies, tmp_path):
    for args, message in ((["--out", str(tmp_path / "s.txt")], "jsonl or .csv"), (["--keep-top", "0.8"], "percentage"),
                          (["--filtered", str(tmp_path / "f.jsonl")], "--min-score or --keep-top"),
                          (["--near-dup", "1.5"], "between -1 and 1")):
        result = runner.invoke(app, ["score", str(photos_with_copies), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_tiny_open_clip_tower_scores_and_finds_exact_copies(tiny_arch, photos_with_copies):
    tiny = load_encoder(f"openclip:{tiny_arch}")
    scored = score_pairs(tiny, photos_with_copies, progress=False)
    assert len(scored.pairs) == 7 and scored.image_vectors.shape == (7, 32)
    assert all(-1 <= p.score <= 1 for p in scored.pairs)
    paths = [e.image for e in scored.entries]
    duplicates = duplicate_groups(paths, near_duplicate_vectors(tiny, paths, progress=False), near_threshold=1.0)
    assert [[Path(p).name for p in group] for group in duplicates.exact] == [["cat_chelsea.jpg", "kitty_copy.jpg"]]
    assert duplicates.near == []  # the exact copy is one photo here, not also a near pair
