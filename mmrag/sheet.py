"""Contact sheets: search results as one picture, because people look at photos, not paths."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .index import SearchHit
from .media import ImageDecodeError, load_image

TILE = 224
CAPTION_LINES = 3


def contact_sheet(hits: Sequence[SearchHit], out: str | Path, title: str = "", columns: int = 5) -> Path:
    """Draw each hit's image (or its text) as a tile with rank, score and caption; save to `out`."""
    if not hits:
        raise ValueError("no hits to draw")
    font = ImageFont.load_default()
    columns = max(1, min(columns, len(hits)))
    rows = (len(hits) + columns - 1) // columns
    line_height, header = 13, 24 if title else 0
    tile_h = TILE + line_height * (CAPTION_LINES + 1) + 8
    sheet = Image.new("RGB", (columns * TILE + (columns + 1) * 8, header + rows * tile_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for rank, hit in enumerate(hits, 1):
        x = 8 + ((rank - 1) % columns) * (TILE + 8)
        y = header + 8 + ((rank - 1) // columns) * tile_h
        sheet.paste(_thumbnail(hit), (x, y))
        draw.text((x, y + TILE + 2), f"#{rank}  score {hit.score:.3f}", fill="black", font=font)
        caption = hit.captions[0] if hit.captions else Path(hit.uri or hit.id).name
        for i, line in enumerate(textwrap.wrap(caption, 36)[:CAPTION_LINES]):
            draw.text((x, y + TILE + 2 + line_height * (i + 1)), line, fill="dimgray", font=font)
    out = Path(out)
    sheet.save(out)
    return out


def _thumbnail(hit: SearchHit) -> Image.Image:
    """The hit's image fitted into a square tile; a grey tile with its text for text items."""
    tile = Image.new("RGB", (TILE, TILE), (235, 235, 235))
    if hit.modality == "image" and hit.uri:
        try:
            image = load_image(hit.uri)
            image.thumbnail((TILE, TILE))
            tile.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
            return tile
        except ImageDecodeError as exc:
            text = f"[{exc.reason}] {hit.uri}"
    else:
        text = hit.captions[0] if hit.captions else hit.id
    ImageDraw.Draw(tile).multiline_text((8, 8), "\n".join(textwrap.wrap(text, 34)[:14]), fill="black")
    return tile
