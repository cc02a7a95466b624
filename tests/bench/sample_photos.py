"""Plain queries over the 10 scikit-image photos the main job indexes; prints one JSON line per encoder.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/bench/sample_photos.py [--encoder SPEC ...]

The main job (`bash examples/quickstart.sh` with no folder) is the first search a user sees, and
its photos lie far outside Flickr8k. Each query below has one right photo; the bench reports how
many queries put it first and its mean rank (1 is best, 10 the worst). 30 queries is a small
probe: read a difference of a few queries as noise, and coco_mini (tests/bench/zero_shot_coco.py,
`mmrag eval`) as the larger out-of-domain check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mmrag import Index
from mmrag.samples import export_sample_photos

#: photo file -> three plain queries a user might type for it
QUERIES = {
    "astronaut.jpg": ["an astronaut", "a woman in a space suit", "a smiling woman in front of a flag"],
    "cat_chelsea.jpg": ["a cat", "a photo of a cat", "a ginger cat looking up"],
    "coffee_cup.jpg": ["a cup of coffee", "a coffee cup on a saucer", "a drink on a table"],
    "rocket_launch.jpg": ["a rocket launch", "a space shuttle taking off", "smoke and fire under a rocket"],
    "cameraman.jpg": ["a man with a camera", "a black and white photo of a photographer", "a man standing behind a tripod"],
    "hubble_deep_field.jpg": ["galaxies in deep space", "stars in the night sky", "a telescope image of space"],
    "coins.jpg": ["coins", "a pile of old coins", "money on a table"],
    "moon_surface.jpg": ["the surface of the moon", "craters on the moon", "a grey rocky surface"],
    "microscopy_slide.jpg": ["a microscope slide", "cells under a microscope", "stained tissue"],
    "book_page.jpg": ["a page of a book", "printed text on paper", "an old document"],
}


def probe(spec: str | None, folder: Path) -> dict:
    """Index the sample photos with `spec` and rank every photo for every query."""
    with Index.open(":memory:", spec) as index:
        index.add(export_sample_photos(folder), progress=False)
        ranks = {}
        for photo, queries in QUERIES.items():
            for query in queries:
                hits = index.search(query, k=len(QUERIES))
                ranks[query] = 1 + [Path(h.uri).name for h in hits].index(photo)
        spec = index.encoder.spec
    return {
        "bench": "sample_photos_probe",
        "encoder": spec,
        "queries": len(ranks),
        "top1": sum(r == 1 for r in ranks.values()),
        "mean_rank": round(sum(ranks.values()) / len(ranks), 2),
        "misses": {q: r for q, r in ranks.items() if r > 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", action="append", help="spec; repeat to compare (default: the default tower)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for spec in args.encoder or [None]:
            print(json.dumps(probe(spec, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
