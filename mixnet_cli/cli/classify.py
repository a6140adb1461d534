"""``mixnet classify``: images, directories, globs, URLs and lists in; rows out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from ..base.errors import MixnetError, UsageError
from ..base.settings import load_token
from .common import (
    CONTEXT_SETTINGS,
    check_output_path,
    checked_server,
    complete_models,
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
    specs_for,
    threads_option,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, metavar="[IMAGE|DIR|GLOB|URL|-]...", type=click.Path())
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL", shell_complete=complete_models,
              help=f"Model: {model_names_help()}, or all; repeat for several: each image gets one result per model, "
              "model by model (default MixNet_S; with --weights, the one architecture of that file, read from it).")
@custom_weights_options
@click.option("-k", "--topk", default=None, type=click.IntRange(1), metavar="N",
              help="How many labels per image (default 5, or every class of a model with fewer; more than the model's "
              "classes gives them all, with a notice).")
@output_options(output_file=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
              help="Write results to this file instead of stdout, in the format its extension names (.json, .jsonl, "
              ".csv) unless a format flag says otherwise.")
@click.option("--embed", is_flag=True,
              help="Also give each image's pooled features (1536 floats, what the classifier reads) in the JSON "
              "objects, for retrieval and clustering (--json or --jsonl).")
@click.option("--embed-npy", type=click.Path(dir_okay=False, writable=True, path_type=Path), metavar="FILE.npy",
              help="Write every image's features to FILE.npy: float32, one row per input in order, NaN rows for "
              "inputs that failed.")
@click.option("--cam", "cam_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Also draw where the network looked: DIR/<name>.cam.png per image, the photo with the top-1 "
              "class's activation map over the part the network saw (the rest dimmed); the JSON names each file.")
@click.option("--cam-class", type=click.IntRange(0), metavar="ID",
              help="Draw the map of class ID instead of each image's top-1 class (with --cam).")
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
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --server: the service's token, the file's first line (default: MIXNET_SERVE_TOKEN).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but the results (no progress, no per-image errors on stderr).")
@click.option("-v", "--verbose", is_flag=True,
              help="Say on stderr which model, weights (and whether they were downloaded now, resumed or found in "
              "the cache), device and engine ran.")
@user_errors
def classify(
    images: tuple[str, ...],
    models: tuple[str, ...],
    weights: Path | None,
    labels: Path | None,
    topk: int | None,
    fmt: str,
    output: str | None,
    embed: bool,
    embed_npy: Path | None,
    cam_dir: Path | None,
    cam_class: int | None,
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
    token_file: Path | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Print the top-k ImageNet labels of each image.

    Images can be files (JPEG, PNG, WebP, BMP, GIF, TIFF...), directories (their image files, sorted),
    glob patterns, http(s) URLs, or - for one image on stdin.

    \b
      mixnet classify cat.jpg
      mixnet classify cat.jpg dog.png --model L --json
      mixnet classify photos/ -m S -m L --csv
      mixnet classify photos/ --jsonl | jq -r '.predictions[0].label'
      find . -name '*.jpg' | mixnet classify --files-from - --csv
      mixnet classify cat.jpg --server http://127.0.0.1:8080 --json
      mixnet classify photos/ --cam cams/ --cam-class 281 --json

    A failed image gets an error in its place (in JSON, an "error" object), the others are still classified,
    and the exit code is 1.
    """
    # Only what --server needs here: the local route's modules (numpy, OpenCV, the engines) load below.
    from ..images.inputs import expand_inputs, read_list_file
    from ..results import ClassificationResult
    from ..base.manifest import resolve_model
    from ..output import write_classifications

    if files_from == "-" and "-" in images:
        raise UsageError("stdin can carry either the list of files (--files-from -) or one image (-), not both")
    arguments = list(images) + (read_list_file(files_from) if files_from else [])
    if not arguments and not files_from:
        raise UsageError("no images given: name image files, directories, globs or URLs (or use --files-from)")
    # Every model named, each once, in order (a bad name is a usage error before anything slow happens); None:
    # the default, MixNet_S, or with --weights the architecture read from the file.
    model_names: list[str | None] = [spec.name for spec in specs_for(models)] if models else [None]
    if weights is not None and len(model_names) > 1:
        raise UsageError(f"--weights {weights} is one model: give at most one --model (its architecture, "
                         "read from the file when none is given)")
    if embed_npy is not None and len(model_names) > 1:
        raise UsageError("--embed-npy writes one row per image, so it takes one model: give one --model, or use "
                         "--embed with --jsonl (each object names its model)")
    if labels is not None and not labels.expanduser().is_file():
        raise UsageError(f"--labels {labels}: no such file")
    if weights is not None and not weights.expanduser().is_file():
        raise UsageError(f"--weights {weights}: no such file")
    if server is not None and (weights or labels or embed or embed_npy):
        raise UsageError("--server classifies with the service's own models (to use your own weights there, start "
                         "it with `mixnet serve --weights FILE --labels FILE`): --weights, --labels, --embed and "
                         "--embed-npy work only without --server")
    if cam_dir is not None and len(model_names) > 1:
        raise UsageError("--cam writes one picture per image, so it takes one model: give one --model")
    if cam_class is not None and cam_dir is None:
        raise UsageError("--cam-class chooses the class of the maps --cam draws: add --cam DIR")
    if server is not None and cam_dir is not None:
        raise UsageError("--cam draws here, from this machine's model: leave out --server (the service gives the "
                         "maps with ?cam=1)")
    if token_file is not None and server is None:
        raise UsageError("--token-file is the token of a service: use it with --server URL")
    if server is not None and precision.lower() != "fp32":
        raise UsageError("--server classifies in the service's own precision (start it with `mixnet serve "
                         "--precision bf16`): leave out --precision with --server")
    if embed and fmt not in ("json", "jsonl"):
        raise UsageError("--embed puts the features in the JSON objects: add --json or --jsonl, or use --embed-npy FILE")
    device_name = engine_name = "auto"
    if server is None or device or engine:
        # With --server the service's own device and engine run: names given are still checked, but the
        # environment's defaults are not read (nor the engines' table, which imports numpy).
        device_name, engine_name = device_and_engine(device, engine)
    check_output_path(output)
    if embed_npy is not None:
        check_output_path(str(embed_npy), "--embed-npy")
    if cam_dir is not None:
        from ..base.files import check_output_directory

        check_output_directory(cam_dir, "--cam", "the pictures")  # as -o: before the weights load
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
        known = [ClassificationResult(input=item.name, model=spec.name, error=item.problem, architecture=spec.name)
                 for spec in (resolve_model(model or "MixNet_S") for model in model_names) for item in items]
        with open_output(output) as stream:
            write_classifications((result.to_dict() for result in known), fmt, stream)
        if not quiet:
            for result in known[:len(items)]:  # the same for every model: once
                click.echo(f"Error: {result.error}", err=True)
            click.echo(f"Error: none of the {len(items)} input(s) can be classified; the model was not loaded",
                       err=True)
        sys.exit(1)

    def load(model: str | None) -> Any:
        from ..classifier import BULK_AFTER_IMAGES, Classifier

        # A bulk job (the maps have an engine of their own): its engine mode is the one loaded first.
        bulk = len(items) > BULK_AFTER_IMAGES and cam_dir is None
        return Classifier(model, device=device_name, engine=engine_name, mirrors=mirrors or None, offline=offline,
                          progress=None if not quiet else False, threads=threads, weights=weights, labels=labels,
                          features=embed or embed_npy is not None, cam=cam_dir is not None,
                          precision=precision.lower(), bulk_batch_size=batch_size if bulk else None)

    # Each input's object and its features (None: not asked for), model after model: one model is loaded at a
    # time, and its results stream out as they come. The first is loaded now, so that what stops a run (an
    # engine missing, weights that cannot be fetched) stops it before any output.
    if server is None and weights is None and len(model_names) > 1:
        # The other models' weights too, before any output: a run that cannot finish stops now, not half-way.
        from ..weights.store import ensure_weights

        for later in model_names[1:]:
            ensure_weights(resolve_model(later or "MixNet_S"), mirrors=mirrors or None, offline=offline,
                           progress=None if not quiet else False)
    results = _results_of_each_model(model_names, items, server=server, topk=topk, batch_size=batch_size,
                                     verbose=verbose and not quiet, load=load, cam_dir=cam_dir,
                                     cam_class=cam_class, token=load_token(token_file) if server else None,
                                     loaded=[load(model_names[0])] if server is None else [])
    failures = 0
    features: list[Any] = []
    told: set[str] = set()  # an image's error is the same for every model: said once

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failures
        # A bar would interleave with results printed to the same terminal: only when they go elsewhere.
        with progress_bar(len(items) * len(model_names), enabled=not quiet and (output not in (None, "-") or not sys.stdout.isatty())) as bar:
            for row, row_features in results:
                bar.update(1)
                if "error" in row:
                    failures += 1
                    if not quiet and row["error"]["message"] not in told:
                        told.add(row["error"]["message"])
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
        total = len(items) * len(model_names)
        if not quiet and total > 1:
            what = ("image(s)" if len(model_names) == 1
                    else f"results ({len(items)} image(s), {len(model_names)} models)")
            click.echo(f"Error: {failures} of {total} {what} failed", err=True)
        sys.exit(1)


# What -v says of where the weights came from (VerifiedWeights.how).
_WEIGHTS_HOW = {"cached": "found in the cache", "downloaded": "downloaded now",
                "downloaded (resumed)": "downloaded now, resuming an earlier partial download",
                "downloaded by another mixnet process": "downloaded by another mixnet process",
                "yours": "your file, used where it is"}


def _results_of_each_model(model_names: list[str | None], items: list[Any], *, server: str | None, topk: int | None,
                           batch_size: int, verbose: bool, load: Callable[[str | None], Any],
                           loaded: list[Any], cam_dir: Path | None = None, cam_class: int | None = None,
                           token: str | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """Every input's object and features for each model in turn, through the service at ``server`` or a
    :class:`~mixnet_cli.classifier.Classifier`: ``loaded`` holds the first model's, already made, ``load`` makes
    the others (one at a time: the next is loaded when the previous one's results are out). ``cam_dir``:
    each image's activation map picture is written there (:func:`_draw_maps`)."""
    for model in model_names:
        if server is not None:
            from ..service.remote import classify_remote

            if verbose:
                click.echo(f"model {model or 'MixNet_S'}, through the service at {server}, {len(items)} image(s)",
                           err=True)
            yield from ((row, None) for row in classify_remote(server, items, model=model or "MixNet_S", topk=topk,
                                                               batch_size=batch_size, token=token))
            continue
        classifier = loaded.pop() if loaded else load(model)
        if verbose:
            weights = classifier.weights
            engine = classifier.engine_for(len(items), batch_size, cam=cam_dir is not None)
            click.echo(
                f"model {classifier.model_name}"
                + (f" ({classifier.architecture})" if classifier.architecture != classifier.model_name else "")
                + f", weights {weights.path} ({_WEIGHTS_HOW.get(weights.how, weights.how)}, "
                f"sha256 {weights.record.sha256[:12]}), "
                f"device {classifier.device_choice.device} ({classifier.device_choice.reason}), "
                f"engine {engine.name} ({engine.detail}; {classifier.engine_choice.engine_reason}), "
                f"{len(items)} image(s)",
                err=True,
            )
        classified = classifier.classify_many(items, topk=topk, batch_size=batch_size, cam=cam_dir is not None,
                                              cam_class=cam_class)
        if cam_dir is not None:
            classified = _draw_maps(classified, items, cam_dir)
        yield from ((result.to_dict(), result.features) for result in classified)
        del classifier  # its engine's memory goes before the next model loads


def _draw_maps(results: Iterator[Any], items: list[Any], directory: Path) -> Iterator[Any]:
    """Write each classified image's activation map picture as its result arrives (a failed image gets none), and
    name the file in the result's ``cam`` object; ``directory`` is made with the first picture."""
    from dataclasses import replace

    from ..base.files import write_bytes
    from ..images.heatmap import overlay_paths, png_bytes

    paths = overlay_paths([item.name for item in items], directory)
    made = False
    for result, path in zip(results, paths):
        if result.ok:
            if not made:  # with the first picture: a run stopped before any (a bad --cam-class) leaves no folder
                try:
                    directory.expanduser().mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise MixnetError(f"--cam {directory}: cannot create the directory ({exc.strerror or exc}); "
                                      "choose another one") from None
                made = True
            try:
                write_bytes(path.expanduser(), png_bytes(result.cam_overlay()))
            except OSError as exc:
                raise MixnetError(f"--cam {directory}: cannot write {path.name} ({exc.strerror or exc}); choose "
                                  "another directory") from None
            result = replace(result, cam_file=str(path))
        yield result


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


