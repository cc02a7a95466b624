"""`EdgeOptions`: the HNSW graph, quantization and search settings of the embedded store.

The speed and recall of each setting are measured by tests/bench/search.py (docs/benchmarks.md);
these tests check the wiring: what a new shard records, what reopening keeps, that `flush()`
builds the graph, and that searches through the graph and the int8 copy still find the nearest.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from mmrag.store import EdgeOptions, EdgeStore, IndexManifest, Point


def shard_config(path) -> dict:
    return json.loads((path / "shard" / "edge_config.json").read_text())


def fill(store: EdgeStore, vectors: np.ndarray) -> None:
    store.create(IndexManifest(encoder_spec="test", dim=vectors.shape[1]))
    store.upsert([Point(str(uuid.UUID(int=i)), {"image": v}, {"uri": f"/p/{i}.jpg"}) for i, v in enumerate(vectors)])


def embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors on a 16-d subspace, like real embeddings' low intrinsic dimension
    (HNSW does poorly on structureless high-dimensional noise, and so would this test)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)) @ np.random.default_rng(99).standard_normal((16, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_a_new_shard_records_the_default_graph_and_int8(tmp_path):
    with EdgeStore(tmp_path / "index") as store:
        store.create(IndexManifest(encoder_spec="test", dim=8))
    config = shard_config(tmp_path / "index")
    defaults = EdgeOptions()
    assert config["hnsw_config"]["m"] == defaults.m == 32
    assert config["hnsw_config"]["ef_construct"] == defaults.ef_construct == 200
    assert config["quantization_config"] == {"scalar": {"type": "int8"}}


def test_build_settings_stay_with_the_shard_when_reopened_with_others(tmp_path):
    with EdgeStore(tmp_path / "index", EdgeOptions(m=8, ef_construct=50, quantization=None)) as store:
        store.create(IndexManifest(encoder_spec="test", dim=8))
    with EdgeStore(tmp_path / "index", EdgeOptions(m=64, quantization="binary")) as again:
        assert again.manifest is not None
    config = shard_config(tmp_path / "index")
    assert (config["hnsw_config"]["m"], config["hnsw_config"]["ef_construct"]) == (8, 50)
    assert config.get("quantization_config") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"m": 0}, {"ef_construct": -1}, {"hnsw_ef": 0}, {"m": True}, {"quantization": "int4"},
     {"oversampling": 0.5}, {"oversampling": "2"}],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        EdgeOptions(**kwargs)


def test_edge_store_refuses_options_of_another_type(tmp_path):
    with pytest.raises(ValueError, match="EdgeOptions"):
        EdgeStore(tmp_path / "index", {"m": 16})  # type: ignore[arg-type]


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_flush_builds_the_graph_and_searches_still_find_the_nearest(tmp_path, quantization):
    # 6,000 points of 512-d pass the engine's indexing threshold (about 10 MB of vectors);
    # a small graph (m 8, ef_construct 16) keeps the build to a second or two
    vectors = embeddings(6_000, 512)
    options = EdgeOptions(m=8, ef_construct=16, quantization=quantization, hnsw_ef=64)
    with EdgeStore(tmp_path / "index", options) as store:
        fill(store, vectors)
        assert store._live().info().indexed_vectors_count == 0  # not optimized yet: a plain scan
        store.flush()
        assert store._live().info().indexed_vectors_count >= len(vectors)
        # each stored vector, as a query, finds itself first (cosine 1) through the graph
        picked = np.random.default_rng(2).choice(len(vectors), 50, replace=False)
        for i in picked:
            hits = store.search(vectors[i], "image", 10)
            assert len(hits) == 10
            assert uuid.UUID(hits[0].id).int == i and hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_optimize_on_flush_false_leaves_the_shard_plain_until_optimize(tmp_path):
    vectors = embeddings(6_000, 512)
    options = EdgeOptions(m=8, ef_construct=16, optimize_on_flush=False)
    with EdgeStore(tmp_path / "index", options) as store:
        fill(store, vectors)
        store.flush()
        assert store._live().info().indexed_vectors_count == 0
        assert store.optimize() is True
        assert store._live().info().indexed_vectors_count >= len(vectors)
