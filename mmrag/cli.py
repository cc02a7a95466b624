"""`mmrag` command line: thin wrappers over the library (Index, evaluate_manifest, training).

Each command imports what it needs when it runs, so `mmrag --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from .ray_ingest import RayConfig

app = typer.Typer(help="Index photos and texts into a Qdrant store with a dual-encoder tower, then search them.",
                  no_args_is_help=True, add_completion=False)

IndexOption = typer.Option(..., "--index", "-i", help="Index folder (embedded Qdrant), http(s):// Qdrant URL, or :memory:.")
EncoderOption = typer.Option(None, "--encoder", "-e", help="Encoder spec; default: the one the index records, else the default tower.")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")
PrecisionOption = typer.Option("fp32", "--precision", help="fp32, or bf16 autocast: ~1.8x faster on CPUs with AVX512-BF16, "
                               "embeddings within ~0.005 cosine (docs/benchmarks.md).")


RuntimeOption = typer.Option("torch", "--runtime", help="torch, or onnx: the image side in ONNX Runtime, same embeddings, "
                             "several times faster on a CPU (needs mmrag[onnx]; docs/benchmarks.md).")


def _precision(value: str) -> str:
    from .encoders.base import check_precision

    return _checked(check_precision, value, "--precision")


def _runtime(value: str) -> str:
    from .encoders.base import check_runtime

    return _checked(check_runtime, value, "--runtime")


def _checked(check: Callable[[str], str], value: str, option: str) -> str:
    """`check(value)`, its ValueError turned into a usage error on `option`."""
    try:
        return check(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=None, default=str))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each skipped file and more.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def index(
    path: Optional[Path] = typer.Argument(None, help="Folder, captions.jsonl manifest or image file. "
                                          "Omitted: scikit-image's bundled sample photos."),
    index: str = IndexOption,
    encoder: Optional[str] = EncoderOption,
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default: cores / 2)."),
    allow_truncated: bool = typer.Option(False, help="Index truncated image files (missing part grey) instead of skipping them."),
    shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Qdrant URL only: shards of a new collection."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Qdrant URL only: copies of each shard of a new collection."),
    use_ray: bool = typer.Option(False, "--ray", help="Decode and encode on Ray actors; this process writes the store. Needs mmrag[ray]."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running cluster (auto, or HEAD:6379); default: a new local instance."),
    actors: int = typer.Option(1, "--actors", min=1, help="With --ray: encoder actors, each loading the model once."),
    precision: str = PrecisionOption,
    runtime: str = RuntimeOption,
    as_json: bool = JsonOption,
) -> None:
    """Index a folder of photos (recursively), a captions.jsonl manifest, or one image."""
    from .index import Index
    from .store import ClusterOptions

    cluster = None
    if shards is not None or replicas is not None:
        if not index.lower().startswith(("http://", "https://")):
            raise typer.BadParameter(f"--shards and --replicas need an http(s):// Qdrant URL, not {index!r}", param_hint="--index")
        cluster = ClusterOptions(shard_number=shards, replication_factor=replicas)
    if path is None:
        from .samples import export_sample_photos

        path = Path(index).with_name(Path(index).name + "-samples") if "://" not in index else Path("mmrag-samples")
        export_sample_photos(path)
        typer.echo(f"no folder given: indexing scikit-image's sample photos, written to {path}", err=True)
    elif not path.exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="PATH")
    ray_config = _ray_config(use_ray, ray_address, actors, workers)
    with Index.open(index, encoder, cluster=cluster, precision=_precision(precision), runtime=_runtime(runtime)) as idx:
        if ray_config is not None:
            from .ray_ingest import ingest_ray

            report = ingest_ray(idx, path, ray_config, batch_size=batch_size, progress=not as_json,
                                allow_truncated=allow_truncated)
        else:
            report = idx.add(path, batch_size=batch_size, workers=workers, progress=not as_json,
                             allow_truncated=allow_truncated)
        total = idx.count()
    if as_json:
        _echo_json({**asdict(report), "count": total})
    else:
        typer.echo(f"{report}\nindex {index} now holds {total} items")


def _ray_config(use_ray: bool, address: Optional[str], actors: int, workers: Optional[int]) -> Optional[RayConfig]:
    """The Ray settings of `mmrag index --ray`, joined before any model loads (fails fast); None without --ray."""
    if not use_ray:
        if address is not None or actors != 1:
            raise typer.BadParameter("--ray-address and --actors need --ray", param_hint="--ray")
        return None
    if workers is not None:
        raise typer.BadParameter("--workers sets single-process decoding; with --ray the --actors decode", param_hint="--workers")
    from .ray_ingest import RayConfig, connect

    config = RayConfig(address=address, actors=actors)
    try:
        connect(config)
    except ImportError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ray") from None
    return config


@app.command()
def search(
    query: Optional[str] = typer.Argument(None, help="Text query. Use --image for an image query."),
    index: str = IndexOption,
    k: int = typer.Option(10, "-k", min=1, help="Number of results."),
    image: Optional[Path] = typer.Option(None, "--image", help="Search by this image instead of text."),
    target: str = typer.Option("image", help="Compare with items' image vectors, text vectors, or both (fused)."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also draw the results as one picture (PNG)."),
    precision: str = PrecisionOption,
    as_json: bool = JsonOption,
) -> None:
    """Search an index by text or by example image."""
    from .index import Index

    if target not in ("image", "text", "both"):
        raise typer.BadParameter(f"{target!r} is not one of image, text, both", param_hint="--target")
    if (query is None) == (image is None):
        raise typer.BadParameter("give either a text QUERY or --image FILE, not both or neither")
    if image is not None and not image.is_file():
        raise typer.BadParameter(f"{image} is not a file", param_hint="--image")
    with Index.open(index, precision=_precision(precision)) as idx:
        hits = idx.search(image if image is not None else query, k=k, target=target)  # type: ignore[arg-type]
    if sheet is not None and hits:
        from .sheet import contact_sheet

        contact_sheet(hits, sheet, title=f"{query or image.name}  (target: {target})")
        typer.echo(f"contact sheet: {sheet}", err=True)
    if as_json:
        _echo_json([{"id": h.id, "score": h.score, "uri": h.uri, "captions": h.captions, "modality": h.modality} for h in hits])
        return
    for rank, hit in enumerate(hits, 1):
        caption = f"  {hit.captions[0]!r}" if hit.captions else ""
        typer.echo(f"{rank:>3}. {hit.score:.3f}  {hit.uri or hit.id}{caption}")


@app.command(name="eval")
def evaluate(
    manifest: Path = typer.Argument(..., exists=True, dir_okay=False, help="A captions.jsonl manifest."),
    split: Optional[str] = typer.Option(None, help="Only this split of the manifest (e.g. dev)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="Encoder spec (default: the default tower)."),
    zero_shot: Optional[bool] = typer.Option(None, "--zero-shot/--no-zero-shot",
                                             help="Zero-shot mAP over the manifest's categories (default: when it has them)."),
    templates: Optional[Path] = typer.Option(None, "--templates", exists=True, dir_okay=False,
                                             help="Prompt templates for zero-shot, one a line with {} for the label."),
    batch_size: int = typer.Option(32),
    precision: str = PrecisionOption,
    runtime: str = RuntimeOption,
    as_json: bool = JsonOption,
) -> None:
    """Retrieval recall@1/5/10 both ways, and zero-shot mAP when the manifest lists categories."""
    from .encoders import load_encoder
    from .evaluate import evaluate_manifest, format_eval_table
    from .zeroshot import read_templates

    try:
        prompts = read_templates(templates) if templates is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--templates") from None
    tower = load_encoder(encoder, precision=_precision(precision), runtime=_runtime(runtime))
    try:
        report = evaluate_manifest(tower, manifest, split=split, zero_shot=zero_shot,
                                   templates=prompts, batch_size=batch_size, progress=not as_json)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MANIFEST") from None
    if as_json:
        _echo_json(report.to_dict())
    else:
        typer.echo(format_eval_table(report))


@app.command()
def train(
    source: Path = typer.Argument(..., exists=True, help="Training data: a captions.jsonl manifest or a folder with one."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: model, curves.png, history.json, checkpoint/."),
    style: str = typer.Option("align", help="align: EfficientNet + transformers text model + heads; openclip: any open_clip model."),
    image_backbone: str = typer.Option("lite0", help="align style: lite0, lite1, lite2 or timm:<name>."),
    text_backbone: str = typer.Option("minilm", help="align style: minilm or a local transformers folder (e.g. XLM-R)."),
    model: str = typer.Option("ViT-B-32", help="openclip style: ARCH (from scratch), ARCH@TAG or ARCH@CHECKPOINT, or a spec."),
    model_config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="openclip style: JSON config of a custom architecture."),
    loss: str = typer.Option("clip", help="clip (InfoNCE), align (normalised softmax + label smoothing) or siglip."),
    label_smoothing: float = typer.Option(0.1, help="For --loss align."),
    image_unlocked: int = typer.Option(0, help="Image tower blocks to train, from the end: 0 locked, -1 all."),
    text_unlocked: int = typer.Option(0, help="Text tower blocks to train, from the end: 0 locked, -1 all."),
    augment: str = typer.Option("flip", help="none, flip (cached mirrored copies), flip-gray (mirrored and grey copies) or crop (random resized crops + flip)."),
    epochs: int = typer.Option(20, min=1),
    batch_size: int = typer.Option(512, min=2),
    lr: float = typer.Option(1e-3, help="Learning rate of heads (align) or of the whole model (openclip)."),
    backbone_lr: float = typer.Option(1e-4, help="Learning rate of unlocked pretrained blocks (align style)."),
    warmup_steps: int = typer.Option(50, min=0, help="Linear warm-up steps before the cosine decay."),
    precision: str = typer.Option("no", help="accelerate mixed precision: no, bf16 or fp16."),
    grad_accumulation: int = typer.Option(1, min=1),
    train_split: Optional[str] = typer.Option("train", help="Split of SOURCE to train on ('' for all of it)."),
    dev: Optional[Path] = typer.Option(None, exists=True, help="Held-out manifest or folder (default: SOURCE's --dev-split)."),
    dev_split: Optional[str] = typer.Option("dev", help="Split to evaluate each epoch on ('' for all of --dev)."),
    keep: str = typer.Option("best", help="Epoch kept as the model: best (on dev) or last (dev trained on, or a fixed recipe)."),
    seed: int = typer.Option(0),
    cache: Path = typer.Option(Path(".cache/train-features"), help="Where locked-prefix features are cached."),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint when there is one."),
) -> None:
    """Train a dual-encoder tower contrastively; prints the spec that loads it, with its dev figures.

    Multi-GPU: `accelerate launch -m mmrag.cli train ...` runs the same command on every device.
    """
    import torch

    from .encoders.trainer import TrainConfig, train_towers
    from .sources import captioned_pairs

    def pairs(path: Path, split: str | None, name: str) -> list[tuple[Path, list[str]]]:
        found = captioned_pairs(path, split=split or None)
        if not found:
            raise typer.BadParameter(f"{path} has no captioned images" + (f" in split {split!r}" if split else ""),
                                     param_hint=name)
        return found

    for value, allowed, hint in ((style, ("align", "openclip"), "--style"), (loss, ("clip", "align", "siglip"), "--loss"),
                                 (augment, ("none", "flip", "flip-gray", "crop"), "--augment"), (precision, ("no", "bf16", "fp16"), "--precision"),
                                 (keep, ("best", "last"), "--keep")):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=hint)
    train_pairs = pairs(source, train_split, "SOURCE / --train-split")
    dev_pairs = pairs(dev or source, dev_split, "--dev / --dev-split")
    config = TrainConfig(loss=loss, label_smoothing=label_smoothing, image_unlocked=image_unlocked,  # type: ignore[arg-type]
                         text_unlocked=text_unlocked, augment=augment, epochs=epochs, batch_size=batch_size, lr=lr,  # type: ignore[arg-type]
                         backbone_lr=backbone_lr, warmup_steps=warmup_steps, precision=precision, grad_accumulation=grad_accumulation, keep=keep, seed=seed)  # type: ignore[arg-type]
    torch.manual_seed(seed)  # fresh heads / from-scratch weights start the same for the same seed
    towers = _towers(style, image_backbone, text_backbone, model, model_config)
    data = {"source": str(source), "train_split": train_split, "dev": str(dev or source), "dev_split": dev_split,
            "train_images": len(train_pairs), "dev_images": len(dev_pairs)}
    result = train_towers(towers, train_pairs, dev_pairs, out, config, cache, resume=resume, data=data)
    _echo_json({"spec": result.spec, "best_epoch": result.best_epoch, "dev_recall": result.dev_recall,
                "seconds": round(result.seconds), "curves": str(out / "curves.png")})


def _towers(style: str, image_backbone: str, text_backbone: str, model: str, model_config: Optional[Path]):
    """The towers `mmrag train` starts from."""
    from .encoders.towers import AlignTowers, OpenClipTowers

    if style == "align":
        return AlignTowers(image_backbone, text_backbone)
    if model_config is not None:
        import open_clip

        open_clip.add_model_config(model_config)
    return OpenClipTowers(model if model.startswith("openclip:") else f"openclip:{model}")


@app.command()
def tag(
    index: str = IndexOption,
    labels: Optional[str] = typer.Option(None, "--labels", help='Comma-separated labels, e.g. "dog,beach,car".'),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", exists=True, dir_okay=False, help="Labels, one a line."),
    templates: Optional[Path] = typer.Option(None, "--templates", exists=True, dir_okay=False,
                                             help="Prompt templates, one a line with {} for the label."),
    threshold: Optional[float] = typer.Option(None, help="Calibrated score a label needs to become a tag "
                                              "(default 2: two standard deviations above the photo's background)."),
    top: Optional[int] = typer.Option(None, min=0, help="Most tags per photo (default 5; 0: no cap)."),
    as_json: bool = JsonOption,
) -> None:
    """Zero-shot tag every photo of an index: `tags` and `tag_scores` in its payload (docs/tagging.md)."""
    from .index import Index
    from .store import open_store
    from .tagging import DEFAULT_THRESHOLD, DEFAULT_TOP, parse_labels, read_labels
    from .zeroshot import read_templates

    if (labels is None) == (labels_file is None):
        raise typer.BadParameter("give either --labels or --labels-file", param_hint="--labels")
    try:
        names = parse_labels(labels) if labels is not None else read_labels(labels_file)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--labels / --labels-file") from None
    try:
        prompts = read_templates(templates) if templates is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--templates") from None
    with open_store(index) as store:
        if store.manifest is None:
            raise typer.BadParameter(f"no mmrag index at {index}; build one with mmrag index", param_hint="--index")
    with Index.open(index) as idx:
        report = idx.tag(names, prompts, DEFAULT_THRESHOLD if threshold is None else threshold,
                         DEFAULT_TOP if top is None else (top or None), progress=not as_json)
    if as_json:
        _echo_json(asdict(report))
    else:
        typer.echo(str(report))


@app.command()
def score(
    manifest: Path = typer.Argument(..., exists=True, dir_okay=False, help="A captions.jsonl manifest."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write one score per (image, caption) pair: .jsonl or .csv."),
    split: Optional[str] = typer.Option(None, help="Only this split of the manifest (e.g. dev)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="Encoder spec (default: the default tower)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep pairs scoring at least this cosine (encoder-specific)."),
    keep_top: Optional[str] = typer.Option(None, "--keep-top", help="Keep the best N pairs (4000) or the best share of pairs (80%)."),
    filtered: Optional[Path] = typer.Option(None, "--filtered", help="Write the kept pairs as a manifest (image paths relative to it)."),
    near_dup: float = typer.Option(0.95, "--near-dup", help="Image-embedding cosine from which two photos are near duplicates."),
    batch_size: int = typer.Option(32, min=1),
    as_json: bool = JsonOption,
) -> None:
    """Score each (image, caption) pair of a manifest, filter the pairs, and find duplicate photos (docs/curation.md)."""
    from .curation import (
        check_scores_path,
        duplicate_groups,
        filtered_entries,
        near_duplicate_vectors,
        parse_keep_top,
        score_pairs,
        select_pairs,
        write_manifest,
        write_scores,
    )
    from .encoders import load_encoder

    try:
        if out is not None:
            check_scores_path(out)
        keep_count, keep_fraction = parse_keep_top(keep_top) if keep_top is not None else (None, None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out / --keep-top") from None
    filtering = min_score is not None or keep_top is not None
    if filtered is not None and not filtering:
        raise typer.BadParameter("--filtered needs --min-score or --keep-top", param_hint="--filtered")
    if not -1 <= near_dup <= 1:
        raise typer.BadParameter(f"a cosine, between -1 and 1; got {near_dup}", param_hint="--near-dup")
    tower = load_encoder(encoder)
    try:
        scored = score_pairs(tower, manifest, split=split, batch_size=batch_size, progress=not as_json)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MANIFEST") from None
    result: dict = {"manifest": str(manifest), "split": split, "encoder": tower.spec,
                    "images": len(scored.entries), "pairs": len(scored.pairs)}
    if out is not None:
        write_scores(scored.pairs, out)
        result["scores"] = str(out)
    if filtering:
        kept = select_pairs(scored.pairs, min_score=min_score, keep_count=keep_count, keep_fraction=keep_fraction)
        result.update(kept=len(kept), dropped=len(scored.pairs) - len(kept))
        if filtered is not None:
            entries = filtered_entries(scored.entries, kept)
            write_manifest(entries, filtered)
            result.update(filtered=str(filtered), filtered_images=len(entries))
    paths = [e.image for e in scored.entries]
    near = near_duplicate_vectors(tower, paths, batch_size=batch_size, progress=not as_json)
    duplicates = duplicate_groups(paths, near, near_dup)
    result.update(exact_duplicates=duplicates.exact, near_duplicates=duplicates.near, near_dup=near_dup)
    if as_json:
        _echo_json(result)
        return
    lines = [f"scored {result['pairs']} pairs of {result['images']} images with {tower.spec}"]
    if out is not None:
        lines.append(f"scores: {out}")
    if filtering:
        lines.append(f"dropped {result['dropped']} of {result['pairs']} pairs, kept {result['kept']}")
    if filtered is not None:
        lines.append(f"filtered manifest: {filtered} ({result['filtered_images']} images, "
                     f"{result['images'] - result['filtered_images']} left without a caption dropped)")
    lines.append(f"exact duplicates (same bytes): {len(duplicates.exact)} groups")
    lines += ["  " + " = ".join(group) for group in duplicates.exact]
    lines.append(f"near duplicates (cosine >= {near_dup}): {len(duplicates.near)} groups")
    lines += ["  " + " ~ ".join(group) for group in duplicates.near]
    typer.echo("\n".join(lines))


@app.command()
def info(index: str = IndexOption, as_json: bool = JsonOption) -> None:
    """What an index holds and which encoder built it."""
    from .store import open_store

    with open_store(index) as store:
        if store.manifest is None:
            raise typer.BadParameter(f"no mmrag index at {index}", param_hint="--index")
        data = {"location": index, **store.manifest.to_dict(), "count": store.count()}
    if as_json:
        _echo_json(data)
    else:
        typer.echo("\n".join(f"{key:>14}: {value}" for key, value in data.items()))


@app.command()
def serve(
    index: str = IndexOption,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default is reachable from this machine only."),
    port: int = typer.Option(8000, min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MMRAG_API_KEY",
                                          help="Key that writes (add, delete) need in an X-API-Key header; reads stay open."),
) -> None:
    """Serve an index: a JSON API and a search page for the browser (docs/serve.md; needs the serve extra)."""
    try:
        from .serve import ServeConfig, run
    except ImportError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    from .index import Index
    from .store import open_store

    with open_store(index) as store:
        if store.manifest is None:
            raise typer.BadParameter(f"no mmrag index at {index}; build one with mmrag index", param_hint="--index")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: anyone who reaches {host}:{port} can add and delete items; set --api-key", err=True)
    with Index.open(index) as idx:
        typer.echo(f"serving {index} ({idx.count()} items): page http://{host}:{port}/ , API schema /openapi.json", err=True)
        run(idx, host, port, ServeConfig(api_key=api_key))


if __name__ == "__main__":
    app()
