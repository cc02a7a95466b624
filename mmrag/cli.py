"""`mmrag` command line: thin wrappers over the library (Index, evaluate_manifest, training).

Each command imports what it needs when it runs, so `mmrag --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Index photos and texts into a Qdrant store with a dual-encoder tower, then search them.",
                  no_args_is_help=True, add_completion=False)

IndexOption = typer.Option(..., "--index", "-i", help="Index folder (embedded Qdrant), http(s):// Qdrant URL, or :memory:.")
EncoderOption = typer.Option(None, "--encoder", "-e", help="Encoder spec; default: the one the index records, else the default tower.")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")


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
    as_json: bool = JsonOption,
) -> None:
    """Index a folder of photos (recursively), a captions.jsonl manifest, or one image."""
    from .index import Index

    if path is None:
        from .samples import export_sample_photos

        path = Path(index).with_name(Path(index).name + "-samples") if "://" not in index else Path("mmrag-samples")
        export_sample_photos(path)
        typer.echo(f"no folder given: indexing scikit-image's sample photos, written to {path}", err=True)
    elif not path.exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="PATH")
    with Index.open(index, encoder) as idx:
        report = idx.add(path, batch_size=batch_size, workers=workers, progress=not as_json,
                         allow_truncated=allow_truncated)
        total = idx.count()
    if as_json:
        _echo_json({**asdict(report), "count": total})
    else:
        typer.echo(f"{report}\nindex {index} now holds {total} items")


@app.command()
def search(
    query: Optional[str] = typer.Argument(None, help="Text query. Use --image for an image query."),
    index: str = IndexOption,
    k: int = typer.Option(10, "-k", min=1, help="Number of results."),
    image: Optional[Path] = typer.Option(None, "--image", help="Search by this image instead of text."),
    target: str = typer.Option("image", help="Compare with items' image vectors, text vectors, or both (fused)."),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="Also draw the results as one picture (PNG)."),
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
    with Index.open(index) as idx:
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
    tower = load_encoder(encoder)
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
    manifest: Path = typer.Argument(..., exists=True, dir_okay=False, help="captions.jsonl with train and dev splits."),
    out: Path = typer.Option(..., "--out", "-o", help="Heads file to write (.safetensors)."),
    train_split: str = typer.Option("train", help="Split to train on."),
    dev_split: str = typer.Option("dev", help="Split to select the best epoch on."),
    epochs: int = typer.Option(20, min=1),
    seed: int = typer.Option(0),
    cache: Path = typer.Option(Path(".cache/train-features"), help="Where frozen backbone features are cached."),
) -> None:
    """Train the default tower's heads on frozen backbones; prints the spec that loads them."""
    from .encoders.train import TrainConfig, train_heads
    from .sources import read_manifest

    def pairs(split: str) -> list[tuple[Path, list[str]]]:
        entries = [(e.image, e.captions) for e in read_manifest(manifest, split=split) if e.captions]
        if not entries:
            raise typer.BadParameter(f"{manifest} has no captioned images in split {split!r}")
        return entries

    train_pairs, dev_pairs = pairs(train_split), pairs(dev_split)
    data = {"manifest": manifest.name, "train_split": train_split, "dev_split": dev_split,
            "train_images": len(train_pairs), "dev_images": len(dev_pairs)}
    result = train_heads(train_pairs, dev_pairs, out, TrainConfig(epochs=epochs, seed=seed), cache, data=data)
    _echo_json({"spec": f"mmrag:lite0-minilm@{out.resolve()}", "best_epoch": result.best_epoch,
                "dev_recall": result.dev_recall, "seconds": round(result.seconds)})


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


if __name__ == "__main__":
    app()
