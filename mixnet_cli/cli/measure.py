"""Measuring: ``mixnet eval`` (accuracy on a labelled folder), ``benchmark`` (speed) and ``doctor`` (what is
installed and what runs here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from ..base.errors import MixnetError, UsageError
from .common import (
    CONTEXT_SETTINGS,
    complete_model,
    custom_weights_options,
    device_and_engine,
    device_option,
    engine_option,
    precision_option,
    interrupt_ends_at_once,
    model_names_help,
    network_options,
    output_options,
    show_messages,
    specs_for,
    threads_option,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--measure", is_flag=True,
              help="First time the installed CPU engines on MixNet S, M and L (batch 1 and 8, about 5 s per model) "
                   "and keep the figures in the cache: `auto` then picks by them on this machine, until the CPU "
                   "or the engines' versions change.")
@threads_option
@output_options
@user_errors
def doctor(measure: bool, threads: int | None, fmt: str) -> None:
    """Check this setup and print what a bug report needs.

    Versions, whether paddle has CUDA and which GPUs it sees, the device and engine `auto` picks and why (per
    model), the cache directory and whether it is writable, offline and mirror settings, and
    whether the weights URLs answer (skipped when offline). Exits 1 when a check fails.

    \b
      mixnet doctor
      mixnet doctor --measure
      mixnet doctor --json

    The table fits the terminal's width (80 columns when stdout is not a terminal); a hint is on a line of its own.
    """
    from ..doctor import run_checks
    from ..output import checks_table, write_rows

    if measure:
        from ..base import settings
        from ..engines.base import physical_cores
        from ..engines.speed import measure_engine_speeds, record_path

        count = threads or settings.cpu_threads() or physical_cores()
        click.echo(f"timing the installed CPU engines ({count} thread(s))...", err=True)
        try:
            record = measure_engine_speeds(("MixNet_S", "MixNet_M", "MixNet_L"), count)
        except OSError as exc:
            raise UsageError(f"cannot write {record_path()} ({exc}); set MIXNET_HOME to a writable directory") \
                from None
        for model, figures in record["models"].items():
            click.echo(f"{model}: " + ", ".join(f"{engine} {ms['1']:.1f} ms at batch 1, {ms['8']:.1f} ms at batch 8"
                                                 for engine, ms in figures.items()), err=True)
        click.echo(f"kept in {record_path()} ({record['seconds']} s)", err=True)

    failed = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failed
        for check in run_checks():
            failed += check.status == "fail"
            yield check.to_dict()

    stdout = click.get_text_stream("stdout")
    if fmt == "table":
        import shutil

        width = shutil.get_terminal_size((80, 24)).columns if stdout.isatty() else 80
        checks_table(rows(), stdout, width)
    else:
        write_rows(rows(), fmt, stdout, headers=["check", "value", "status", "hint"])
    if failed:
        sys.exit(1)


@click.command(name="eval", context_settings=CONTEXT_SETTINGS)
@click.argument("dataset", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A PaddleClas list file: '<image path> <class id>' per line.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Directory the list file's paths are relative to (default: DATASET, else the list's directory).")
@click.option("-m", "--model", default=None, shell_complete=complete_model,
              help=f"Model: {model_names_help()} (default MixNet_S; with --weights, read from the file).")
@custom_weights_options
@click.option("--limit", type=click.IntRange(1), help="Evaluate only N images, evenly spaced through the set.")
@output_options(json_help="The summary as one JSON object.",
                jsonl_help="One JSON line per misclassified image; summary on stderr.")
@device_option
@engine_option
@precision_option
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@threads_option
@network_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def evaluate_command(
    dataset: Path | None,
    list_file: Path | None,
    root: Path | None,
    model: str | None,
    weights: Path | None,
    labels: Path | None,
    limit: int | None,
    fmt: str,
    device: str | None,
    engine: str | None,
    precision: str,
    batch_size: int,
    threads: int | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
    quiet: bool,
) -> None:
    """Measure top-1 and top-5 accuracy on a labelled image set (e.g. ImageNet's validation set).

    \b
      # sub-folders named by synset: n01440764/ ...
      mixnet eval ILSVRC2012/val --model L
      mixnet eval --list val_list.txt --root ILSVRC2012/ --json
      mixnet eval ILSVRC2012/val --limit 1000 --jsonl > mistakes.jsonl

    PaddleClas publishes top-1 / top-5 on the 50,000 validation images: see `mixnet models`.
    """
    from ..classifier import Classifier
    from ..evaluate import evaluate, evenly_spaced, read_image_folder, read_labelled_list
    from ..images.labels import imagenet_synsets
    from ..base.manifest import resolve_model
    from ..output import write_rows

    if model is not None:
        resolve_model(model)
    if list_file is not None:
        samples = read_labelled_list(list_file, root or dataset)
    elif dataset is not None:
        if weights is not None:
            raise UsageError("with --weights, give the labelled images as a list file (--list FILE): folders named "
                             "by ImageNet synset id map to ImageNet's classes only")
        samples = read_image_folder(dataset, imagenet_synsets())
    else:
        raise UsageError("name an ImageFolder directory (sub-folders by synset id) or give --list FILE")
    samples = evenly_spaced(samples, limit)
    device_name, engine_name = device_and_engine(device, engine)
    click.get_current_context().with_resource(interrupt_ends_at_once())
    show_messages(quiet)
    classifier = Classifier(model, device=device_name, engine=engine_name, mirrors=mirrors or None, offline=offline,
                            threads=threads, weights=weights, labels=labels, precision=precision.lower())
    class_names = classifier.labels
    outside = next((s for s in samples if s.class_id >= len(class_names)), None)
    if outside is not None:
        raise UsageError(f"{outside.path} is labelled class {outside.class_id}, but the model has "
                         f"{len(class_names)} classes (0-{len(class_names) - 1})")
    stdout = click.get_text_stream("stdout")

    from tqdm import tqdm

    with tqdm(total=len(samples), unit="img", file=sys.stderr, leave=False,
              disable=quiet or not sys.stderr.isatty()) as bar:
        def on_result(result: Any, sample: Any) -> None:
            bar.update(1)
            if not result.ok:  # in every format (with --jsonl its row is on stdout too, as classify's)
                bar.write(f"Error: {result.error}", file=sys.stderr)
            if fmt != "jsonl" or (result.ok and result.predictions[0].class_id == sample.class_id):
                return
            row = result.to_dict()
            row["expected"] = {"class_id": sample.class_id, "label": class_names[sample.class_id]}
            stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            stdout.flush()

        summary = evaluate(classifier, samples, batch_size=batch_size, on_result=on_result)

    if summary.images == 0:
        raise MixnetError(f"none of the {summary.failed} image(s) could be read, so there is no accuracy to report")
    if fmt == "json":
        stdout.write(json.dumps(summary.to_dict()) + "\n")
    else:
        row = {"model": summary.model, "architecture": summary.architecture or summary.model, "images": summary.images, "failed": summary.failed,
               "top1 %": f"{summary.top1 * 100:.2f}", "top5 %": f"{summary.top5 * 100:.2f}",
               "images/s": f"{summary.images_per_s:.1f}"}
        # With JSON lines on stdout (the mistakes), the summary table goes to stderr.
        write_rows([row], "table" if fmt == "jsonl" else fmt, sys.stderr if fmt == "jsonl" else stdout)
    if summary.failed:
        click.echo(f"Error: {summary.failed} image(s) could not be read and were not scored", err=True)
        sys.exit(1)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL",
              help="Model to time: S, M, L or all; repeat for several (default S).")
@click.option("-b", "--batch-size", "batch_sizes", multiple=True, type=click.IntRange(1, 1024),
              help="Batch size; repeat for several (default 1, 4 and 8).")
@device_option
@engine_option
@threads_option
@click.option("--precision", "precisions", multiple=True, metavar="fp32|tf32|bf16|fp16",
              help="Arithmetic to time; repeat for several (default fp32). Other than fp32 needs an engine that "
              "offers it (openvino: bf16; torch); each row then says how far its answers are from the same "
              "engine's fp32.")
@click.option("--compile", "compiled", is_flag=True,
              help="Also time the network compiled (torch.compile; torch engine): each precision twice.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Time your own fine-tuned MixNet (.pdparams) instead of the released weights.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, 10_000), help="Untimed runs first.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1, 100_000), help="Timed runs per batch size.")
@output_options
@network_options
@user_errors
def benchmark(
    models: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    device: str | None,
    engine: str | None,
    threads: int | None,
    precisions: tuple[str, ...],
    compiled: bool,
    weights: Path | None,
    warmup: int,
    repeats: int,
    fmt: str,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Time one forward pass of each model: median and spread over repeated runs, per batch size.

    \b
      mixnet benchmark
      mixnet benchmark --model all --json
      mixnet benchmark -m L --engine paddle -b 1 --repeats 50
      mixnet benchmark -m all --device gpu --precision fp32 --precision fp16

    The input is a random batch (no image decoding), host-to-device copy and the logits' way back included, so
    this is the engine alone; weights are downloaded first when they are not cached. Milliseconds are wall time
    per batch; p10/p90 show the spread. The last column is PaddleClas's published figure for the same model
    (V100, TensorRT, FP32), for comparison.
    """
    from ..classifier import Classifier
    from ..engines.conversion import validation_batch
    from ..engines.choice import check_precision, choose_engine, measure_agreement, measure_latency
    from ..output import write_rows

    if weights is not None and len(models) > 1:
        raise UsageError("--weights times one model: give at most one -m (or none, to read it from the file)")
    names = [spec.name for spec in specs_for(list(models) or ["S"])]
    device_name, engine_name = device_and_engine(device, engine)
    arithmetic = list(dict.fromkeys(check_precision(p, engine_name) for p in precisions or ("fp32",)))
    variants = [(p, False) for p in arithmetic] + ([(p, True) for p in arithmetic] if compiled else [])
    for precision, compile in variants:  # a combination no engine here runs is refused before any download
        choose_engine(engine_name, device_name, precision, compile)
    # Ascending: an engine may run a small batch on a model made for a larger one (OpenVINO pads up to 2x).
    sizes = sorted(set(batch_sizes or (1, 4, 8)))

    def load(target: str | None, precision: str, compile: bool, *, on: Any = None) -> Classifier:
        """The classifier timed for ``target``, or (``on``: an engine) its fp32 twin on the same engine and device."""
        common: dict[str, Any] = dict(device=on.device if on else device_name, engine=on.name if on else engine_name,
                                      threads=threads, precision=precision, compile=compile)
        if weights is not None:
            return Classifier(target, weights=weights, **common)
        return Classifier(target, mirrors=mirrors or None, offline=offline, **common)

    # Every model ready (downloaded, converted, loaded) before the first row: a model that cannot be had stops
    # the command before any output, rather than leaving a JSON array half-written.
    targets = [models[0] if models else None] if weights is not None else list(dict.fromkeys(names))
    loaded = {(target, variant): load(target, *variant) for target in targets for variant in variants}
    # A faster variant is compared with the same engine in plain fp32 (loaded for that when not timed).
    references: dict[str | None, Classifier] = {}
    if variants != [("fp32", False)]:
        for target in targets:
            references[target] = loaded.get((target, ("fp32", False))) or \
                load(target, "fp32", False, on=loaded[(target, variants[0])].engine)

    def rows() -> Iterator[dict[str, Any]]:
        for (target, (precision, compile)), classifier in loaded.items():
            name = classifier.model_name
            runner = classifier.engine
            reference = references.get(target)
            agreement = None
            if reference is not None and reference is not classifier:
                agreement = measure_agreement(runner, reference.engine,
                                              validation_batch(classifier.spec.preprocessing.crop_size, 16, seed=1))
            click.echo(f"timing {name} on {runner.name} ({runner.detail})...", err=True)
            for size in sizes:
                latency = measure_latency(runner, size, classifier.spec.preprocessing.crop_size,
                                          warmup=warmup, repeats=repeats)
                yield {
                    "model": name,
                    "architecture": classifier.architecture,
                    "engine": runner.name,
                    "device": runner.device,
                    "threads": runner.threads,
                    "precision": precision,
                    "compiled": compile,
                    "batch_size": size,
                    "median_ms": round(latency.median_ms, 3),
                    "p10_ms": round(latency.p10_ms, 3),
                    "p90_ms": round(latency.p90_ms, 3),
                    "min_ms": round(latency.min_ms, 3),
                    "max_ms": round(latency.max_ms, 3),
                    "images_per_s": round(latency.images_per_s, 2),
                    "warmup": warmup,
                    "repeats": repeats,
                    # Against the same engine in fp32, on 16 random images (None: this is fp32).
                    "max_prob_diff_vs_fp32": None if agreement is None else agreement.max_abs_probability_diff,
                    "top1_agreement_vs_fp32": None if agreement is None else agreement.top1_agreement,
                    "top5_agreement_vs_fp32": None if agreement is None else agreement.top5_agreement,
                    "detail": runner.detail,
                    # PaddleClas's published figure for the same network (V100, TensorRT, FP32), where it has one:
                    # the architecture's cost, so your own weights with 1000 classes get it too.
                    "paddleclas_v100_trt_ms": None if classifier.spec.num_classes != 1000 else
                    classifier.spec.metrics.v100_trt_fp32_latency_ms.get(f"bs{size}"),
                }

    headers = ["model", "engine", "device", "threads", "batch_size", "median_ms", "p10_ms", "p90_ms",
               "images_per_s", "paddleclas_v100_trt_ms"]
    if variants != [("fp32", False)]:
        headers[4:4] = ["precision", "compiled"]
        headers += ["max_prob_diff_vs_fp32", "top1_agreement_vs_fp32"]
    write_rows(rows(), fmt, click.get_text_stream("stdout"), headers=headers)


