"""Store robustness: bad vectors, width mismatches, one index shared by several handles or held by
another process, partial corpora and deletes. Real engines (Qdrant Edge in tmp_path, qdrant-client
":memory:"), no mocks; tiny hand-made vectors with known answers."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

import mmrag.store
from mmrag.store import ClientStore, EdgeStore, Hit, IndexManifest, Point, Store, StoreLockedError, open_store
from mmrag.store import edge as edge_module

DIM = 4
SPEC = "test:robust-4d"
MANIFEST = IndexManifest(encoder_spec=SPEC, dim=DIM)
E = np.eye(DIM, dtype=np.float32)


def pid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mmrag-robust/{name}"))


ID = {n: pid(n) for n in ("a", "b", "c", "new", "bad", "unknown")}
NAME = {v: k for k, v in ID.items()}

# image search for e0: a (cos 1), b (cos 0.7071), c (cos 0); text search for e3: a (1), b (0.7071)
VECTORS = {
    "a": {"image": E[0], "text": E[3]},
    "b": {"image": E[0] + E[1], "text": E[2] + E[3]},
    "c": {"image": E[1]},
}


def make_points(only: str | None = None) -> list[Point]:
    out = []
    for name, vectors in VECTORS.items():
        vs = {k: v for k, v in vectors.items() if only is None or k == only}
        if vs:
            out.append(Point(id=ID[name], vectors=vs, payload={"name": name}))
    return out


def names(hits: list[Hit]) -> list[str]:
    return [NAME[h.id] for h in hits]


def snapshot(s: Store) -> list:
    return [
        [(h.id, round(h.score, 5), h.payload) for h in s.search(E[0], "image", 10)],
        [(h.id, round(h.score, 5), h.payload) for h in s.search(E[3], "text", 10)],
        [(h.id, round(h.score, 5), h.payload) for h in s.search_fused(E[0] + E[3], 10)],
    ]


def new_store(kind: str, tmp_path: Path) -> Store:
    s = EdgeStore(tmp_path / "index") if kind == "edge" else ClientStore(":memory:", collection="robust")
    s.create(MANIFEST)
    return s


@pytest.fixture(params=["edge", "client"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def store(kind, tmp_path):
    s = new_store(kind, tmp_path)
    s.upsert(make_points())
    yield s
    s.close()


# --- 9. bad vectors are refused before anything is written --------------------------------------


@pytest.mark.parametrize(
    ("vector", "problem"),
    [
        (np.array([0.5, np.nan, 0.0, 0.0]), "contains NaN"),
        (np.array([0.5, np.inf, 0.0, 0.0]), "contains infinite values"),
        (np.zeros(DIM), "is a zero vector, which has no direction for cosine similarity"),
    ],
)
def test_bad_vector_is_rejected_naming_point_vector_and_problem(store, vector, problem):
    with pytest.raises(ValueError) as err:
        store.upsert([Point(id=ID["bad"], vectors={"text": vector})])
    assert str(err.value) == f"point {ID['bad']} vector 'text' {problem}"
    assert store.count() == 3
    assert store.existing([ID["bad"]]) == set()


def test_wrong_width_point_names_both_widths(store):
    with pytest.raises(ValueError) as err:
        store.upsert([Point(id=ID["bad"], vectors={"image": np.ones(3)})])
    assert str(err.value) == (
        f"point {ID['bad']} vector 'image' has width 3, but the index holds width 4 "
        f"(encoder_spec '{SPEC}'); embed with that encoder or build a new index"
    )


def test_mixed_batch_is_rejected_whole_and_the_index_is_untouched(store):
    before = snapshot(store)
    store.batch_size = 1  # the bad point would be in the third write: still nothing is written
    batch = [
        Point(id=ID["new"], vectors={"image": E[2]}, payload={"name": "new"}),
        Point(id=ID["a"], vectors={"image": E[1]}, payload={"name": "overwritten"}),
        Point(id=ID["bad"], vectors={"image": np.array([1.0, np.nan, 0.0, 0.0])}),
    ]
    with pytest.raises(ValueError, match=f"point {ID['bad']} vector 'image' contains NaN"):
        store.upsert(batch)
    assert store.count() == 3
    assert store.existing([ID["new"], ID["bad"]]) == set()
    assert store.retrieve([ID["a"]])[0].payload == {"name": "a"}
    assert snapshot(store) == before
    assert names(store.search(E[0], "image", 10)) == ["a", "b", "c"]


# --- 10. a query of another width names both widths and the recorded encoder ---------------------


@pytest.mark.parametrize("query", [np.ones(5), np.ones((1, 5))])
def test_query_of_wrong_width_names_both_widths_and_encoder(store, query):
    expected = (
        f"query vector has width 5, but the index holds width 4 (encoder_spec '{SPEC}'); "
        "embed with that encoder or build a new index"
    )
    for call in (lambda: store.search(query, "image", 3), lambda: store.search(query, "text", 3),
                 lambda: store.search_fused(query, 3)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == expected


def test_edge_query_width_error_uses_the_manifest_on_disk(tmp_path):
    with EdgeStore(tmp_path / "index") as s:
        s.create(IndexManifest(encoder_spec="disk:spec", dim=DIM))
    with EdgeStore(tmp_path / "index") as s:
        with pytest.raises(ValueError, match=r"width 2, but the index holds width 4 \(encoder_spec 'disk:spec'\)"):
            s.search_fused(np.ones(2), 3)


# --- 11. sharing an Edge index (Edge only) -------------------------------------------------------


def test_edge_handles_in_one_process_share_one_engine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    ingest = open_store("index")
    ingest.create(MANIFEST)
    retriever = EdgeStore("./sub/../index")  # the same directory, spelled differently
    shard = ingest._live()
    assert retriever._live() is shard
    assert retriever.manifest == MANIFEST

    ingest.upsert(make_points())  # seen through the other handle at once, without flush
    assert retriever.count() == 3
    assert names(retriever.search(E[0], "image", 10)) == ["a", "b", "c"]
    assert retriever.delete([ID["c"]]) == 1
    assert ingest.count() == 2

    ingest.close()
    with pytest.raises(RuntimeError, match="closed"):
        ingest.count()
    assert names(retriever.search(E[3], "text", 10)) == ["a", "b"]
    retriever.upsert([Point(id=ID["new"], vectors={"image": E[2]})])
    assert retriever.count() == 3

    retriever.close()  # the last handle: shard closed, directory unlocked
    assert (tmp_path / "index").resolve() not in edge_module._ENGINES
    with pytest.raises(Exception, match="not initialized"):
        shard.count(edge_module.CountRequest(exact=True))
    fd = os.open(tmp_path / "index" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    with EdgeStore(tmp_path / "index") as again:
        assert again.count() == 3


def test_edge_handles_opened_from_many_threads_share_one_engine(tmp_path):
    with EdgeStore(tmp_path / "index") as first:
        first.create(MANIFEST)
        opened: list[EdgeStore] = []
        threads = [threading.Thread(target=lambda: opened.append(EdgeStore(tmp_path / "index"))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(opened) == 8 and all(s._live() is first._live() for s in opened)
        assert first._engine.refs == 9
        for s in opened:
            s.close()
        assert first._engine.refs == 1 and first.count() == 0
    assert (tmp_path / "index").resolve() not in edge_module._ENGINES


# A child process imports only mmrag.store (a stub `mmrag` package skips mmrag/__init__, which loads
# the encoders and would take seconds).
CHILD_PRELUDE = """
import os, sys, types
pkg = types.ModuleType("mmrag"); pkg.__path__ = [sys.argv[1]]; sys.modules["mmrag"] = pkg
import numpy as np
from mmrag.store import EdgeStore, IndexManifest, Point
path = sys.argv[2]
"""


def child(code: str, path: Path, **kwargs) -> subprocess.Popen:
    package_dir = str(Path(mmrag.store.__file__).resolve().parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + code, package_dir, str(path)], text=True, **kwargs
    )


def test_edge_index_survives_a_process_that_exits_without_closing(tmp_path):
    code = f"""
s = EdgeStore(path)
s.create(IndexManifest(encoder_spec={SPEC!r}, dim={DIM}))
s.upsert([Point(id={ID['a']!r}, vectors={{"image": np.eye(4)[0], "text": np.eye(4)[3]}}, payload={{"name": "a"}}),
          Point(id={ID['c']!r}, vectors={{"image": np.eye(4)[1]}}, payload={{"name": "c"}})])
os._exit(0)  # no flush, no close, no atexit
"""
    proc = child(code, tmp_path / "index", stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    with EdgeStore(tmp_path / "index") as s:
        assert s.manifest == MANIFEST
        assert s.count() == 2
        assert names(s.search(E[0], "image", 10)) == ["a", "c"]
        assert [h.payload for h in s.retrieve([ID["c"], ID["a"]])] == [{"name": "c"}, {"name": "a"}]


def test_edge_index_held_by_another_process_raises_store_locked(tmp_path):
    path = tmp_path / "index"
    with EdgeStore(path) as s:
        s.create(MANIFEST)
        s.upsert(make_points())
    code = "s = EdgeStore(path)\nprint('ready', s.count(), flush=True)\nsys.stdin.read()\ns.close()\n"
    holder = child(code, path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "ready 3"
        with pytest.raises(StoreLockedError) as err:
            EdgeStore(path)
        assert str(err.value) == (
            f"{path.resolve()} is locked: it is open in another process, and an embedded Qdrant Edge "
            "index can be opened by one process at a time. Close the other process, or run a Qdrant "
            "server and open the index by URL (open_store('http://host:6333')) to share it between processes."
        )
        assert path.resolve() not in edge_module._ENGINES  # the failed open left nothing behind
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
    assert holder.returncode == 0
    with EdgeStore(path) as s:
        assert s.count() == 3


# --- 12. partial corpora ----------------------------------------------------------------------------


@pytest.mark.parametrize(("only", "missing", "query", "expected"), [
    ("image", "text", E[0], ["a", "b", "c"]),
    ("text", "image", E[3], ["a", "b"]),
])
def test_partial_corpus_answers_missing_vector_with_empty_list(kind, tmp_path, only, missing, query, expected):
    s = new_store(kind, tmp_path)
    try:
        s.upsert(make_points(only))
        assert s.search(query, missing, 10) == []
        assert s.search(query, missing, 10, filter={"name": "a"}) == []
        assert names(s.search(query, only, 10)) == expected
        fused = s.search_fused(query, 10)
        assert names(fused) == expected
        assert [round(h.score, 6) for h in fused] == [round(1 / (2 + r), 6) for r in range(len(expected))]
    finally:
        s.close()


# --- 13. deletes --------------------------------------------------------------------------------------


def test_deleted_point_never_comes_back(kind, tmp_path, store):
    assert store.delete([ID["a"]]) == 1
    assert store.count() == 2
    assert store.delete([ID["a"]]) == 0
    assert store.delete([ID["unknown"]]) == 0
    assert store.count() == 2
    store.upsert([Point(id=ID["b"], vectors={"image": E[0]}, payload={"name": "b2"})])  # other writes
    second = [EdgeStore(tmp_path / "index")] if kind == "edge" else []  # a second handle on the engine
    for s in [store, *second]:
        assert s.count() == 2
        assert names(s.search(E[0], "image", 10)) == ["b", "c"]
        assert names(s.search(E[3], "text", 10)) == []
        assert ID["a"] not in {h.id for h in s.search_fused(E[0] + E[3], 10)}
        assert s.retrieve([ID["a"]]) == []
        assert s.existing([ID["a"], ID["b"]]) == {ID["b"]}
    for s in [store, *second]:
        s.close()
    if kind == "edge":
        with EdgeStore(tmp_path / "index") as again:  # and after reopening from disk
            assert again.count() == 2 and again.existing([ID["a"]]) == set()
