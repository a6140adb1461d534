"""``mixnet classify-dataset``: a dataset on a Ray cluster (:mod:`mixnet_cli.distributed`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..base.errors import UsageError
from .common import (
    CONTEXT_SETTINGS,
    complete_model,
    custom_weights_options,
    device_and_engine,
    device_option,
    engine_option,
    model_names_help,
    network_options,
    show_messages,
    user_errors,
)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@click.command("classify-dataset", context_settings=CONTEXT_SETTINGS)
@click.argument("sources", nargs=-1, metavar="[SRC]...")
@click.option("-o", "--output", "out", required=True, metavar="DIR",
              help="Directory for the results, one Parquet dataset (local, or any URI pyarrow writes: s3://, gs://, "
              "hdfs://); created if absent; must be empty unless --resume; one job at a time.")
@click.option("-m", "--model", default=None, shell_complete=complete_model,
              help=f"Model: {model_names_help()} (default MixNet_S; with --weights, read from the file).")
@custom_weights_options
@click.option("-k", "--topk", default=5, show_default=True, type=click.IntRange(1, 1000), help="How many labels per image.")
@click.option("--files-from", metavar="FILE",
              help="Also classify the files or URIs listed in FILE, read as the job goes: a text file with one path "
              "or URI a line ('-' reads stdin), or a Parquet or CSV file with a column of them (--files-from-column).")
@click.option("--files-from-column", metavar="NAME",
              help="The column of a Parquet or CSV --files-from that holds the paths (default: path).")
@click.option("--resume", is_flag=True, help="Skip the inputs already in DIR (after a killed or failed run) and add the rest.")
@click.option("--retry-failed", is_flag=True,
              help="With --resume: classify again the inputs whose rows are errors, replacing those rows.")
@click.option("--fail-fast", default=50, show_default=True, type=click.IntRange(0), metavar="N",
              help="Stop when the first N inputs all fail with the same error (missing credentials, a wrong path); "
              "0 never stops.")
@click.option("--jsonl", is_flag=True,
              help="Also write each part as JSON lines, in DIR/_jsonl/ (the objects `mixnet classify --jsonl` prints).")
@click.option("--address", metavar="auto|HOST:PORT|ray://...",
              help="The Ray cluster to run on (default: RAY_ADDRESS, else a cluster of this machine alone, on 127.0.0.1, "
              "for this run).")
@click.option("--actors", type=click.IntRange(1),
              help="Most actors (model copies) at once (default: one per node; on GPUs one per --gpus-per-actor share).")
@click.option("--cpus-per-actor", type=click.FloatRange(0, min_open=True),
              help="CPUs each actor asks Ray for, fractions allowed; its engine runs that many threads, rounded up "
              "(default: the cluster's CPUs less 0.5 per node, shared between the actors).")
@click.option("--gpus-per-actor", type=click.FloatRange(0, min_open=True),
              help="GPUs each actor asks Ray for with --device gpu, fractions allowed (0.5: two actors share a GPU; "
              "default 1).")
@click.option("--images-per-task", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Images per actor call (Ray's batch): what a killed actor redoes.")
@click.option("--rows-per-file", default=10_000, show_default=True, type=click.IntRange(1),
              help="Rows per output part: at most what a killed job redoes after --resume (a part is also written "
              "every minute).")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Look for images in sub-directories of a directory argument.")
@device_option
@engine_option
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@network_options
@click.option("--progress-every", default=10.0, show_default=True, type=click.FloatRange(0.1), metavar="SECONDS",
              help="Seconds between progress lines on stderr (rows done, rows/s, failures, time left once known).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no per-image error lines on stderr; the summary stays.")
@user_errors
def classify_dataset(
    sources: tuple[str, ...],
    out: str,
    model: str | None,
    weights: Path | None,
    labels: Path | None,
    topk: int,
    files_from: str | None,
    files_from_column: str | None,
    resume: bool,
    retry_failed: bool,
    fail_fast: int,
    jsonl: bool,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float | None,
    gpus_per_actor: float | None,
    images_per_task: int,
    rows_per_file: int,
    recursive: bool,
    device: str | None,
    engine: str | None,
    batch_size: int,
    mirrors: tuple[str, ...],
    offline: bool | None,
    progress_every: float,
    quiet: bool,
) -> None:
    """Classify a dataset on a Ray cluster into one Parquet dataset ([ray] extra), resumably.

    SRC: image files, directories, globs (as `mixnet classify` takes them, with the same extension filter) or
    URIs pyarrow reads (s3://bucket/photos/, gs://..., hdfs://...); --files-from adds a list of files. Inputs are
    listed as the job goes, never all at once. Each row is the object `mixnet classify --jsonl` prints (input,
    model, predictions or error) plus `key`, the input's absolute path or normalised URI that --resume matches on.

    \b
      mixnet classify-dataset photos/ -o results/ --model L
      mixnet classify-dataset s3://bucket/photos/ -o s3://bucket/results/ \\
          --address auto --actors 8
      mixnet classify-dataset --files-from manifest.parquet \\
          --files-from-column uri -o results/ --device gpu
      # after a killed run: the rest, each once
      mixnet classify-dataset photos/ -o results/ --resume

    A missing or unreadable image is a row with an error; the summary on stderr counts them and the exit code
    is 1. Without --address (or RAY_ADDRESS) Ray runs on this machine alone: for one machine, `mixnet classify`
    is faster.
    """
    from ..base.manifest import resolve_model
    from ..distributed import JobProgress, run_job

    if model is not None:
        resolve_model(model)
    if not sources and not files_from:
        raise UsageError("no inputs: name files, directories, globs or URIs, or a list of them with --files-from")
    device_name, engine_name = device_and_engine(device, engine)
    show_messages(quiet)

    def on_error(row: dict[str, Any]) -> None:
        if not quiet:
            click.echo(f"Error: {row['error']['message']}", err=True)

    def on_progress(progress: JobProgress) -> None:
        if quiet:
            return
        eta = f", about {_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
        click.echo(f"progress: {progress.done} row(s) done, {progress.rows_per_s:.1f} rows/s, {progress.failed} "
                   f"failed{eta}", err=True)

    summary = run_job(
        list(sources), out, model, resume=resume, retry_failed=retry_failed, jsonl=jsonl, address=address,
        rows_per_file=rows_per_file, files_from=files_from, files_from_column=files_from_column, fail_fast=fail_fast,
        on_error=on_error, on_progress=on_progress, progress_every_s=progress_every, topk=topk, batch_size=batch_size, device=device_name,
        engine=engine_name, mirrors=list(mirrors) or None, offline=offline, actors=actors,
        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, images_per_task=images_per_task,
        recursive=recursive, weights=str(weights) if weights else None, labels=str(labels) if labels else None,
    )
    already = f"; {summary.skipped} already in {out}" if summary.skipped else ""
    click.echo(f"{summary.images} image(s) classified in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s "
               f"over the whole job, of which {summary.startup_seconds:.1f} s start-up), {summary.failed} failed"
               f"{already}", err=True)
    if summary.total_failed:
        before = f" ({summary.failed_before} in earlier runs)" if summary.failed_before else ""
        click.echo(f"Error: {summary.total_failed} image(s) failed{before}; their rows in {out} say why", err=True)
        sys.exit(1)
