"""The main job on real photos: index coco_mini, then find objects by text (the issue's acceptance test)."""

from __future__ import annotations

import pytest

from mmrag import Index
from mmrag.sources import read_manifest

QUERIES = ["dog", "car", "boat", "truck", "motorcycle"]


@pytest.fixture(scope="module")
def coco_index(tmp_path_factory, coco_mini, encoder):
    with Index.open(tmp_path_factory.mktemp("coco") / "index", encoder) as index:
        report = index.add(coco_mini, progress=False)
        yield index, report


def test_every_coco_photo_is_indexed(coco_index, coco_mini):
    index, report = coco_index
    assert report.skipped == [] and report.added == 159 == index.count()
    assert index.add(coco_mini, progress=False).added == 0


@pytest.mark.parametrize("category", QUERIES)
def test_text_query_puts_the_object_in_the_top_5(coco_index, category):
    index, _ = coco_index
    hits = index.search(f"a photo of a {category}", k=5)
    found = [h.payload["categories"] for h in hits]
    assert any(category in cats for cats in found), f"no {category} in the top 5: {found}"


def test_manifest_metadata_is_filterable(coco_index):
    index, _ = coco_index
    hits = index.search("a photo of an animal", k=5, filter={"categories": "dog"})
    assert hits and all("dog" in h.payload["categories"] for h in hits)
