"""The server / cluster path of `ClientStore`: cluster options, request-size batching, retries.

No Qdrant server runs here, so these drive the same code on real qdrant-client objects: local
mode (`QdrantClient(":memory:")`) subclassed to record or to fail the calls a server would see,
and real REST and gRPC clients pointed at a closed port for the transport errors a server gives.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import uuid
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from mmrag import Index
from mmrag.store import (
    ClientStore,
    ClusterOptions,
    IndexManifest,
    Point,
    RequestOptions,
    RequestTooLargeError,
    open_store,
)
from mmrag.store import transport
from mmrag.store.client import MANIFEST_KEY
from mmrag.store.transport import REQUEST_OVERHEAD, estimated_point_bytes, is_transient

DIM = 512
MANIFEST = IndexManifest(encoder_spec="test:unit-512d", dim=DIM)
LIMIT = 64 * 1024
NO_WAIT = RequestOptions(retries=3, backoff=0)


def pid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mmrag-test-server/{name}"))


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def point(i: int, **payload: Any) -> Point:
    return Point(pid(f"p{i}"), {"image": unit(i), "text": unit(1000 + i)}, {"uri": f"/photos/{i}.jpg", **payload})


def wire_bytes(batch: list[models.PointStruct]) -> int:
    """The REST body qdrant-client sends for an upsert of `batch` (as its points API encodes it)."""
    body = models.PointsList(points=batch).model_dump_json(exclude_unset=True, exclude_none=True, by_alias=True)
    return len(body.encode())


def http_error(status: int, reason: str) -> UnexpectedResponse:
    return UnexpectedResponse(status, reason, b'{"status": {"error": "test"}}', httpx.Headers())


def closed_port() -> int:
    """A local port nothing listens on, so a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def own_threads():
    """Wait for the threads a test starts: a client dialling a closed port also fails its background
    server-version check, whose warning must land (and be filtered) in that test, not a later one."""
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)


class RecordingClient(QdrantClient):
    """A real local-mode client that also records what a server would have been sent.

    Local mode accepts `shard_number`, `replication_factor` and `write_consistency_factor` but
    keeps none of them (its collection config reports None), so the arguments are checked here,
    at the `create_collection` call a server receives, not read back from the collection.
    """

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.create_kwargs: dict[str, Any] = {}
        self.upserts: list[list[models.PointStruct]] = []

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:
        self.create_kwargs = kwargs
        return super().create_collection(collection_name, **kwargs)

    def upsert(self, collection_name: str, points: Any, **kwargs: Any) -> models.UpdateResult:
        self.upserts.append(list(points))
        return super().upsert(collection_name, points, **kwargs)


class FlakyClient(QdrantClient):
    """A real local-mode client whose calls first raise the errors queued for them, then work."""

    def __init__(self, **failures: list[Exception]) -> None:
        super().__init__(":memory:")
        self.failures = failures
        self.attempts: dict[str, int] = {}

    def _attempt(self, name: str) -> None:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        queued = self.failures.get(name)
        if queued:
            raise queued.pop(0)

    def upsert(self, *args: Any, **kwargs: Any) -> models.UpdateResult:
        self._attempt("upsert")
        return super().upsert(*args, **kwargs)

    def query_points(self, *args: Any, **kwargs: Any) -> models.QueryResponse:
        self._attempt("query_points")
        return super().query_points(*args, **kwargs)

    def count(self, *args: Any, **kwargs: Any) -> models.CountResult:
        self._attempt("count")
        return super().count(*args, **kwargs)


def created(client: QdrantClient, **kwargs: Any) -> ClientStore:
    store = ClientStore.from_client(client, "photos", **kwargs)
    store.create(MANIFEST)
    return store


# --- cluster options -------------------------------------------------------------------------------


def test_cluster_options_reach_create_collection_and_not_the_manifest():
    client = RecordingClient()
    store = created(client, cluster=ClusterOptions(shard_number=6, replication_factor=3, write_consistency_factor=2))
    sent = client.create_kwargs
    assert (sent["shard_number"], sent["replication_factor"], sent["write_consistency_factor"]) == (6, 3, 2)
    assert set(sent["vectors_config"]) == {"image", "text"}
    # deployment settings, not index settings: the manifest holds only what describes the vectors
    stored = client.get_collection("photos").config.metadata[MANIFEST_KEY]
    assert stored == MANIFEST.to_dict()
    assert store.manifest == MANIFEST
    reopened = ClientStore.from_client(client, "photos")
    assert reopened.manifest == MANIFEST and reopened.cluster == ClusterOptions()


def test_without_cluster_options_the_server_defaults_apply():
    client = RecordingClient()
    created(client)
    sent = client.create_kwargs
    assert (sent["shard_number"], sent["replication_factor"], sent["write_consistency_factor"]) == (None, None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard_number": 0}, "shard_number must be a positive integer"),
        ({"replication_factor": -1}, "replication_factor must be a positive integer"),
        ({"write_consistency_factor": 1.5}, "write_consistency_factor must be a positive integer"),
        ({"shard_number": True}, "shard_number must be a positive integer"),
        ({"shard_number": "2"}, "shard_number must be a positive integer"),
        ({"replication_factor": 2, "write_consistency_factor": 3}, r"cannot exceed replication_factor \(2\)"),
    ],
)
def test_cluster_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_request_bytes": 0}, "max_request_bytes must be an integer over 1024"),
        ({"max_request_bytes": 1024}, "max_request_bytes must be an integer over 1024"),
        ({"retries": -1}, "retries must be a non-negative integer"),
        ({"retries": 2.0}, "retries must be a non-negative integer"),
        ({"backoff": -0.1}, "backoff must be a non-negative number"),
        ({"backoff": float("nan")}, "backoff must be a non-negative number"),
    ],
)
def test_request_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RequestOptions(**kwargs)


def test_server_options_are_refused_where_they_mean_nothing(tmp_path):
    # Index.open hands them to open_store, which refuses them before any encoder loads
    with pytest.raises(ValueError, match="cluster applies to a server URL, not to ':memory:'"):
        Index.open(":memory:", cluster=ClusterOptions(shard_number=2))
    with pytest.raises(ValueError, match="grpc_port applies to a server URL"):
        Index.open(":memory:", grpc_port=6334)
    with pytest.raises(ValueError, match="grpc_port, cluster, requests apply to a Qdrant server URL"):
        Index.open(tmp_path / "idx", grpc_port=6334, cluster=ClusterOptions(), requests=RequestOptions())
    with pytest.raises(ValueError, match="grpc_port must be a port number"):
        ClientStore(f"http://127.0.0.1:{closed_port()}", grpc_port=70000)
    with pytest.raises(ValueError, match="cluster must be a ClusterOptions"):
        ClientStore.from_client(QdrantClient(":memory:"), cluster={"shard_number": 2})  # type: ignore[arg-type]
    assert not (tmp_path / "idx").exists()


# --- request size ----------------------------------------------------------------------------------


def test_upserts_are_split_to_stay_under_the_request_limit():
    client = RecordingClient()
    store = created(client, requests=RequestOptions(max_request_bytes=LIMIT))
    points = [point(i) for i in range(7)]
    store.upsert(points)

    # each point: 2 x 512 floats x 24 bytes + 128 + its payload ~ 24.7 KB; 64 KiB less the
    # 1 KiB request overhead holds two of them, not three
    assert [len(batch) for batch in client.upserts] == [2, 2, 2, 1]
    for batch in client.upserts:
        assert sum(estimated_point_bytes(p) for p in batch) <= LIMIT - REQUEST_OVERHEAD
        assert wire_bytes(batch) < LIMIT  # what REST would really send
    sent = [str(p.id) for batch in client.upserts for p in batch]
    assert sent == [p.id for p in points]  # in order, each once

    assert store.count() == 7
    hits = store.search(unit(3), "image", k=2)
    assert hits[0].id == pid("p3") and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload == {"uri": "/photos/3.jpg"}


def test_batches_follow_the_payload_size_not_only_the_count():
    client = RecordingClient()
    store = created(client, requests=RequestOptions(max_request_bytes=LIMIT))
    caption = "x" * 30_000  # with it a point is ~55 KB: alone in its request
    points = [point(0), point(1, caption=caption), point(2), point(3), point(4, caption=caption)]
    store.upsert(points)
    assert [[str(p.id) for p in batch] for batch in client.upserts] == [
        [pid("p0")], [pid("p1")], [pid("p2"), pid("p3")], [pid("p4")]
    ]
    assert all(wire_bytes(batch) < LIMIT for batch in client.upserts)
    assert store.retrieve([pid("p4")])[0].payload["caption"] == caption


def test_the_point_count_still_caps_a_request():
    client = RecordingClient()
    store = created(client)  # 32 MiB: only batch_size splits
    store.batch_size = 3
    store.upsert([point(i) for i in range(8)])
    assert [len(batch) for batch in client.upserts] == [3, 3, 2]
    assert store.count() == 8


def test_one_oversized_point_is_refused_before_anything_is_sent():
    client = RecordingClient()
    store = created(client, requests=RequestOptions(max_request_bytes=LIMIT))
    store.upsert([point(0), point(1)])
    requests_before = len(client.upserts)

    big = point(9, caption="y" * 50_000)
    with pytest.raises(RequestTooLargeError) as excinfo:
        store.upsert([point(2), big, point(3)])
    message = str(excinfo.value)
    assert pid("p9") in message and f"{LIMIT}-byte request limit" in message
    size = int(re.search(r"about (\d+) bytes", message).group(1))
    assert LIMIT < size < LIMIT + 20_000
    assert isinstance(excinfo.value, ValueError)

    assert len(client.upserts) == requests_before  # no request at all from the refused call
    assert store.count() == 2
    assert store.existing([pid("p0"), pid("p1"), pid("p2"), pid("p3")]) == {pid("p0"), pid("p1")}
    assert [h.payload["uri"] for h in store.retrieve([pid("p0"), pid("p1")])] == ["/photos/0.jpg", "/photos/1.jpg"]


# --- retries ---------------------------------------------------------------------------------------


def test_transient_upsert_errors_are_retried(caplog):
    connect = ResponseHandlingException(httpx.ConnectError("connection refused"))
    client = FlakyClient(upsert=[connect, http_error(503, "Service Unavailable")])
    store = created(client, requests=NO_WAIT)
    with caplog.at_level(logging.WARNING, logger="mmrag.store.transport"):
        store.upsert([point(0), point(1)])
    assert client.attempts["upsert"] == 3
    assert store.count() == 2
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2
    assert retries[0] == "Qdrant upsert failed (ConnectError: connection refused); retry 1 of 3 in 0.00 s"
    assert retries[1] == "Qdrant upsert failed (HTTP 503 Service Unavailable); retry 2 of 3 in 0.00 s"


def test_reads_are_retried_too():
    client = FlakyClient(query_points=[http_error(502, "Bad Gateway")], count=[http_error(504, "Gateway Timeout")])
    store = created(client, requests=NO_WAIT)
    store.upsert([point(0), point(1)])
    assert store.count() == 2
    assert [h.id for h in store.search(unit(1), "image", k=1)] == [pid("p1")]
    assert (client.attempts["count"], client.attempts["query_points"]) == (2, 2)


def test_a_rate_limit_is_retried():
    limited = ResourceExhaustedResponse("too many requests", retry_after_s=0)  # what a 429 with Retry-After raises
    client = FlakyClient(upsert=[limited, http_error(429, "Too Many Requests")])
    store = created(client, requests=NO_WAIT)
    store.upsert([point(0)])
    assert client.attempts["upsert"] == 3 and store.count() == 1


@pytest.mark.parametrize("status", [400, 404, 409])
def test_client_errors_are_not_retried(status):
    error = http_error(status, "Bad Request")
    client = FlakyClient(upsert=[error])
    store = created(client, requests=NO_WAIT)
    with pytest.raises(UnexpectedResponse) as excinfo:
        store.upsert([point(0)])
    assert excinfo.value is error and excinfo.value.status_code == status
    assert client.attempts["upsert"] == 1
    assert store.count() == 0


def test_when_retries_run_out_the_last_error_surfaces():
    errors = [http_error(503, "Service Unavailable") for _ in range(3)]
    client = FlakyClient(upsert=list(errors))
    store = created(client, requests=RequestOptions(retries=2, backoff=0))
    with pytest.raises(UnexpectedResponse) as excinfo:
        store.upsert([point(0)])
    assert excinfo.value is errors[-1]
    assert client.attempts["upsert"] == 3
    assert store.count() == 0


def test_backoff_doubles_with_jitter(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(transport.time, "sleep", waits.append)
    client = FlakyClient(upsert=[http_error(503, "Service Unavailable") for _ in range(4)])
    store = created(client, requests=RequestOptions(retries=4, backoff=0.2))
    store.upsert([point(0)])
    assert len(waits) == 4
    for attempt, wait in enumerate(waits):  # half of 0.2 * 2**attempt fixed, half random
        base = 0.2 * 2**attempt
        assert base / 2 <= wait <= base
    assert store.count() == 1


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ResponseHandlingException(httpx.ReadTimeout("timed out")), True),
        (ResponseHandlingException(httpx.RemoteProtocolError("server disconnected")), True),
        (ResponseHandlingException(ValueError("response did not parse")), False),
        (http_error(503, "Service Unavailable"), True),
        (http_error(500, "Internal Server Error"), False),
        (http_error(401, "Unauthorized"), False),
        (ConnectionResetError("reset by peer"), True),
        (ValueError("bad vector"), False),
    ],
)
def test_what_counts_as_transient(error, transient):
    assert is_transient(error) is transient


@pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")
def test_index_open_passes_grpc_settings_and_retries_through(caplog, own_threads):
    # a real gRPC client dialling a closed port: UNAVAILABLE, as from a node that is down
    rest, grpc_port = closed_port(), closed_port()
    with caplog.at_level(logging.WARNING, logger="mmrag.store.transport"):
        with pytest.raises(grpc.RpcError) as excinfo:
            Index.open(
                f"http://127.0.0.1:{rest}", collection="photos", prefer_grpc=True, grpc_port=grpc_port,
                requests=RequestOptions(retries=2, backoff=0),
            )
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{grpc_port}" in excinfo.value.details()
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2 and "collection_exists" in retries[0] and "gRPC UNAVAILABLE" in retries[0]


@pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")
def test_open_store_retries_a_refused_rest_connection(caplog, own_threads):
    with caplog.at_level(logging.WARNING, logger="mmrag.store.transport"):
        with pytest.raises(ResponseHandlingException) as excinfo:
            open_store(f"http://127.0.0.1:{closed_port()}", requests=RequestOptions(retries=1, backoff=0))
    assert isinstance(excinfo.value.source, httpx.ConnectError)
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 1 and "ConnectError" in retries[0] and "retry 1 of 1 in 0.00 s" in retries[0]
