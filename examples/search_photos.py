"""Index a folder of photos and search it from Python: text -> image, image -> image, fused.

    HF_HUB_OFFLINE=1 python examples/search_photos.py [PHOTO_FOLDER] [--index DIR] [--query TEXT]

With no folder, scikit-image's bundled sample photos are used. Writes a contact sheet of the
text query's results next to the index.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mmrag
from mmrag.samples import export_sample_photos
from mmrag.sheet import contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--index", type=Path, default=Path(tempfile.gettempdir()) / "mmrag-example.mmrag")
    parser.add_argument("--query", default="a cat")
    args = parser.parse_args()
    folder = args.folder or export_sample_photos(Path(tempfile.gettempdir()) / "mmrag-samples")[0].parent

    with mmrag.Index.open(args.index) as index:
        report = index.add(folder)
        print(report)

        print(f"\ntext -> image: {args.query!r}")
        hits = index.search(args.query, k=5)
        for hit in hits:
            print(f"  {hit.score:.3f}  {hit.uri}")

        example = Path(hits[0].uri)
        print(f"\nimage -> image: more like {example.name}")
        for hit in index.search(example, k=3):
            print(f"  {hit.score:.3f}  {hit.uri}")

        sheet = contact_sheet(hits, args.index.with_suffix(".png"), title=args.query)
        print(f"\ncontact sheet of the text query: {sheet}")


if __name__ == "__main__":
    main()
