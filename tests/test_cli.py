"""The `mmrag` command line, driven as a user would (typer's runner, real index on disk)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmrag import DEFAULT_SPEC
from mmrag.cli import app

runner = CliRunner(env={"COLUMNS": "400"})  # wide, so rich never wraps an error line


def run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture()
def indexed(tmp_path, photo_folder):
    location = str(tmp_path / "cli.mmrag")
    report = json.loads(run("index", str(photo_folder), "--index", location, "--json"))
    assert (report["added"], report["count"]) == (6, 6)
    return location, photo_folder


def test_index_search_info(indexed):
    location, folder = indexed
    hits = json.loads(run("search", "a cat", "--index", location, "-k", "3", "--json"))
    assert len(hits) == 3 and hits[0]["uri"].endswith("cat_chelsea.jpg")
    rocket = next(folder.rglob("rocket_launch.jpg"))
    by_image = json.loads(run("search", "--image", str(rocket), "--index", location, "-k", "1", "--json"))
    assert by_image[0]["uri"] == str(rocket)
    info = json.loads(run("info", "--index", location, "--json"))
    assert info["count"] == 6 and info["encoder_spec"] == DEFAULT_SPEC
    fast = json.loads(run("search", "a cat", "--index", location, "-k", "1", "--precision", "bf16", "--json"))
    assert fast[0]["uri"] == hits[0]["uri"] and fast[0]["score"] == pytest.approx(hits[0]["score"], abs=0.02)
    text = run("search", "a cat", "--index", location, "-k", "2")  # the plain, human-readable form
    assert text.splitlines()[0].startswith("  1. ") and "cat_chelsea.jpg" in text.splitlines()[0]


def test_search_draws_a_contact_sheet(indexed, tmp_path):
    from PIL import Image

    location, _ = indexed
    out = tmp_path / "sheet.png"
    run("search", "a cat", "--index", location, "-k", "3", "--sheet", str(out))
    sheet = Image.open(out)
    assert sheet.size == (3 * 224 + 4 * 8, 24 + 224 + 13 * 4 + 8 + 8)
    first_tile = sheet.crop((8, 32, 8 + 224, 32 + 224)).convert("L")
    assert len(set(first_tile.getdata())) > 50  # a photo, not a blank tile


def test_reindex_adds_nothing(indexed):
    location, folder = indexed
    report = json.loads(run("index", str(folder), "--index", location, "--json"))
    assert (report["added"], report["already_present"]) == (0, 6)


def test_no_folder_indexes_the_bundled_sample_photos(tmp_path):
    report = json.loads(run("index", "--index", str(tmp_path / "samples.mmrag"), "--json"))
    assert report["added"] == 10 and report["skipped"] == []


def test_bad_arguments_are_clear_errors(tmp_path):
    missing = runner.invoke(app, ["index", str(tmp_path / "nope"), "--index", str(tmp_path / "i")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    bad_target = runner.invoke(app, ["search", "x", "--index", str(tmp_path / "i"), "--target", "video"])
    assert bad_target.exit_code != 0 and "not one of image, text, both" in bad_target.output
    neither = runner.invoke(app, ["search", "--index", str(tmp_path / "i")])
    assert neither.exit_code != 0 and "either a text QUERY or --image" in neither.output
    half = runner.invoke(app, ["search", "x", "--index", str(tmp_path / "i"), "--precision", "fp16"])
    assert half.exit_code != 0 and "precision must be one of" in half.output
    no_index = runner.invoke(app, ["info", "--index", str(tmp_path / "absent")])
    assert no_index.exit_code != 0 and "no mmrag index" in no_index.output


def test_cluster_flags_need_a_server_url(tmp_path, photo_folder):
    on_folder = runner.invoke(app, ["index", str(photo_folder), "--index", str(tmp_path / "i"), "--shards", "2"])
    assert on_folder.exit_code != 0 and "--shards and --replicas need an http(s):// Qdrant URL" in on_folder.output
    on_memory = runner.invoke(app, ["index", str(photo_folder), "--index", ":memory:", "--replicas", "2"])
    assert on_memory.exit_code != 0 and "need an http(s):// Qdrant URL, not ':memory:'" in on_memory.output
    zero = runner.invoke(app, ["index", str(photo_folder), "--index", "http://localhost:6333", "--shards", "0"])
    assert zero.exit_code != 0 and "--shards" in zero.output
    assert not (tmp_path / "i").exists()


def test_eval_prints_recall(tmp_path, coco_mini):
    lines = (coco_mini / "captions.jsonl").read_text().splitlines()[:12]
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("\n".join(
        json.dumps({**json.loads(line), "image": str(coco_mini / json.loads(line)["image"])}) for line in lines))
    both = json.loads(run("eval", str(manifest), "--json"))
    assert both["zero_shot"]["images"] == 12  # coco lines list categories: zero-shot runs too
    report = both["retrieval"]
    assert report["images"] == 12 and report["captions"] == 60
    assert set(report["recall"]) == {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    # 12 images: recall@10 is far above chance (10/12 would be chance for R@10 of random ranks... use R@1)
    assert report["recall"]["t2i_r1"] > 1 / 12
    table = run("eval", str(manifest))
    assert "text -> image" in table and "R@10" in table and "mAP" in table
