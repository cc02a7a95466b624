"""Ray ingest builds the points single-process ingest builds, and `mmrag index --ray` runs it.

One local Ray instance (2 CPUs, 1 encoder actor) serves the module and is shut down after it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmrag import Index, IngestReport
from mmrag.cli import app
from mmrag.ingest import file_id
from mmrag.ray_ingest import RayConfig, connect, ingest_ray
from mmrag.sources import iter_items, read_manifest

pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'mmrag[ray]'")

CONFIG = RayConfig(actors=1, num_cpus=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local Ray instance started the way `ingest_ray` starts one, shut down after the module."""
    module = connect(CONFIG)
    yield
    module.shutdown()


def counts(report: IngestReport) -> tuple:
    return report.added, report.updated, report.already_present, report.skipped


def test_ray_and_single_process_build_the_same_points(tmp_path, coco_mini, encoder):
    ids = [file_id(item) for item in iter_items(coco_mini)]
    with Index.open(tmp_path / "single.mmrag", encoder) as single, Index.open(tmp_path / "ray.mmrag", encoder) as on_ray:
        expected = single.add(coco_mini, progress=False)
        report = ingest_ray(on_ray, coco_mini, CONFIG, progress=False)
        assert (report.added, report.updated, report.already_present, report.skipped) == (159, 0, 0, [])
        assert (expected.added, single.count(), on_ray.count()) == (159, 159, 159)

        want = {hit.id: hit for hit in single.store.retrieve(ids, with_vectors=True)}
        got = {hit.id: hit for hit in on_ray.store.retrieve(ids, with_vectors=True)}
        assert set(got) == set(want) == set(ids)
        for point_id, hit in want.items():
            assert got[point_id].payload == hit.payload
            assert set(got[point_id].vectors) == set(hit.vectors) == {"image", "text"}
            for name, vector in hit.vectors.items():
                np.testing.assert_allclose(got[point_id].vectors[name], vector, atol=1e-5, rtol=0)

        again = ingest_ray(on_ray, coco_mini, CONFIG, progress=False)
        assert (again.added, again.updated, again.already_present) == (0, 0, 159)
        assert again.stage_seconds["encode"] == 0.0  # unchanged files are checked before encoding
        assert on_ray.count() == 159


def test_in_memory_items_and_repeats_are_stored_once(tmp_path, coco_mini, encoder):
    photo = read_manifest(coco_mini / "captions.jsonl")[0].image.read_bytes()
    source = ["a dog on a beach", "a dog on a beach", photo, photo, "   "]
    with Index.open(tmp_path / "single.mmrag", encoder) as single, Index.open(tmp_path / "ray.mmrag", encoder) as on_ray:
        expected = single.add(source, progress=False)
        first = ingest_ray(on_ray, source, CONFIG, progress=False)
        second = ingest_ray(on_ray, source, CONFIG, progress=False)  # encoded again, then found unchanged
        assert single.count() == on_ray.count() == 2
    assert counts(first) == counts(expected)
    assert (first.added, first.already_present) == (2, 2)
    assert (second.added, second.updated, second.already_present, second.skipped) == (0, 0, 4, first.skipped)
    assert [s.reason for s in first.skipped] == ["empty text: nothing to embed"]


def test_cli_index_ray_skips_bad_files_and_replaces_changed_ones(tmp_path, coco_mini):
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = [entry.image for entry in read_manifest(coco_mini / "captions.jsonl")[:6]]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo at all\n")
    location = str(tmp_path / "cli.mmrag")
    runner = CliRunner(env={"COLUMNS": "400"})

    def index_with_ray() -> dict:
        result = runner.invoke(app, ["index", str(folder), "--index", location, "--ray", "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    report = index_with_ray()
    assert (report["added"], report["count"]) == (6, 6)
    reasons = {Path(s["item"]).name: s["reason"] for s in report["skipped"]}
    assert reasons.keys() == {"empty.jpg", "notes.jpg"}
    assert reasons["empty.jpg"].startswith("empty file") and reasons["notes.jpg"].startswith("not an image")
    shutil.copy(photos[1], folder / photos[0].name)  # a photo replaced on disk
    again = index_with_ray()
    assert (again["added"], again["updated"], again["already_present"], again["count"]) == (0, 1, 5, 6)


def test_ray_options_need_ray_and_workers_do_not_mix_with_it(tmp_path):
    runner = CliRunner(env={"COLUMNS": "400"})
    location = str(tmp_path / "x.mmrag")
    lone = runner.invoke(app, ["index", str(tmp_path), "--index", location, "--actors", "2"])
    assert lone.exit_code != 0 and "--ray-address and --actors need --ray" in lone.output
    mixed = runner.invoke(app, ["index", str(tmp_path), "--index", location, "--ray", "--workers", "2"])
    assert mixed.exit_code != 0 and "with --ray the --actors decode" in mixed.output
