"""Real sample photos that ship inside scikit-image's wheel, so the main job runs anywhere offline."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

#: scikit-image sample name -> file name; all are bundled in the wheel (no download).
SAMPLE_PHOTOS = {
    "astronaut": "astronaut.jpg",
    "chelsea": "cat_chelsea.jpg",
    "coffee": "coffee_cup.jpg",
    "rocket": "rocket_launch.jpg",
    "camera": "cameraman.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "coins": "coins.jpg",
    "moon": "moon_surface.jpg",
    "immunohistochemistry": "microscopy_slide.jpg",
    "page": "book_page.jpg",
}


def export_sample_photos(folder: str | Path) -> list[Path]:
    """Write scikit-image's sample photos into `folder` as JPEG files; returns their paths."""
    import skimage.data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, filename in SAMPLE_PHOTOS.items():
        path = folder / filename
        if not path.exists():
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths
