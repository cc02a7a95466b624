"""One congruence suite for both stores: EdgeStore (Qdrant Edge in tmp_path) and ClientStore
(qdrant-client ":memory:"), real engines, no mocks, small hand-made vectors with known answers."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from mmrag.store import (
    ClientStore,
    EdgeStore,
    Hit,
    IndexManifest,
    IndexMismatchError,
    Point,
    Store,
    StoreLockedError,
    open_store,
)
from mmrag.store.base import RRF_K

DIM = 8
MANIFEST = IndexManifest(encoder_spec="test:unit-8d", dim=DIM)
BACKENDS = ["edge", "client"]


def pid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mmrag-test/{name}"))


def mix(axis: int, other: int, degrees: float) -> np.ndarray:
    """A unit vector at `degrees` from e_axis, tilted towards e_other: cosine to e_axis is cos(degrees)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[axis] = math.cos(math.radians(degrees))
    v[other] += math.sin(math.radians(degrees))
    return v


# Image vectors lean on e0, text vectors on e7; each point tilts towards its own axis (e1..e6),
# so the cosine to e0 (or e7) is exactly cos(angle) and the order is known.
SPEC = {
    #       image angle, text angle, payload
    "a": (0.0, 60.0, {"modality": "both", "page": 1, "lang": "en", "flag": True,
                      "meta": {"author": "Zoë", "tags": ["x", "y"], "deep": {"n": [1, {"k": "v"}]}}}),
    "b": (20.0, 10.0, {"modality": "both", "page": 2, "lang": "fr", "flag": False, "tags": ["y"]}),
    "c": (40.0, None, {"modality": "image", "page": 3, "lang": "en", "caption": "猫と犬 🐈"}),
    "d": (None, 0.0, {"modality": "text", "page": 4, "lang": "de", "score": 0.25}),
    "e": (70.0, None, {"modality": "image", "page": 5, "lang": "fr", "tags": ["x"]}),
    "f": (None, 30.0, {"modality": "text", "page": 6, "lang": "en", "empty": {}, "none": None}),
}
AXIS = {name: 1 + i for i, name in enumerate(SPEC)}
ID = {name: pid(name) for name in SPEC}
NAME = {v: k for k, v in ID.items()}

Q_IMAGE = np.eye(DIM, dtype=np.float32)[0]
Q_TEXT = np.eye(DIM, dtype=np.float32)[7]
Q_BOTH = (Q_IMAGE + Q_TEXT) / np.sqrt(2)

EXPECT_IMAGE = ["a", "b", "c", "e"]  # cos 0°, 20°, 40°, 70° to e0; d and f have no image vector
EXPECT_TEXT = ["d", "b", "f", "a"]  # cos 0°, 10°, 30°, 60° to e7; c and e have no text vector


def make_points() -> list[Point]:
    points = []
    for name, (img, txt, payload) in SPEC.items():
        vectors = {}
        if img is not None:
            vectors["image"] = mix(0, AXIS[name], img)
        if txt is not None:
            vectors["text"] = mix(7, AXIS[name], txt)
        points.append(Point(id=ID[name], vectors=vectors, payload=payload))
    return points


def make_store(kind: str, path: Path) -> Store:
    return EdgeStore(path / "index") if kind == "edge" else ClientStore(":memory:", collection="test")


def names(hits: list[Hit]) -> list[str]:
    return [NAME[h.id] for h in hits]


def rrf_reference(*rankings: list[str], k: int) -> list[str]:
    """The fused order the stores must give: sum of 1/(RRF_K + rank), ties by id."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, name in enumerate(ranking):
            scores[name] = scores.get(name, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores, key=lambda n: (-scores[n], ID[n]))[:k]


@pytest.fixture(params=BACKENDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def store(kind, tmp_path):
    """A filled store of its own, for tests that write."""
    s = make_store(kind, tmp_path)
    s.create(MANIFEST)
    s.upsert(make_points())
    yield s
    s.close()


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory):
    """A filled store shared by the read-only tests of this module."""
    s = make_store(request.param, tmp_path_factory.mktemp(f"ro-{request.param}"))
    s.create(MANIFEST)
    s.upsert(make_points())
    yield s
    s.close()


# --- creation, manifest, reopen --------------------------------------------------------------------


def test_new_location_has_no_manifest_until_create(kind, tmp_path):
    s = make_store(kind, tmp_path)
    try:
        assert s.manifest is None
        with pytest.raises(RuntimeError, match="create"):
            s.count()
        s.create(MANIFEST)
        assert s.manifest == MANIFEST
        assert s.count() == 0
        s.create(MANIFEST)  # the same manifest again: a no-op
        with pytest.raises(IndexMismatchError):
            s.create(IndexManifest(encoder_spec="other", dim=DIM))
        with pytest.raises(IndexMismatchError):
            s.create(IndexManifest(encoder_spec=MANIFEST.encoder_spec, dim=DIM * 2))
    finally:
        s.close()


def test_create_rejects_bad_manifest(kind, tmp_path):
    s = make_store(kind, tmp_path)
    try:
        with pytest.raises(ValueError, match="cosine"):
            s.create(IndexManifest(encoder_spec="x", dim=DIM, distance="dot"))
        with pytest.raises(ValueError, match="dim"):
            s.create(IndexManifest(encoder_spec="x", dim=0))
        assert s.manifest is None
    finally:
        s.close()


def test_edge_reopen_keeps_manifest_and_points(tmp_path):
    path = tmp_path / "index"
    with EdgeStore(path) as s:
        s.create(MANIFEST)
        s.upsert(make_points())
        before = s.search(Q_IMAGE, "image", 10)
    assert (path / "manifest.json").is_file() and (path / "shard").is_dir()

    with open_store(path) as again:
        assert isinstance(again, EdgeStore)
        assert again.manifest == MANIFEST
        assert again.count() == len(SPEC)
        assert names(again.search(Q_IMAGE, "image", 10)) == EXPECT_IMAGE
        assert [(h.id, h.payload) for h in again.search(Q_IMAGE, "image", 10)] == [(h.id, h.payload) for h in before]
        again.delete([ID["a"]])
    with EdgeStore(path) as third:
        assert third.count() == len(SPEC) - 1
        assert ID["a"] not in third.existing([ID["a"]])


def test_client_reopen_same_collection_reads_manifest():
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    with ClientStore.from_client(client, "c1") as s:
        s.create(MANIFEST)
        s.upsert(make_points())
    again = ClientStore.from_client(client, "c1")  # the client is the caller's: still open
    assert again.manifest == MANIFEST and again.count() == len(SPEC)
    client.create_collection("foreign", vectors_config={})
    with pytest.raises(ValueError, match="not created by mmrag"):
        ClientStore.from_client(client, "foreign")
    client.close()


def test_edge_directory_is_locked_against_another_process(tmp_path):
    path = tmp_path / "index"
    with EdgeStore(path) as s:
        s.create(MANIFEST)
        with EdgeStore(path) as second:  # a second opener in this process shares the engine
            assert second.manifest == MANIFEST
    with EdgeStore(path) as s:  # released on close
        assert s.manifest == MANIFEST

    # another process holding the shard (through the engine alone, so it starts fast)
    code = (
        "import sys\nfrom qdrant_edge import EdgeShard\n"
        "shard = EdgeShard.load(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.read()\nshard.close()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path / "shard")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match="another process"):
            EdgeStore(path)
    finally:
        holder.communicate(timeout=30)
    with EdgeStore(path) as s:
        assert s.count() == 0


# --- search ----------------------------------------------------------------------------------------


def test_search_by_each_vector_gives_exact_order(filled):
    image = filled.search(Q_IMAGE, "image", 10)
    assert names(image) == EXPECT_IMAGE
    cosines = [math.cos(math.radians(a)) for a in (0, 20, 40, 70)]
    np.testing.assert_allclose([h.score for h in image], cosines, atol=1e-5)
    text = filled.search(Q_TEXT, "text", 10)
    assert names(text) == EXPECT_TEXT
    np.testing.assert_allclose([h.score for h in text], [math.cos(math.radians(a)) for a in (0, 10, 30, 60)], atol=1e-5)
    assert names(filled.search(Q_IMAGE, "image", 2)) == EXPECT_IMAGE[:2]
    assert image[0].payload == SPEC["a"][2]


def test_search_fused_finds_image_only_and_text_only_points(filled):
    fused = filled.search_fused(Q_BOTH, 10)
    assert names(fused) == rrf_reference(EXPECT_IMAGE, EXPECT_TEXT, k=10)
    assert {"c", "e"} <= set(names(fused))  # image-only
    assert {"d", "f"} <= set(names(fused))  # text-only
    assert names(fused)[:3] == ["a", "b", "d"]
    assert fused[0].score == pytest.approx(1 / RRF_K + 1 / (RRF_K + 3), rel=1e-5)
    assert names(filled.search_fused(Q_BOTH, 2)) == ["a", "b"]


@pytest.mark.parametrize(
    ("filter", "image", "text"),
    [
        ({"modality": "image"}, ["c", "e"], []),
        ({"modality": "both"}, ["a", "b"], ["b", "a"]),
        ({"lang": ["fr", "de"]}, ["b", "e"], ["d", "b"]),
        ({"lang": ("en",)}, ["a", "c"], ["f", "a"]),
        ({"page": 2}, ["b"], ["b"]),
        ({"page": [1, 3, 4]}, ["a", "c"], ["d", "a"]),
        ({"flag": True}, ["a"], ["a"]),
        ({"flag": False}, ["b"], ["b"]),
        ({"meta.author": "Zoë"}, ["a"], ["a"]),
        ({"tags": "x"}, ["e"], []),  # a list in the payload matches if any item does
        ({"meta.tags": ["y", "q"]}, ["a"], ["a"]),
        ({"modality": "both", "lang": "fr"}, ["b"], ["b"]),
        ({"lang": []}, [], []),
        ({"nowhere": "x"}, [], []),
    ],
)
def test_filters_return_exactly_the_expected_ids(filled, filter, image, text):
    assert names(filled.search(Q_IMAGE, "image", 10, filter=filter)) == image
    assert names(filled.search(Q_TEXT, "text", 10, filter=filter)) == text
    fused = names(filled.search_fused(Q_BOTH, 10, filter=filter))
    assert set(fused) == set(image) | set(text)


def test_bad_arguments_are_rejected_up_front(filled):
    with pytest.raises(ValueError, match="k must"):
        filled.search(Q_IMAGE, "image", 0)
    with pytest.raises(ValueError, match="using"):
        filled.search(Q_IMAGE, "audio", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width 9"):
        filled.search(np.ones(DIM + 1), "image", 3)
    with pytest.raises(ValueError, match="values must be"):
        filled.search(Q_IMAGE, "image", 3, filter={"score": 0.25})
    with pytest.raises(ValueError, match="only strings or only integers"):
        filled.search_fused(Q_IMAGE, 3, filter={"page": [1, "2"]})
    with pytest.raises(ValueError, match="UUID"):
        filled.upsert([Point(id="not-a-uuid", vectors={"image": Q_IMAGE})])
    with pytest.raises(ValueError, match="no vectors"):
        filled.upsert([Point(id=pid("z"), vectors={})])
    with pytest.raises(ValueError, match="unknown vector"):
        filled.upsert([Point(id=pid("z"), vectors={"audio": Q_IMAGE})])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="width 3"):
        # checked before anything is written: the good first point is not stored either
        filled.upsert([Point(id=pid("y"), vectors={"text": Q_TEXT}), Point(id=pid("z"), vectors={"image": np.ones(3)})])
    assert filled.count() == len(SPEC)


# --- point bookkeeping -----------------------------------------------------------------------------


def test_existing_and_retrieve(filled):
    missing = pid("missing")
    assert filled.existing([ID["a"], missing, ID["d"]]) == {ID["a"], ID["d"]}
    assert filled.existing([]) == set()
    hits = filled.retrieve([ID["c"], missing, ID["a"], ID["b"]])
    assert names(hits) == ["c", "a", "b"]
    assert all(h.score == 1.0 for h in hits)
    assert [h.payload for h in hits] == [SPEC[n][2] for n in ("c", "a", "b")]
    upper = ID["f"].upper()  # ids are compared as UUIDs, and come back as given
    assert filled.existing([upper]) == {upper}
    assert [h.id for h in filled.retrieve([upper])] == [upper]
    assert all(h.vectors == {} for h in hits)  # vectors only when asked


def test_retrieve_with_vectors_returns_what_was_stored(filled):
    expected = {p.id: p.vectors for p in make_points()}
    for hit in filled.retrieve(list(ID.values()), with_vectors=True):
        assert sorted(hit.vectors) == sorted(expected[hit.id])
        for name, vector in hit.vectors.items():
            assert vector.dtype == np.float32
            np.testing.assert_allclose(vector, expected[hit.id][name], atol=1e-6)


def test_payload_round_trips(filled):
    for hit in filled.retrieve(list(ID.values())):
        assert hit.payload == SPEC[NAME[hit.id]][2]
    assert filled.retrieve([ID["a"]])[0].payload["meta"]["deep"] == {"n": [1, {"k": "v"}]}
    assert filled.retrieve([ID["c"]])[0].payload["caption"] == "猫と犬 🐈"


def test_delete_counts_what_existed(store):
    assert store.delete([ID["a"], pid("missing"), ID["a"], ID["d"]]) == 2
    assert store.count() == len(SPEC) - 2
    assert store.existing([ID["a"], ID["d"], ID["b"]]) == {ID["b"]}
    assert store.delete([ID["a"]]) == 0
    assert names(store.search(Q_IMAGE, "image", 10)) == ["b", "c", "e"]


def test_upserting_the_same_id_again_overwrites(store):
    store.upsert(make_points())
    assert store.count() == len(SPEC)
    store.upsert([Point(id=ID["d"], vectors={"text": mix(7, AXIS["d"], 0.0)}, payload={"modality": "text", "v": 2})])
    assert store.count() == len(SPEC)
    assert store.retrieve([ID["d"]])[0].payload == {"modality": "text", "v": 2}
    # the whole point is replaced: `a` re-written with only an image vector leaves text search
    store.upsert([Point(id=ID["a"], vectors={"image": mix(0, AXIS["a"], 0.0)}, payload=SPEC["a"][2])])
    assert names(store.search(Q_TEXT, "text", 10)) == ["d", "b", "f"]


def test_upsert_in_several_batches(kind, tmp_path):
    rng = np.random.default_rng(1)
    s = make_store(kind, tmp_path)
    s.batch_size = 7  # type: ignore[attr-defined]
    try:
        s.create(MANIFEST)
        pts = [Point(id=pid(f"r{i}"), vectors={"image": rng.standard_normal(DIM)}, payload={"i": i}) for i in range(50)]
        s.upsert(pts)
        assert s.count() == 50
        assert s.delete([p.id for p in pts[:20]]) == 20
        assert s.count() == 30
    finally:
        s.close()


def test_scroll_pages_through_every_point(filled):
    pages = list(filled.scroll(page_size=4, with_vectors=True))
    assert [len(page) for page in pages] == [4, 2]
    hits = [hit for page in pages for hit in page]
    assert sorted(names(hits)) == sorted(SPEC) and all(hit.score == 1.0 for hit in hits)
    for hit in hits:
        assert hit.payload == SPEC[NAME[hit.id]][2]
        stored = filled.retrieve([hit.id], with_vectors=True)[0].vectors
        assert hit.vectors.keys() == stored.keys()
        assert all(np.array_equal(hit.vectors[k], stored[k]) for k in stored)
    assert all(hit.vectors == {} for page in filled.scroll() for hit in page)
    with pytest.raises(ValueError, match="page_size"):
        next(filled.scroll(page_size=0))


def test_set_payload_merges_keys_and_leaves_vectors(store):
    before = {h.id: h.vectors for h in store.retrieve([ID["a"], ID["e"]], with_vectors=True)}
    store.set_payload({ID["a"]: {"tags": ["dog", "beach"], "tag_scores": {"dog": 3.1}}, ID["e"]: {"tags": ["dog"]}})
    a, e = store.retrieve([ID["a"], ID["e"]], with_vectors=True)
    assert a.payload == {**SPEC["a"][2], "tags": ["dog", "beach"], "tag_scores": {"dog": 3.1}}
    assert e.payload == {**SPEC["e"][2], "tags": ["dog"]}  # e's own `tags: ["x"]` replaced whole
    for hit in (a, e):
        assert all(np.array_equal(hit.vectors[k], before[hit.id][k]) for k in before[hit.id])
    assert names(store.search(Q_IMAGE, "image", 10, filter={"tags": "dog"})) == ["a", "e"]
    assert names(store.search(Q_IMAGE, "image", 10, filter={"tags": "beach"})) == ["a"]
    assert store.count() == len(SPEC)


def test_set_payload_refuses_unknown_ids_and_bad_payloads(store):
    with pytest.raises(KeyError, match=pid("missing")):
        store.set_payload({ID["b"]: {"tags": ["new"]}, pid("missing"): {"tags": ["new"]}})
    assert store.retrieve([ID["b"]])[0].payload == SPEC["b"][2]  # nothing written
    for bad in ({ID["b"]: {}}, {ID["b"]: ["tags"]}, {"not-a-uuid": {"k": 1}}):
        with pytest.raises(ValueError):
            store.set_payload(bad)


def test_set_payload_adds_the_tags_index_to_an_older_edge_index(tmp_path, monkeypatch):
    import mmrag.store.edge as edge

    monkeypatch.setattr(edge, "INDEXED_KEYWORD_FIELDS", ("modality", "uri"))  # as indexes were made before tags
    with EdgeStore(tmp_path / "old") as s:
        s.create(MANIFEST)
        s.upsert(make_points())
        monkeypatch.undo()
        assert "tags" not in s._live().info().payload_schema
        s.set_payload({ID["c"]: {"tags": ["cat"]}})
        assert "tags" in s._live().info().payload_schema
        assert names(s.search(Q_IMAGE, "image", 10, filter={"tags": "cat"})) == ["c"]


# --- the two backends agree -------------------------------------------------------------------------


def test_both_backends_give_identical_results(tmp_path):
    rng = np.random.default_rng(0)
    points = []
    for i in range(300):
        which = ("image", "text", "both")[i % 3]
        vectors = {}
        if which in ("image", "both"):
            vectors["image"] = rng.standard_normal(DIM).astype(np.float32)
        if which in ("text", "both"):
            vectors["text"] = rng.standard_normal(DIM).astype(np.float32)
        payload = {"modality": which, "group": int(i % 5), "name": f"p{i}", "even": i % 2 == 0}
        points.append(Point(id=pid(f"cong{i}"), vectors=vectors, payload=payload))
    stores = [make_store(kind, tmp_path) for kind in BACKENDS]
    try:
        for s in stores:
            s.create(MANIFEST)
            s.upsert(points)
        queries = rng.standard_normal((12, DIM)).astype(np.float32)
        filters = [None, {"group": 2}, {"group": [0, 4]}, {"modality": ["image", "both"]}, {"even": True}]

        def run(s: Store) -> list:
            out: list = [s.count(), sorted(s.existing([p.id for p in points[::7]] + [pid("nope")]))]
            out.append([(h.id, h.payload) for h in s.retrieve([p.id for p in points[::-11]])])
            for qi, q in enumerate(queries):
                flt = filters[qi % len(filters)]
                for using in ("image", "text"):
                    out.append([(h.id, round(h.score, 4)) for h in s.search(q, using, 10, filter=flt)])
                out.append([(h.id, round(h.score, 4)) for h in s.search_fused(q, 10, filter=flt)])
            return out

        first, second = (run(s) for s in stores)
        assert first == second
        removed = [p.id for p in points[:40]]
        assert [s.delete(removed) for s in stores] == [40, 40]
        assert run(stores[0]) == run(stores[1])
    finally:
        for s in stores:
            s.close()


# --- open_store ------------------------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path):
    with open_store(":memory:", collection="x") as s:
        assert isinstance(s, ClientStore) and s.collection == "x" and s.manifest is None
    with open_store(tmp_path / "idx") as s:
        assert isinstance(s, EdgeStore) and s.manifest is None
    with open_store(str(tmp_path / "idx2")) as s:
        assert isinstance(s, EdgeStore)
    assert not (tmp_path / "idx").exists()  # nothing written before create()


@pytest.mark.parametrize(
    "kwargs",
    [{"api_key": "secret"}, {"prefer_grpc": True}, {"collection": "photos"}],
)
def test_open_store_rejects_server_options_for_a_directory(tmp_path, kwargs):
    with pytest.raises(ValueError, match="directory"):
        open_store(tmp_path / "idx", **kwargs)


def test_client_store_rejects_conflicting_arguments():
    with pytest.raises(ValueError, match=":memory:"):
        ClientStore(":memory:", api_key="secret")
    with pytest.raises(ValueError, match=":memory:"):
        open_store(":memory:", prefer_grpc=True)
    with pytest.raises(ValueError, match="URL"):
        ClientStore("/some/dir")
