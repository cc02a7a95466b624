"""Zero-shot evaluation: AP on hand-computed rankings, label vectors from the real default tower,
mAP on real coco_mini against the chance its label frequencies give, and `mmrag eval` both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmrag.cli import app
from mmrag.evaluate import evaluate_manifest, evaluate_zero_shot, format_eval_table
from mmrag.sources import read_manifest
from mmrag.zeroshot import DEFAULT_TEMPLATES, average_precision, label_vectors, mean_average_precision, read_templates

runner = CliRunner(env={"COLUMNS": "400"})


# -- average precision, by hand ----------------------------------------------------------------

def test_average_precision_hand_computed():
    # ranking: rel, non, rel, non -> precision at the hits 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # input order does not matter, only the scores: hits at ranks 2 and 4 -> (1/2 + 2/4) / 2
    assert average_precision([0.1, 0.8, 0.9, 0.3], [1, 1, 0, 0]) == pytest.approx(0.5)
    assert average_precision([3.0, 2.0, 1.0], [1, 1, 1]) == 1.0
    assert average_precision([3.0, 2.0, 1.0], [0, 0, 1]) == pytest.approx(1 / 3)


def test_average_precision_ties_form_one_threshold():
    # all tied: one threshold, precision 1/4 whichever way a sort orders them
    assert average_precision([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1]) == pytest.approx(0.25)
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == pytest.approx(0.25)
    # a tie at the top (one hit, one miss), then a hit: 0.5 x 1/2 + 0.5 x 2/3
    assert average_precision([0.9, 0.9, 0.5], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="no relevant"):
        average_precision([0.3, 0.2], [0, 0])
    with pytest.raises(ValueError, match="shape"):
        average_precision([0.3, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([np.nan, 0.2], [1, 0])


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.7, 0.9, 0.3], [0.6, 0.2, 0.2]])
    truth = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    mAP, per_class = mean_average_precision(scores, truth)
    # class 0: hits at ranks 1 and 3 -> 5/6
    # class 1: 0.9 (miss), 0.7 (hit), 0.2 (hit), 0.1 (miss) -> (1/2 + 2/3) / 2 = 7/12
    # class 2: no positive image -> NaN, left out of the mean
    assert per_class[0] == pytest.approx(5 / 6)
    assert per_class[1] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(per_class[2])
    assert mAP == pytest.approx((5 / 6 + 7 / 12) / 2)
    with pytest.raises(ValueError, match="matrices"):
        mean_average_precision(scores, truth[:, :2])


# -- label vectors on the real default tower ---------------------------------------------------

def test_label_vectors_are_unit_template_ensembles(encoder):
    labels = ["dog", "pizza", "train"]
    vectors = label_vectors(encoder, labels)
    assert vectors.shape == (3, encoder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the ensemble is the renormalised mean of the filled templates' unit vectors
    single = encoder.embed_texts([t.replace("{}", "dog") for t in DEFAULT_TEMPLATES])
    expected = single.mean(0) / np.linalg.norm(single.mean(0))
    assert np.allclose(vectors[0], expected, atol=1e-5)
    # distinct labels give distinct vectors; one template gives that template's embedding
    assert (vectors @ vectors.T)[np.triu_indices(3, 1)].max() < 0.95
    one = label_vectors(encoder, ["dog"], templates=["a photo of a {}."])
    assert np.allclose(one[0], encoder.embed_texts(["a photo of a dog."])[0], atol=1e-5)


@pytest.mark.parametrize(("labels", "templates", "message"), [
    ([], None, "no labels"),
    (["dog", ""], None, "empty"),
    (["dog", "  "], None, "empty"),
    (["dog", "dog"], None, "twice"),
    (["dog"], ["a photo"], "no '{}'"),
    (["dog"], [], "no templates"),
    (["dog"], ["a {}", "a {}"], "twice"),
])
def test_label_vectors_rejects_bad_labels_and_templates(encoder, labels, templates, message):
    with pytest.raises(ValueError, match=message):
        label_vectors(encoder, labels, templates)


def test_read_templates_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# prompts\na photo of a {}.\n\n  a drawing of a {}.  \n", encoding="utf-8")
    assert read_templates(path) == ["a photo of a {}.", "a drawing of a {}."]
    path.write_text("a photo\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '{}'"):
        read_templates(path)


# -- coco_mini, real photos and real categories ------------------------------------------------

@pytest.fixture(scope="module")
def coco_report(encoder, coco_mini):
    return evaluate_manifest(encoder, coco_mini / "captions.jsonl", progress=False)


def test_zero_shot_map_on_coco_mini_beats_chance(coco_report, coco_mini):
    entries = read_manifest(coco_mini / "captions.jsonl")
    labels = sorted({c for e in entries for c in e.categories})
    positive_rate = [np.mean([label in e.categories for e in entries]) for label in labels]
    chance = float(np.mean(positive_rate))  # a random ranking's expected AP is the positive rate

    report = coco_report.zero_shot
    assert (report.images, report.labels) == (159, 80) and report.labels_without_positives == []
    assert report.chance == pytest.approx(chance) and 0.03 < chance < 0.07  # measured: 0.046
    assert report.mAP > 2 * chance, (report.mAP, chance)  # measured: 0.295 with the default tower
    assert report.mAP == pytest.approx(np.mean(list(report.per_label_ap.values())))
    assert report.per_label_ap["train"] > 0.5 and report.templates == list(DEFAULT_TEMPLATES)


@pytest.fixture(scope="module")
def cli_val(coco_mini) -> dict:
    """`mmrag eval --split val2017 --json` on coco_mini, run once for the tests below."""
    return eval_json(str(coco_mini / "captions.jsonl"), "--split", "val2017")


def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_eval_json_has_both_blocks(cli_val):
    assert cli_val["retrieval"]["images"] == 79 and cli_val["retrieval"]["captions"] >= 5 * 79
    assert 0 < cli_val["retrieval"]["recall"]["t2i_r1"] < cli_val["retrieval"]["recall"]["t2i_r10"] <= 1
    zero_shot = cli_val["zero_shot"]
    assert zero_shot["images"] == 79 and zero_shot["mAP"] > 2 * zero_shot["chance"]
    assert zero_shot["templates"] == list(DEFAULT_TEMPLATES)


def test_zero_shot_alone_matches_and_counts_labels_without_positives(encoder, coco_mini, cli_val):
    manifest = coco_mini / "captions.jsonl"
    report = evaluate_zero_shot(encoder, manifest, split="val2017", labels=["dog", "cat", "unicorn"], progress=False)
    assert report.images == 79 and report.labels == 3 and report.labels_without_positives == ["unicorn"]
    assert set(report.per_label_ap) == {"dog", "cat"}
    assert report.mAP == pytest.approx((report.per_label_ap["dog"] + report.per_label_ap["cat"]) / 2)
    # the CLI embeds images once for both figures; its per-label APs equal the standalone path's
    for label in ("dog", "cat"):
        assert cli_val["zero_shot"]["per_label_ap"][label] == pytest.approx(report.per_label_ap[label], abs=1e-4)


def test_eval_table_shows_both(coco_report):
    table = format_eval_table(coco_report)
    assert "text -> image" in table and "image -> text" in table
    assert f"{100 * coco_report.zero_shot.mAP:.1f}%" in table and "chance 4.6%" in table


@pytest.fixture()
def tiny_manifest(coco_mini, tmp_path) -> tuple[Path, Path]:
    """Two real coco_mini lines (absolute image paths), and the same two without categories."""
    lines = [json.loads(line) for line in (coco_mini / "captions.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    for line in lines:
        line["image"] = str((coco_mini / line["image"]).resolve())
    with_categories, without = tmp_path / "with.jsonl", tmp_path / "without.jsonl"
    with_categories.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    without.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "categories"}) + "\n" for line in lines),
                       encoding="utf-8")
    return with_categories, without


def test_cli_eval_zero_shot_switch_and_templates(tiny_manifest, tmp_path):
    with_categories, without = tiny_manifest
    assert eval_json(str(without))["zero_shot"] is None  # auto: off without categories
    assert eval_json(str(with_categories), "--no-zero-shot")["zero_shot"] is None
    templates = tmp_path / "templates.txt"
    templates.write_text("# one prompt\na photo of a {}.\n", encoding="utf-8")
    data = eval_json(str(with_categories), "--templates", str(templates))
    assert data["retrieval"]["images"] == 2 and data["zero_shot"]["images"] == 2
    assert data["zero_shot"]["templates"] == ["a photo of a {}."]

    result = runner.invoke(app, ["eval", str(without), "--zero-shot", "--json"])
    assert result.exit_code == 2 and "no entries with 'categories'" in result.output
    templates.write_text("a photo\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", str(with_categories), "--templates", str(templates)])
    assert result.exit_code == 2 and "no '{}'" in result.output
