"""How `ClientStore` talks to a Qdrant server: requests sized under the server's limit, and
transient failures (a node restarting, a load balancer's 503, a rate limit) retried with backoff.

Both matter on a cluster and neither is visible in local mode: a server refuses a request body
over `service.max_request_size_mb` (32 MiB by default) outright, and a rolling restart turns a
long ingest into a stream of connection errors for a few seconds. Every call `ClientStore` retries
is idempotent (reads, upserts and deletes by id), so repeating one after a lost response is safe.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import httpx
from qdrant_client import models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Qdrant's default `service.max_request_size_mb`.
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024

#: A float32 as JSON text, at its longest: sign, 17 significant digits, point, exponent, comma
#: (`-1.2345678901234567e-05,`). gRPC sends 4 bytes a float, so the estimate is an upper bound there too.
BYTES_PER_FLOAT = 24
#: A point's JSON apart from its floats and payload: the id, the keys, brackets and both vector names.
POINT_OVERHEAD = 128
#: The request's own envelope (`{"points": [...]}` and any extra fields the client adds).
REQUEST_OVERHEAD = 1024

#: HTTP statuses worth retrying: rate limited, or a proxy or node briefly unable to answer.
TRANSIENT_HTTP_STATUS = frozenset({429, 502, 503, 504})
TRANSIENT_GRPC_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
#: Longest computed wait between two tries (a server's Retry-After is honoured as given).
MAX_BACKOFF_S = 30.0


class RequestTooLargeError(ValueError):
    """One point alone would not fit in a request the server accepts."""


@dataclass(frozen=True)
class RequestOptions:
    """How `ClientStore` sizes and retries its requests.

    `max_request_bytes`: the server's request-size limit; upserts are split so each request's
    estimated size stays under it. `retries`: tries after the first on a transient error.
    `backoff`: base wait in seconds, doubled each retry, with jitter so clients that failed
    together do not come back together.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    retries: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if not _is_int(self.max_request_bytes) or self.max_request_bytes <= REQUEST_OVERHEAD:
            raise ValueError(
                f"max_request_bytes must be an integer over {REQUEST_OVERHEAD}, got {self.max_request_bytes!r}"
            )
        if not _is_int(self.retries) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {self.retries!r}")
        backoff = self.backoff
        is_number = isinstance(backoff, (int, float)) and not isinstance(backoff, bool)
        if not is_number or not math.isfinite(backoff) or backoff < 0:
            raise ValueError(f"backoff must be a non-negative number of seconds, got {self.backoff!r}")


def estimated_point_bytes(point: models.PointStruct) -> int:
    """An upper bound on `point`'s size in a REST upsert body: its floats, payload JSON and keys."""
    vectors = point.vector if isinstance(point.vector, dict) else {}
    floats = sum(len(v) for v in vectors.values())
    payload = len(json.dumps(point.payload, ensure_ascii=True, default=str))  # ASCII: bytes == chars
    return POINT_OVERHEAD + floats * BYTES_PER_FLOAT + payload


def size_batches(
    points: Sequence[models.PointStruct], max_request_bytes: int, max_points: int
) -> list[list[models.PointStruct]]:
    """`points` in order, split into requests of at most `max_points` points and `max_request_bytes`.

    Raises RequestTooLargeError, naming the point, its estimated size and the limit, if any point
    alone is over the limit; it does so before returning anything, so the caller sends nothing.
    """
    budget = max_request_bytes - REQUEST_OVERHEAD
    sizes = [estimated_point_bytes(p) for p in points]
    for point, size in zip(points, sizes):
        if size > budget:
            raise RequestTooLargeError(
                f"point {point.id} is about {size} bytes serialized (vectors and payload), over the "
                f"{max_request_bytes}-byte request limit (max_request_bytes, less {REQUEST_OVERHEAD} for the "
                "request itself); nothing from this call was written. Shrink its payload, or raise the limit "
                "to match the server's service.max_request_size_mb"
            )
    batches: list[list[models.PointStruct]] = []
    current: list[models.PointStruct] = []
    used = 0
    for point, size in zip(points, sizes):
        if current and (used + size > budget or len(current) == max_points):
            batches.append(current)
            current, used = [], 0
        current.append(point)
        used += size
    if current:
        batches.append(current)
    return batches


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may cure: transport failures, timeouts, 429/502/503/504 and their
    gRPC counterparts. Anything else (a 400 for a bad request, a 404, a parse error) is final."""
    if isinstance(exc, ResourceExhaustedResponse):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in TRANSIENT_HTTP_STATUS
    if isinstance(exc, ResponseHandlingException):
        return isinstance(exc.source, httpx.TransportError)  # not a response that failed to parse
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        return callable(code) and code() in TRANSIENT_GRPC_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def call_with_retries(call: Callable[[], T], what: str, options: RequestOptions) -> T:
    """`call()`, tried again up to `options.retries` times on a transient error.

    Each retry is logged as a warning; when the tries run out, or on an error that is not
    transient, the error itself is raised, unwrapped.
    """
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if attempt >= options.retries or not is_transient(exc):
                raise
            delay = _delay(exc, attempt, options.backoff)
            attempt += 1
            logger.warning(
                "Qdrant %s failed (%s); retry %d of %d in %.2f s", what, _describe(exc), attempt, options.retries, delay
            )
            time.sleep(delay)


def _delay(exc: BaseException, attempt: int, backoff: float) -> float:
    """Exponential backoff with "equal jitter" (half fixed, half random); a server's Retry-After wins."""
    base = min(backoff * 2 ** min(attempt, 16), MAX_BACKOFF_S)  # a capped exponent: no overflow on huge retries
    delay = base / 2 + random.uniform(0, base / 2)
    if isinstance(exc, ResourceExhaustedResponse):
        delay = max(delay, float(exc.retry_after_s))
    return delay


def _describe(exc: BaseException) -> str:
    """One line saying what went wrong: the transport error inside qdrant-client's wrapper, the
    HTTP status or the gRPC code."""
    if isinstance(exc, ResponseHandlingException):
        exc = exc.source
    if isinstance(exc, UnexpectedResponse):
        return f"HTTP {exc.status_code} {exc.reason_phrase}"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"gRPC {exc.code().name}: {exc.details()}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
