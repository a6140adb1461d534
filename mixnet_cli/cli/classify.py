"""``mixnet classify``: images, directories, globs, URLs and lists in; rows out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import click

from ..base.errors import MixnetError, UsageError
from .common import (
    CONTEXT_SETTINGS,
    check_output_path,
    checked_server,
    complete_model,
    custom_weights_options,
    device_and_engine,
    device_option,
    engine_option,
    precision_option,
    interrupt_ends_at_once,
    model_names_help,
    network_options,
    open_output,
    output_options,
    progress_bar,
    show_messages,
    threads_option,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, metavar="[IMAGE|DIR|GLOB|URL|-]...", type=click.Path())
@click.option("-m", "--model", default=None, shell_complete=complete_model,
              help=f"Model: {model_names_help()} (default MixNet_S; with --weights, read from the file).")
@custom_weights_options
@click.option("-k", "--topk", default=None, type=click.IntRange(1), metavar="N",
              help="How many labels per image (default 5, or every class of a model with fewer).")
@output_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True), help="Write results to this file instead of stdout.")
@click.option("--embed", is_flag=True,
              help="Also give each image's pooled features (1536 floats, what the classifier reads) in the JSON "
              "objects, for retrieval and clustering (--json or --jsonl).")
@click.option("--embed-npy", type=click.Path(dir_okay=False, writable=True, path_type=Path), metavar="FILE.npy",
              help="Write every image's features to FILE.npy: float32, one row per input in order, NaN rows for "
              "inputs that failed.")
@click.option(
    "--files-from",
    metavar="FILE",
    help="Also classify the paths or URLs listed in FILE, one per line ('-' reads the list from stdin).",
)
@click.option(
    "--recursive/--no-recursive",
    default=True,
    show_default=True,
    help="Look for images in sub-directories of a directory argument.",
)
@device_option
@engine_option
@precision_option
# 4: the fastest batch for OpenVINO on the CPU, and the one that keeps decoding and inference overlapped on 2 cores
# (BENCHMARKS.md); smaller last batches run padded on the same model.
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@threads_option
@network_options
@click.option("--server", metavar="URL", callback=checked_server,
              help="Classify through a running `mixnet serve` at URL (http://127.0.0.1:8080) instead of loading the "
              "model here; the output is the same (the service's own --device, --engine and weights apply).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but the results (no progress, no per-image errors on stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which model, weights, device and engine ran.")
@user_errors
def classify(
    images: tuple[str, ...],
    model: str | None,
    weights: Path | None,
    labels: Path | None,
    topk: int | None,
    fmt: str,
    output: str | None,
    embed: bool,
    embed_npy: Path | None,
    files_from: str | None,
    recursive: bool,
    device: str | None,
    engine: str | None,
    precision: str,
    batch_size: int,
    threads: int | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
    server: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Print the top-k ImageNet labels of each image.

    Images can be files (JPEG, PNG, WebP, BMP, GIF, TIFF...), directories (their image files, sorted),
    glob patterns, http(s) URLs, or - for one image on stdin.

    \b
      mixnet classify cat.jpg
      mixnet classify cat.jpg dog.png --model L --json
      mixnet classify photos/ --jsonl | jq -r '.predictions[0].label'
      find . -name '*.jpg' | mixnet classify --files-from - --csv
      mixnet classify cat.jpg --server http://127.0.0.1:8080 --json

    A failed image gets an error in its place (in JSON, an "error" object), the others are still classified,
    and the exit code is 1.
    """
    from ..classifier import ClassificationResult, Classifier
    from ..images.inputs import expand_inputs, read_list_file
    from ..base.manifest import resolve_model
    from ..output import write_classifications

    if files_from == "-" and "-" in images:
        raise UsageError("stdin can carry either the list of files (--files-from -) or one image (-), not both")
    arguments = list(images) + (read_list_file(files_from) if files_from else [])
    if not arguments and not files_from:
        raise UsageError("no images given: name image files, directories, globs or URLs (or use --files-from)")
    if model is not None:
        resolve_model(model)  # a bad name is a usage error before anything slow happens
    if labels is not None and not labels.expanduser().is_file():
        raise UsageError(f"--labels {labels}: no such file")
    if weights is not None and not weights.expanduser().is_file():
        raise UsageError(f"--weights {weights}: no such file")
    if server is not None and (weights or labels or embed or embed_npy):
        raise UsageError("--server classifies with the service's own models (to use your own weights there, start "
                         "it with `mixnet serve --weights FILE --labels FILE`): --weights, --labels, --embed and "
                         "--embed-npy work only without --server")
    if server is not None and precision.lower() != "fp32":
        raise UsageError("--server classifies in the service's own precision (start it with `mixnet serve "
                         "--precision bf16`): leave out --precision with --server")
    if embed and fmt not in ("json", "jsonl"):
        raise UsageError("--embed puts the features in the JSON objects: add --json or --jsonl, or use --embed-npy FILE")
    device_name, engine_name = device_and_engine(device, engine)
    check_output_path(output)
    if embed_npy is not None:
        check_output_path(str(embed_npy))
    items = expand_inputs(arguments, recursive=recursive)
    if not items:  # an empty --files-from list (`find` matched nothing): an empty result, not an error
        with open_output(output) as stream:
            write_classifications(iter(()), fmt, stream)
        return
    click.get_current_context().with_resource(interrupt_ends_at_once())
    # --quiet: not even the one-time notices (download progress, "converting ... (once)"); errors still raise.
    show_messages(quiet)
    if all(item.problem is not None for item in items):
        # Nothing here can be classified (missing files, empty directories, globs matching nothing): say so now,
        # not after a download and a conversion, and not a network error in its place when offline.
        spec = resolve_model(model or "MixNet_S")
        known = [ClassificationResult(input=item.name, model=spec.name, error=item.problem) for item in items]
        with open_output(output) as stream:
            write_classifications((result.to_dict() for result in known), fmt, stream)
        if not quiet:
            for result in known:
                click.echo(f"Error: {result.error}", err=True)
            click.echo(f"Error: none of the {len(items)} input(s) can be classified; the model was not loaded",
                       err=True)
        sys.exit(1)
    results: Iterator[tuple[dict[str, Any], Any]]  # each input's object and its features (None: not asked for)
    if server is not None:
        from ..service.remote import classify_remote

        if verbose and not quiet:
            click.echo(f"model {model or 'MixNet_S'}, through the service at {server}, {len(items)} image(s)",
                       err=True)
        results = ((row, None) for row in classify_remote(server, items, model=model or "MixNet_S", topk=topk,
                                                          batch_size=batch_size))
    else:
        classifier = Classifier(model, device=device_name, engine=engine_name, mirrors=mirrors or None,
                                offline=offline, progress=None if not quiet else False, threads=threads,
                                weights=weights, labels=labels, features=embed or embed_npy is not None,
                                precision=precision.lower())
        results = ((result.to_dict(), result.features)
                   for result in classifier.classify_many(items, topk=topk, batch_size=batch_size))
    if verbose and not quiet and server is None:
        weights = classifier.weights
        engine = classifier.engine_for(len(items), batch_size)
        click.echo(
            f"model {classifier.model_name}, weights {weights.path} (sha256 {weights.record.sha256[:12]}), "
            f"device {classifier.device_choice.device} ({classifier.device_choice.reason}), "
            f"engine {engine.name} ({engine.detail}; {classifier.engine_choice.engine_reason}), "
            f"{len(items)} image(s)",
            err=True,
        )
    failures = 0
    features: list[Any] = []

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failures
        # A bar would interleave with results printed to the same terminal: only when they go elsewhere.
        with progress_bar(len(items), enabled=not quiet and (output not in (None, "-") or not sys.stdout.isatty())) as bar:
            for row, row_features in results:
                bar.update(1)
                if "error" in row:
                    failures += 1
                    if not quiet:
                        bar.write(f"Error: {row['error']['message']}", file=sys.stderr)
                if embed_npy is not None:
                    features.append(row_features)
                if not embed:
                    row.pop("features", None)
                yield row

    with open_output(output) as stream:
        write_classifications(rows(), fmt, stream)
    if embed_npy is not None:
        _write_features(embed_npy, features)
    if failures:
        if not quiet and len(items) > 1:
            click.echo(f"Error: {failures} of {len(items)} image(s) failed", err=True)
        sys.exit(1)


def _write_features(path: Path, rows: list[Any]) -> None:
    """The features as one float32 ``inputs x width`` .npy file, NaN rows for inputs that failed (so row i is
    always input i), written atomically."""
    import io

    import numpy as np

    from ..base.files import write_bytes

    width = next((len(row) for row in rows if row is not None), 0)
    table = np.full((len(rows), width), np.nan, dtype=np.float32)
    for index, row in enumerate(rows):
        if row is not None:
            table[index] = row
    buffer = io.BytesIO()
    np.save(buffer, table)
    try:
        write_bytes(path.expanduser(), buffer.getvalue())
    except OSError as exc:
        raise MixnetError(f"--embed-npy {path}: cannot write ({exc.strerror or exc}); choose another path") from None


