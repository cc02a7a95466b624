"""`mmrag serve`: the HTTP API, its limits and its page, over real uvicorn servers on loopback.

Two servers run for the session: one over scikit-image's sample photos with an API key and a
1 MiB body limit (API, security and write tests; no shared data needed), one over coco_mini's
159 captioned photos (search quality, more-like-this and the browser test; skips without it).
"""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'mmrag[serve]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from mmrag import DEFAULT_SPEC, Index  # noqa: E402
from mmrag.serve import ServeConfig, create_app  # noqa: E402

KEY = "test-key-0c5e"
LIMIT = 1024 * 1024
CHROMIUM = "/usr/bin/chromium"
#: What Chromium needs on a machine with no network but loopback (Playwright adds a fresh profile).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Served:
    client: httpx.Client
    url: str
    port: int
    index: Index
    media: Path


@contextmanager
def serving(index: Index, config: ServeConfig) -> Iterator[Served]:
    """`create_app(index)` run by uvicorn in a background thread on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(index, config), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield Served(client, url, port, index, Path(index.location) / "serve")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def samples(tmp_path_factory, encoder, sample_photos) -> Iterator[Served]:
    with Index.open(tmp_path_factory.mktemp("serve") / "samples.mmrag", encoder) as index:
        index.add(sample_photos, progress=False)
        with serving(index, ServeConfig(api_key=KEY, max_upload_bytes=LIMIT)) as served:
            yield served


@pytest.fixture(scope="session")
def coco(tmp_path_factory, encoder, coco_mini) -> Iterator[Served]:
    with Index.open(tmp_path_factory.mktemp("serve") / "coco.mmrag", encoder) as index:
        index.add(coco_mini, progress=False)
        with serving(index, ServeConfig()) as served:
            yield served


def ok(response: httpx.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def error(response: httpx.Response, status: int) -> str:
    """The message of a JSON error response of the given status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def raw_request(served: Served, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes exactly as written (no client normalises the path); returns status and whole response."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as conn:
        conn.sendall(head.encode() + body)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    return int(response.split(b" ", 2)[1]), response


# --- the API --------------------------------------------------------------------------------------


def test_info_and_openapi_schema(samples):
    info = ok(samples.client.get("/api/info"))
    assert info["count"] == 10 and info["encoder_spec"] == DEFAULT_SPEC
    assert (info["max_k"], info["max_upload_bytes"], info["writes_need_key"]) == (100, LIMIT, True)
    schema = ok(samples.client.get("/openapi.json"))
    assert {"/api/search/text", "/api/search/image", "/api/search/similar", "/api/items", "/api/items/{item_id}",
            "/api/items/{item_id}/image", "/api/items/{item_id}/thumbnail"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["TextSearch"]["properties"]["k"]["maximum"] == 100
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert samples.client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_text_search_finds_the_right_photos_and_hides_server_paths(coco, coco_mini):
    result = ok(coco.client.post("/api/search/text", json={"text": "a boat on the water", "k": 5}))
    hits = result["hits"]
    assert len(hits) == 5 and result["seconds"] > 0
    assert sum("boat" in hit["metadata"]["categories"] for hit in hits) >= 3
    assert all(hit["thumbnail_url"] == f"/api/items/{hit['id']}/thumbnail" and hit["name"].endswith(".jpg") for hit in hits)
    assert str(coco_mini) not in json.dumps(result)  # file names only, never the folder on the server

    line = json.loads((coco_mini / "captions.jsonl").read_text().splitlines()[7])
    by_caption = ok(coco.client.post("/api/search/text", json={"text": line["captions"][0], "k": 3, "target": "text"}))
    assert by_caption["hits"][0]["name"] == Path(line["image"]).name
    fused = ok(coco.client.post("/api/search/text", json={"text": "a pizza", "k": 5, "target": "both"}))
    assert len(fused["hits"]) == 5


def test_filters_apply_to_every_kind_of_search(coco, coco_mini):
    body = {"text": "a kitchen", "k": 20, "filter": {"split": "val2017", "categories": ["oven", "sink"]}}
    hits = ok(coco.client.post("/api/search/text", json=body))["hits"]
    assert hits and all(h["metadata"]["split"] == "val2017" and {"oven", "sink"} & set(h["metadata"]["categories"])
                        for h in hits)
    photo = sorted((coco_mini / "images").glob("*.jpg"))[0]
    by_image = ok(coco.client.post("/api/search/image", files={"image": photo.read_bytes()},
                                   data={"k": "10", "filter": json.dumps({"split": "train2017"})}))["hits"]
    assert by_image and all(h["metadata"]["split"] == "train2017" for h in by_image)
    like = ok(coco.client.post("/api/search/similar", json={"id": hits[0]["id"], "filter": {"categories": "sink"}}))
    assert all("sink" in h["metadata"]["categories"] for h in like["hits"])


def test_image_search_finds_the_photo_itself_first(coco, coco_mini):
    photo = sorted((coco_mini / "images").glob("*.jpg"))[3]
    hits = ok(coco.client.post("/api/search/image", files={"image": ("q.jpg", photo.read_bytes(), "image/jpeg")},
                               data={"k": "4"}))["hits"]
    assert hits[0]["name"] == photo.name and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    captions = ok(coco.client.post("/api/search/image", files={"image": photo.read_bytes()},
                                   data={"k": "3", "target": "text"}))["hits"]
    assert len(captions) == 3  # image -> captions


def test_more_like_this_leaves_the_item_out(coco):
    seed = ok(coco.client.post("/api/search/text", json={"text": "a red truck", "k": 1}))["hits"][0]
    like = ok(coco.client.post("/api/search/similar", json={"id": seed["id"], "k": 8}))["hits"]
    assert len(like) == 8 and seed["id"] not in {h["id"] for h in like}
    assert like == sorted(like, key=lambda h: -h["score"])
    item = ok(coco.client.get(f"/api/items/{seed['id']}"))
    assert item["captions"] == seed["captions"] and item["metadata"] == seed["metadata"]


def test_bad_requests_get_json_errors_that_say_what_was_wrong(samples):
    post = samples.client.post
    assert "less than or equal to 100" in error(post("/api/search/text", json={"text": "a cat", "k": 101}), 422)
    assert "body.k" in error(post("/api/search/text", json={"text": "a cat", "k": 0}), 422)
    assert "body.target" in error(post("/api/search/text", json={"text": "a cat", "target": "video"}), 422)
    assert "body.colour" in error(post("/api/search/text", json={"text": "a cat", "colour": "red"}), 422)
    assert "body.filter" in error(post("/api/search/text", json={"text": "a cat", "filter": {"score": 0.5}}), 422)
    assert "filter keys" in error(post("/api/search/text", json={"text": "a cat", "filter": {"": "x"}}), 400)
    assert "body.text" in error(post("/api/search/text", json={"text": ""}), 422)
    assert "empty" in error(post("/api/search/text", json={"text": "   "}), 400)
    assert "JSON" in error(post("/api/search/text", content=b"{not json", headers={"content-type": "application/json"}), 422)
    photo = jpeg(Image.new("RGB", (32, 32), "red"))
    assert "k" in error(post("/api/search/image", files={"image": photo}, data={"k": "500"}), 422)
    assert "filter" in error(post("/api/search/image", files={"image": photo}, data={"filter": "{oops"}), 422)
    assert "not an image" in error(post("/api/search/image", files={"image": b"hello, world"}), 400)
    assert "no item" in error(post("/api/search/similar", json={"id": "00000000-0000-0000-0000-000000000000"}), 404)
    assert "no item" in error(post("/api/search/similar", json={"id": "not-a-uuid"}), 404)
    assert error(samples.client.get("/api/nothing-here"), 404) == "Not Found"


def test_images_are_served_by_id_and_thumbnails_cached(samples, sample_photos):
    hit = ok(samples.client.post("/api/search/text", json={"text": "a cat", "k": 1}))["hits"][0]
    original = samples.client.get(hit["image_url"])
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.content == next(p for p in sample_photos if p.name == hit["name"]).read_bytes()
    assert original.headers["x-content-type-options"] == "nosniff"

    thumbnail = samples.client.get(hit["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumbnail.content))
    assert image.format == "JPEG" and max(image.size) == 256
    cached = list((samples.media / "thumbnails").glob(f"{hit['id']}-*-256.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == thumbnail.content
    assert samples.client.get(hit["thumbnail_url"]).content == thumbnail.content


# --- security -------------------------------------------------------------------------------------

TRAVERSALS = [
    "/api/items/../../../../../../etc/passwd/image",
    "/api/items/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd/image",
    "/api/items/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail",
    "/api/items/%252e%252e%252fetc%252fpasswd/image",
    "/api/items/%2Fetc%2Fpasswd/image",
    "/api/items//etc/passwd/image",
    "/api/items/%2Fetc%2Fpasswd",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static//etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_path_reaches_a_file_outside_the_index(samples, target):
    status, response = raw_request(samples, f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status in (400, 404), response[:300]
    assert b"root:" not in response and b"create_app" not in response


def test_a_path_in_the_query_string_is_ignored(samples):
    hit = ok(samples.client.post("/api/search/text", json={"text": "a rocket", "k": 1}))["hits"][0]
    for url in (f"{hit['image_url']}?path=/etc/passwd", f"{hit['image_url']}?uri=../../etc/passwd"):
        response = samples.client.get(url)
        assert response.status_code == 200 and response.content[:3] == b"\xff\xd8\xff"  # the item's own JPEG


def test_uploads_over_the_limit_get_413_before_and_while_reading(samples):
    """Raw sockets send only what each case needs: a server that read the whole body first would hang."""
    count = samples.index.count()
    head = ("POST /api/items HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n{length}\r\n").format
    declared, response = raw_request(samples, head(key=KEY, length=f"Content-Length: {LIMIT + 1}\r\n"))
    assert declared == 413 and b"limit is 1,048,576 bytes" in response  # refused on the header, no body sent

    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n' + b"\0" * LIMIT
    chunk = f"{len(part):x}\r\n".encode() + part + b"\r\n"  # chunked, never finished: counted as it arrives
    streamed, response = raw_request(samples, head(key=KEY, length="Transfer-Encoding: chunked\r\n"), chunk)
    assert streamed == 413 and b"request body too large" in response
    assert samples.index.count() == count


def png_declaring(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims `width` x `height` pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_unread(samples):
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    message = error(samples.client.post("/api/search/image", files={"image": ("bomb.png", bomb, "image/png")}), 413)
    assert "image too large" in message
    added = samples.client.post("/api/items", files={"image": ("bomb.png", bomb)}, headers={"X-API-Key": KEY})
    assert "image too large" in error(added, 413)
    assert not list((samples.media / "uploads").glob("*.png"))


def test_writes_need_the_key_and_reads_do_not(samples, sample_photos):
    photo = jpeg(Image.open(sample_photos[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # new to the index
    count = samples.index.count()

    def add(**headers: str) -> httpx.Response:
        return samples.client.post("/api/items", files={"image": ("mirror.jpg", photo, "image/jpeg")},
                                   data={"caption": "an astronaut, mirrored"}, headers=headers)

    assert "X-API-Key" in error(add(), 401)
    assert error(add(**{"X-API-Key": "wrong"}), 403) == "wrong API key"
    assert samples.index.count() == count

    added = ok(add(**{"X-API-Key": KEY}), 201)
    item = added["item"]
    assert added["status"] == "added" and item["captions"] == ["an astronaut, mirrored"] and item["name"].endswith(".jpg")
    assert samples.index.count() == count + 1
    assert ok(add(**{"X-API-Key": KEY}))["status"] == "already_present"
    found = ok(samples.client.post("/api/search/image", files={"image": photo}, data={"k": "1"}))["hits"][0]
    assert found["id"] == item["id"]
    assert samples.client.get(item["thumbnail_url"]).status_code == 200
    upload = samples.media / "uploads" / item["name"]
    assert upload.read_bytes() == photo

    url = f"/api/items/{item['id']}"
    assert error(samples.client.delete(url), 401)
    assert error(samples.client.delete(url, headers={"X-API-Key": KEY + "x"}), 403)
    assert ok(samples.client.delete(url, headers={"X-API-Key": KEY})) == {"deleted": item["id"]}
    assert "no item" in error(samples.client.get(url), 404)
    assert error(samples.client.delete(url, headers={"X-API-Key": KEY}), 404)
    assert samples.index.count() == count
    assert not upload.exists() and not list((samples.media / "thumbnails").glob(f"{item['id']}-*"))


def test_cli_refuses_a_folder_without_an_index(tmp_path):
    from typer.testing import CliRunner

    from mmrag.cli import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["serve", "--index", str(tmp_path / "none.mmrag")])
    assert result.exit_code == 2 and "no mmrag index" in result.output
    assert not (tmp_path / "none.mmrag").exists()


# --- the page in a real browser -------------------------------------------------------------------


def test_page_searches_by_text_by_dropped_photo_and_by_click(coco, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}; tests/run.sh installs it when run as root")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    expect, wait = sync_api.expect, 60_000
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(coco.url)
            expect(page.locator("#about")).to_contain_text("159 items", timeout=wait)

            page.fill("#query", "a boat on the water")
            page.press("#query", "Enter")
            hits = page.locator("#results .hit")
            expect(hits).to_have_count(24, timeout=wait)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].slice(0, 6)"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=wait)
            by_text = hits.evaluate_all("items => items.map(item => item.dataset.id)")

            hits.nth(1).locator("button").click()  # more like this
            expect(page.locator("#status")).to_contain_text("results for more like this", timeout=wait)
            expect(page.locator("#query-text")).to_contain_text("More like")
            by_click = hits.evaluate_all("items => items.map(item => item.dataset.id)")
            assert len(by_click) == 24 and by_click != by_text and by_text[1] not in by_click
            page.screenshot(path=str(tmp_path / "page.png"))

            dropped = by_click[5]  # drop that photo's file on the drop zone: it finds itself first
            transfer = page.evaluate_handle("""async url => {
                const blob = await (await fetch(url)).blob();
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], "dropped.jpg", {type: blob.type}));
                return transfer;
            }""", f"/api/items/{dropped}/image")
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            expect(page.locator("#status")).to_contain_text("results for dropped.jpg", timeout=wait)
            assert hits.first.get_attribute("data-id") == dropped
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert problems == []


def test_screenshot_example_draws_the_page(samples, tmp_path):
    """examples/serve_screenshot.py, the command docs/serve.md gives for its picture, run as a user runs it."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}; tests/run.sh installs it when run as root")
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    out = tmp_path / "page.png"
    script = Path(__file__).resolve().parents[1] / "examples" / "serve_screenshot.py"
    result = subprocess.run([sys.executable, str(script), samples.url + "/", str(out), "--query", "a cat"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (1200, 800) and out.stat().st_size < 300_000
    assert len(set(image.convert("L").getdata())) > 100  # photos on it, not a blank page
