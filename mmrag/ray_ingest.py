"""Ingest on Ray: encoder actors decode and encode; the driver checks and writes every batch.

    from mmrag.ray_ingest import RayConfig, ingest_ray
    with Index.open("photos.mmrag") as index:
        report = ingest_ray(index, "~/Pictures", RayConfig(actors=4))

Ray Data streams the items through `map_batches` over a fixed pool of `EncoderActor`s: each
actor loads the index's encoder from its spec once, then runs the single-process path's own
pieces on every batch (`prepare_item`, change detection, `encode_prepared`), so both paths
build identical points. Writes stay in the driver, as batches stream back: an Edge index is
open in one process only, and a Qdrant server then sees one writer.

Change detection happens twice. Before the job, the driver reads what the store holds for every
image file's id (known from its path) and sends it along, so an actor encodes no unchanged file.
After encoding, the driver checks each point again against the store, which covers in-memory
images and texts (encoded, then counted as already present) and an id repeated in the source.

Needs the `ray` extra: `pip install 'mmrag[ray]'`.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .encoders import load_encoder
from .ingest import (
    IngestReport,
    Prepared,
    Skipped,
    encode_prepared,
    file_id,
    prepare_item,
    stored_payloads,
    unstored,
    write_points,
)
from .sources import Source, count_items, iter_items
from .store import Point

if TYPE_CHECKING:
    from .index import Index

@dataclass(frozen=True)
class RayConfig:
    """Where a Ray ingest runs and how many encoders it starts."""

    #: a running cluster ("auto", or the head's "HOST:6379"); None: the instance this process already
    #: joined, else a new local one
    address: str | None = None
    #: encoder actors; each loads the model once and holds it for the whole job
    actors: int = 1
    #: CPUs Ray reserves per actor, which also caps the torch threads each actor runs
    cpus_per_actor: float = 1.0
    #: CPUs of a new local instance (default: all cores); meaningless with `address`
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.num_cpus is not None and self.address is not None:
            raise ValueError("num_cpus sizes a new local Ray instance; a cluster given by address keeps its own")


@dataclass
class BatchOutcome:
    """What an actor sends back for one batch: its new or changed points and its share of the report."""

    items: int
    points: list[Point]
    report: IngestReport = field(default_factory=lambda: IngestReport(stage_seconds={"decode": 0.0, "encode": 0.0}))


class EncoderActor:
    """One Ray actor: loads the encoder once, then decodes, checks and encodes batch after batch.

    Rows and outcomes cross Ray as pickled bytes: Arrow would coerce payload values (ints to
    floats, lists to arrays), and change detection compares payloads exactly.
    """

    def __init__(self, spec: str, allow_truncated: bool, precision: str = "fp32", runtime: str = "torch") -> None:
        self.encoder = load_encoder(spec, precision=precision, runtime=runtime)  # type: ignore[arg-type]
        self.allow_truncated = allow_truncated

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcome = BatchOutcome(items=len(batch["item"]), points=[])
        report = outcome.report
        started = time.perf_counter()
        prepared: list[Prepared] = []
        stored: dict[str, dict[str, Any]] = {}
        for item_bytes, stored_bytes in zip(batch["item"], batch["stored"]):
            result = prepare_item(pickle.loads(item_bytes), self.encoder.preprocess, allow_truncated=self.allow_truncated)
            if result.error:
                report.skipped.append(Skipped(result.item.label, result.error))
                continue
            prepared.append(result)
            payload = pickle.loads(stored_bytes)
            if payload is not None:
                stored[result.id] = payload
        fresh = unstored(prepared, stored, report)
        report.stage_seconds["decode"] += time.perf_counter() - started
        if fresh:
            started = time.perf_counter()
            outcome.points = encode_prepared(fresh, self.encoder, report)
            report.stage_seconds["encode"] += time.perf_counter() - started
        return {"outcome": np.array([pickle.dumps(outcome)], dtype=object)}


def ingest_ray(
    index: Index,
    source: Source,
    config: RayConfig = RayConfig(),
    *,
    batch_size: int = 32,
    progress: bool = True,
    allow_truncated: bool = False,
) -> IngestReport:
    """`index.add(source)` with the decoding and encoding spread over Ray actors.

    Builds the same points as `Index.add` (ids, payloads, vectors) and returns the same report;
    bad inputs are skipped with their reason. The driver lists every item first (Ray Data needs
    the list), so the source must fit in its memory. Every node must resolve the index's encoder
    spec and read the source's files at the same paths. `stage_seconds` holds `decode` and
    `encode` summed over the actors, and the driver's `wait` for batches and `write`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ray = connect(config)
    started = time.perf_counter()
    items = list(iter_items(source))
    ids = [file_id(item) for item in items]
    known = stored_payloads(index.store, [id_ for id_ in ids if id_])
    rows = [{"item": pickle.dumps(item), "stored": pickle.dumps(known.get(id_) if id_ else None)}
            for item, id_ in zip(items, ids)]
    dataset = ray.data.from_items(rows).map_batches(
        EncoderActor,
        fn_constructor_kwargs={"spec": index.encoder.spec, "allow_truncated": allow_truncated,
                               "precision": index.encoder.precision, "runtime": index.encoder.runtime},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
    dataset.context.enable_progress_bars = False  # the driver's own bar counts items, not blocks
    report = IngestReport(stage_seconds={"decode": 0.0, "encode": 0.0, "wait": 0.0, "write": 0.0})
    blocks = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    with tqdm(total=count_items(source), unit="item", desc="indexing on ray", disable=not progress) as bar:
        while True:
            waited = time.perf_counter()
            block = next(blocks, None)
            report.stage_seconds["wait"] += time.perf_counter() - waited
            if block is None:
                break
            for outcome in map(pickle.loads, block["outcome"]):
                _write_outcome(outcome, index, report)
                bar.update(outcome.items)
    index.store.flush()
    report.seconds = time.perf_counter() - started
    return report


def connect(config: RayConfig) -> Any:
    """The `ray` module, joined to a cluster: the one this process already uses, `config.address`, or a new local one."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` extra: pyarrow, pandas)
    except ImportError as exc:
        raise ImportError("Ray ingest needs Ray Data; install it with pip install 'mmrag[ray]'") from exc
    if not ray.is_initialized():
        if config.address is not None:
            ray.init(address=config.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # else every dataset logs its plan and timing
    return ray


def _write_outcome(outcome: BatchOutcome, index: Index, report: IngestReport) -> None:
    """Fold an actor's share into `report`, then write what the store still lacks or holds otherwise."""
    report.already_present += outcome.report.already_present
    report.skipped.extend(outcome.report.skipped)
    report.truncated.extend(outcome.report.truncated)
    for stage, seconds in outcome.report.stage_seconds.items():
        report.stage_seconds[stage] += seconds
    stored = stored_payloads(index.store, [point.id for point in outcome.points])
    write_points(unstored(outcome.points, stored, report), stored, index.store, report)
