"""Screenshot the search page of a running `mmrag serve` after a text search (the picture in docs/serve.md).

    mmrag index ../shared/data/coco_mini --index /tmp/coco.mmrag
    mmrag serve --index /tmp/coco.mmrag &
    python examples/serve_screenshot.py http://127.0.0.1:8000/ docs/serve_page.png --query "a boat on the water"

Drives Debian's Chromium (`apt-get install chromium`) through Playwright's Python API
(`pip install playwright`; no browser download). The PNG is reduced to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

#: What Chromium needs on a machine with no network but loopback (Playwright adds a fresh profile).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(url: str, out: Path, query: str, size: tuple[int, int], chromium: str) -> Path:
    """Search `query` on the page at `url`, wait for every visible thumbnail, save the viewport to `out`."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(url)
            expect(page.locator("#about")).to_contain_text("items", timeout=60_000)
            page.fill("#query", query)
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_contain_text("results for", timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')]"  # those in view
                                   ".filter(img => img.getBoundingClientRect().top < innerHeight)"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=60_000)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    Image.open(out).convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="The page of a running mmrag serve, e.g. http://127.0.0.1:8000/")
    parser.add_argument("out", type=Path, help="PNG file to write.")
    parser.add_argument("--query", default="a boat on the water")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = screenshot(args.url, args.out, args.query, (args.width, args.height), args.chromium)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
