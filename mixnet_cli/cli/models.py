"""The models and their files: ``mixnet download``, ``models``, ``cache`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..base import settings
from ..base.errors import MixnetError, UsageError
from .common import (
    CONTEXT_SETTINGS,
    complete_model,
    complete_models,
    network_options,
    output_options,
    specs_for,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...", shell_complete=complete_models)
@click.option("--force", is_flag=True, help="Download again even if the cache holds a verified copy.")
@click.option(
    "--sha256", "sha256", metavar="HEX", default=None,
    help="Accept only a file with this sha256 (one MODEL); a mismatch is deleted, not installed.",
)
@click.option(
    "--from", "from_path", metavar="FILE", default=None,
    type=click.Path(exists=True, path_type=Path),
    help="Install a copy of the weights file you fetched yourself (or a directory holding it), with the same "
    "checks as a download; no network. FILE is copied, never moved.",
)
@network_options
@user_errors
def download(
    models: tuple[str, ...],
    force: bool,
    sha256: str | None,
    from_path: Path | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Download and verify the weights of MODEL (S, M, L or all) into the cache.

    \b
      mixnet download S
      mixnet download all --mirror https://my-mirror.example/paddleclas
      mixnet download S --from ~/Downloads/MixNet_S_pretrained.pdparams
      mixnet download S --sha256 <64 hex digits>

    A second run uses the cache and does not touch the network. Weights land in the cache only after they
    are complete and verified: checksum where one is published (or pinned with --sha256), a safe parse of the
    whole file, and every parameter name and shape of the architecture. An interrupted download resumes on
    the next run; several processes needing the same file share one download.
    """
    from ..weights.store import ensure_weights, install_from_file, normalise_sha256

    specs = specs_for(models)
    pinned = normalise_sha256(sha256)
    if pinned and len(specs) > 1:
        raise UsageError("--sha256 pins one file: give exactly one MODEL")
    if from_path is not None and len(specs) > 1 and not from_path.is_dir():
        raise UsageError("--from FILE installs one model: give exactly one MODEL, or a directory holding the files")
    failed: list[MixnetError] = []
    for spec in specs:
        try:
            if from_path is not None:
                weights = install_from_file(spec, from_path, sha256=pinned)
            else:
                weights = ensure_weights(spec, mirrors=mirrors or None, offline=offline, force=force, sha256=pinned)
            state = "installed" if from_path is not None else weights.how
        except MixnetError as exc:
            if len(specs) == 1 or settings.debug():
                raise
            # `all`: one model that cannot be had does not keep the others from being downloaded.
            click.echo(f"Error: {exc}", err=True)
            failed.append(exc)
            continue
        click.echo(f"{spec.name}: {state} {weights.path} ({weights.record.size} bytes, sha256 {weights.record.sha256})", err=True)
    if failed:
        click.echo(f"Error: {len(failed)} of {len(specs)} model(s) failed", err=True)
        sys.exit(1)


@click.command(context_settings=CONTEXT_SETTINGS)
@output_options
@user_errors
def models(fmt: str) -> None:
    """List the models: PaddleClas's accuracy and speed figures, and whether each is cached.

    \b
      mixnet models
      mixnet models --json | jq '.[] | {model, top1}'

    Accuracy is ImageNet-1k validation top-1/top-5 (%), as published by PaddleClas; latency is PaddleClas's
    V100 TensorRT FP32 figure in ms at batch 1/4/8.
    """
    from ..base.cache import weights_path
    from ..base.manifest import load_manifest
    from ..output import write_rows

    rows = []
    for spec in load_manifest().models.values():
        path = weights_path(spec)
        metrics = spec.metrics
        rows.append({
            "model": spec.name,
            "top1": metrics.top1,
            "top5": metrics.top5,
            "paper_top1": metrics.paper_top1,
            "flops_m": metrics.flops_m,
            "params_m": metrics.params_m,
            "v100_ms_bs1_4_8": " / ".join(f"{v:.2f}" for v in metrics.v100_trt_fp32_latency_ms.values()),
            "cached": path.is_file(),
            "size_bytes": path.stat().st_size if path.is_file() else None,
        })
    for row, spec in zip(rows, load_manifest().models.values()):
        if fmt in ("json", "jsonl"):
            row["v100_ms_bs1_4_8"] = spec.metrics.v100_trt_fp32_latency_ms
            row["url"] = spec.url
        else:  # the published precision, as in PaddleClas's table
            row.update({key: f"{row[key]:.2f}" for key in ("top1", "top5")})
            row.update({key: f"{row[key]:.1f}" for key in ("paper_top1",)})
            row.update({key: f"{row[key]:.3f}" for key in ("flops_m", "params_m")})
    write_rows(rows, fmt, click.get_text_stream("stdout"))


@click.group("cache", context_settings=CONTEXT_SETTINGS)
def cache_group() -> None:
    """Show and manage the downloaded weights (the cache: MIXNET_HOME or the user cache directory).

    \b
      mixnet cache list
      mixnet cache path
      mixnet cache rm S
      mixnet cache clear --yes
    """


_CACHE_COLUMNS = ["model", "architecture", "kind", "status", "size", "sha256", "source", "fetched_at"]


@cache_group.command("list", context_settings=CONTEXT_SETTINGS)
@output_options
@user_errors
def cache_list(fmt: str) -> None:
    """List the cached weights (and the models converted from them): model, architecture, kind, status, size,
    sha256, source, when. A model converted from your own weights (--weights) is named by them
    (my_flowers-3fa2c1d: the file's stem and its sha256's first digits).

    \b
      mixnet cache list
      mixnet cache list --json |
          jq -r '.[] | select(.status == "verified") | .path'

    Status: verified (matches the record written when it was checked), unverified (no record: checked in full
    on first use), corrupt (changed since: `mixnet download MODEL --force`), partial (an interrupted download;
    the next `mixnet download` resumes it).
    """
    from ..base.cache import cache_root, inventory
    from ..output import write_rows

    rows = [item.to_dict() for item in inventory()]
    count = write_rows(rows, fmt, click.get_text_stream("stdout"), headers=_CACHE_COLUMNS)
    if not count and fmt == "table":
        click.echo(f"Nothing cached in {cache_root()}.", err=True)


@cache_group.command("path", context_settings=CONTEXT_SETTINGS)
@click.argument("model", required=False, shell_complete=complete_model)
@user_errors
def cache_path(model: str | None) -> None:
    """Print the cache directory, or with MODEL the path its weights file has (or will have).

    \b
      mixnet cache path
      mixnet cache path S
    """
    from ..base.cache import cache_root, weights_path
    from ..base.manifest import resolve_model

    click.echo(str(weights_path(resolve_model(model)) if model else cache_root()))


@cache_group.command("rm", context_settings=CONTEXT_SETTINGS)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...", shell_complete=complete_models)
@user_errors
def cache_rm(models: tuple[str, ...]) -> None:
    """Delete the cached weights of MODEL (S, M, L or all), with their record, any partial download, a lock file
    a killed run left, and the models converted from them.

    \b
      mixnet cache rm S
    """
    from ..base.cache import execute, plan_removal

    for spec in specs_for(models):
        removed = execute(plan_removal([spec]))
        click.echo(f"{spec.name}: " + (f"removed {len(removed)} file(s) and folder(s)" if removed else "nothing cached"),
                   err=True)


@cache_group.command("clear", context_settings=CONTEXT_SETTINGS)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def cache_clear(yes: bool) -> None:
    """Delete every cached weights file, record, partial download and lock, and the converted models.

    \b
      mixnet cache clear
      mixnet cache clear --yes

    Only the cache's own files are deleted: anything else under MIXNET_HOME stays.
    """
    from ..base.cache import cache_root, execute, plan_clear

    plan = plan_clear()
    if not plan:
        click.echo(f"Nothing to delete in {cache_root()}.", err=True)
        return
    # A model's files are its weights, their record and any partial download: counted by model, not as weights.
    counts = [f"the weights of {len(plan.weights)} model(s) ({plan.weights_files} file(s), records included)"] \
        if plan.weights else []
    counts += [f"{len(plan.locks)} lock file(s)"] if plan.locks else []
    counts.append(f"{len(plan.folders)} converted-model folder(s)")
    listed = f"{', '.join(counts[:-1])} and {counts[-1]}" if len(counts) > 1 else counts[0]
    question = f"Delete {listed}, {plan.size / 1e6:.1f} MB, from {cache_root()}?"
    try:
        confirmed = yes or click.confirm(question, default=False, err=True)
    except click.Abort:
        if sys.stdin.isatty():
            raise  # Ctrl-C or Ctrl-D at the prompt: the person stopped it
        # stdin ended before an answer (a script, `< /dev/null`): click's bare "Aborted." would not say why.
        click.echo("", err=True)  # end the prompt's line, so the error is a line of its own
        raise UsageError("cache clear needs confirmation, and stdin ended without an answer (nothing was deleted); "
                         "pass --yes to delete without asking") from None
    if not confirmed:
        click.echo("Nothing deleted.", err=True)
        sys.exit(1)
    removed = execute(plan)
    click.echo(f"Deleted {len(removed)} file(s) and folder(s) from {cache_root()}.", err=True)


_EXPORT_USAGE = {
    "paddle": """Use it with Paddle Inference 3 (Python, or its C++ API with the same two files):
  import paddle.inference as pi
  config = pi.Config("{dir}/inference.json", "{dir}/inference.pdiparams")
  predictor = pi.create_predictor(config)
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: logits N x {classes} (apply softmax for probabilities).
Not with config.enable_memory_optim(): paddle 3.3.1 fails on this format then (a paddle bug), and PaddleClas's tools
and C++ demo call it. They, Paddle Lite's opt and Paddle Inference before 3.0 read --format paddle-legacy instead.""",
    "paddle-legacy": """Use it with PaddleClas's tools (on paddle 3 with FLAGS_enable_pir_api=0, its old IR), Paddle Lite or Paddle Inference:
  FLAGS_enable_pir_api=0 paddleclas --inference_model_dir {dir} --infer_imgs cat.jpg --use_gpu False
  paddle_lite_opt --model_file={dir}/inference.pdmodel --param_file={dir}/inference.pdiparams --optimize_out={lite_name} --valid_targets=x86
  pi.Config("{dir}/inference.pdmodel", "{dir}/inference.pdiparams")   # import paddle.inference as pi
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: probabilities N x {classes} (a softmax last, as in PaddleClas's own exports).""",
    "onnx": """Use it with ONNX Runtime (or any ONNX runtime):
  import onnxruntime as ort
  session = ort.InferenceSession("{dir}/{name}.onnx")
  {output} = session.run(None, {{"x": batch}})[0]
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: {output_words}.
The file describes itself: onnx.load("{dir}/{name}.onnx").metadata_props holds model_name, labels and preprocessing.""",
}


@click.command(name="export", context_settings=CONTEXT_SETTINGS)
@click.argument("model", metavar="MODEL", required=False, shell_complete=complete_model)
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Export your own fine-tuned MixNet (.pdparams) instead of MODEL's released weights.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Class names for --weights, written into the ONNX model's metadata (as for classify; default: "
              "ImageNet's for 1000 classes, else the class ids).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "paddle", "paddle-legacy"]), default="onnx",
              show_default=True,
              help="onnx: an ONNX model that carries its labels and preprocessing in its metadata; paddle: a Paddle 3 "
                   "inference model (inference.json + inference.pdiparams), for Paddle Inference 3 clients that do not "
                   "call enable_memory_optim() (paddle 3.3.1 fails on it then; PaddleClas's tools do call it); "
                   "paddle-legacy: the format PaddleClas's "
                   "tools, Paddle Lite's opt and Paddle Inference < 3 read (inference.pdmodel + inference.pdiparams, "
                   "softmax output).")
@click.option("--with-softmax", is_flag=True,
              help="ONNX only: end the model in a softmax, so that it outputs probabilities (for tools that print "
              "its output as scores, such as PaddleClas's ONNX mode) instead of logits.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the model into (created if needed); the ONNX file is named after the model: "
              "MixNet_S.onnx, or your weights' name for --weights (best_model-7b1843a.onnx).")
@network_options
@user_errors
def export_command(model: str | None, weights: Path | None, labels: Path | None, fmt: str, with_softmax: bool,
                   out_dir: Path, mirrors: tuple[str, ...], offline: bool | None) -> None:
    """Export MODEL (S, M, L) for deployment: an ONNX model (the default) or a Paddle inference model.

    \b
      mixnet export L -o models/
      mixnet export S --with-softmax -o models/
      mixnet export S --format paddle -o mixnet_s_infer/
      mixnet export S --format paddle-legacy -o MixNet_S_infer/

    The ONNX model is mixnet's own graph of the network (no paddle needed); the paddle formats need the
    [paddle] extra. The export is checked before it is written: loaded back from the output directory and run
    on a test batch, it must give the reference's logits (or, for paddle-legacy, whose output is probabilities,
    their softmax). Prints the files written (stdout) and how to use them (stderr).
    """
    from ..base.third_party import require_paddle
    from ..engines.conversion import FORMATS
    from ..export import check_output_directory, export_to_directory
    from ..base.manifest import resolve_model
    from ..images.labels import imagenet_labels, read_label_file
    from ..weights.store import custom_weights, ensure_weights

    if model is None and weights is None:
        raise UsageError("name the MODEL to export (S, M or L), or give --weights FILE")
    if labels is not None and weights is None:
        raise UsageError("--labels names the classes of --weights; the released models' are ImageNet's")
    if with_softmax and fmt != "onnx":
        raise UsageError(f"--with-softmax is for --format onnx (--format {fmt} " + (
            "outputs probabilities already)" if fmt == "paddle-legacy" else "outputs logits)"))
    named = resolve_model(model) if model is not None else None
    check_output_directory(out_dir)  # before any download or conversion
    if FORMATS[fmt].needs_paddle:
        require_paddle(f"the {FORMATS[fmt].label} model")  # and a missing extra before the weights are fetched
    verified = custom_weights(weights, named) if weights is not None else \
        ensure_weights(named, mirrors=mirrors or None, offline=offline)  # type: ignore[arg-type]
    spec = verified.spec
    names = read_label_file(labels, spec.num_classes) if labels is not None else \
        imagenet_labels() if spec.num_classes == 1000 else None
    written, check = export_to_directory(spec, verified.path, verified.record.sha256, fmt, out_dir, labels=names,
                                         with_softmax=with_softmax)
    for path in written:
        click.echo(str(path))
    pre = spec.preprocessing
    logits = ("logit", check["max_abs_logit_diff"]) if "max_abs_logit_diff" in check else \
        ("log-probability", check["max_abs_log_probability_diff"])
    click.echo(
        f"{spec.display_name} exported as {fmt}{' with a softmax' if with_softmax else ''} to {out_dir}: loaded back and checked against {check['reference'] or 'the reference'} "
        f"(max {logits[0]} difference {logits[1]:.2g}, probabilities {check['max_abs_probability_diff']:.2g}).",
        err=True,
    )
    click.echo(
        _EXPORT_USAGE[fmt].format(dir=out_dir, name=spec.display_name, lite_name=spec.name.lower(), size=pre.crop_size, resize=pre.resize_short,
                                  mean=list(pre.mean), std=list(pre.std), classes=spec.num_classes,
                                  output="probabilities" if with_softmax else "logits",
                                  output_words=f"probabilities N x {spec.num_classes} (a softmax last)" if with_softmax
                                  else f"logits N x {spec.num_classes} (apply softmax for probabilities, or export "
                                  "--with-softmax)"),
        err=True,
    )
