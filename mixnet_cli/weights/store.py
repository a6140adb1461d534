"""Getting a model's weights into the cache and out of it, verified.

The policy lives here: which URLs to try, what a file must pass before it enters the cache (manifest or pinned
checksum and size, a safe parse of the whole file, every key and shape of the architecture), the lock that
lets one process at a time download a given file, and the check of a cached file against the record written
when it was verified.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..base import cache, files, settings
from ..base.cache import discard_partial, info_path
from ..base.http import check_http_url, notice
from .download import fetch_url
from ..base.errors import (CacheError, DownloadError, MixnetError, OfflineError, UnknownHostError, UsageError,
                           WeightsError)
from ..base.manifest import ModelSpec
from .pdparams import WHAT, read_state_dict

_HEX = frozenset("0123456789abcdef")
# What --weights wants, for messages about a file that is not it.
_TRAINED_HINT = "pass the .pdparams file PaddleClas's training saved (e.g. output/MixNet_S/best_model.pdparams)"


@dataclass(frozen=True)
class VerifiedWeights:
    """Weights that passed every check, in the cache. ``how`` says where this call got them: ``cached`` (there
    already), ``downloaded`` (by this process), ``downloaded (resumed)`` (by this process, continuing a partial
    download), ``downloaded by another mixnet process`` (this one waited for it), ``installed`` (from a file the
    user gave), ``yours`` (``--weights``, used where it is)."""

    spec: ModelSpec
    path: Path
    record: cache.WeightsRecord
    how: str = "cached"


def check_mirrors(mirrors: Sequence[str], source: str = "--mirror") -> list[str]:
    """``mirrors`` when each is an http(s) URL prefix; else a :class:`UsageError` naming ``source`` and the bad one."""
    return [check_http_url(mirror, source, "https://host/path") for mirror in mirrors]


def candidate_urls(spec: ModelSpec, mirrors: Sequence[str] | None = None) -> list[str]:
    """The mirrors (flag, else ``MIXNET_MIRROR``) in order, each as ``<mirror>/<file name>``; else the manifest URL."""
    chosen = check_mirrors(mirrors) if mirrors else check_mirrors(settings.mirrors(), "MIXNET_MIRROR")
    if chosen:
        return [f"{mirror.rstrip('/')}/{spec.filename}" for mirror in chosen]
    return [spec.url]


def _download_hint(spec: ModelSpec) -> str:
    return f"run `mixnet download {spec.short_name} --force`"


def normalise_sha256(value: str | None) -> str | None:
    """A pinned sha256 as 64 lowercase hex digits; :class:`UsageError` for anything else."""
    if value is None:
        return None
    digest = value.strip().lower()
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise UsageError(f"--sha256 {value!r} is not a sha256 (64 hex digits, as `sha256sum` prints)")
    return digest


def _size_limit(spec: ModelSpec) -> int:
    # With no published size, a bound from the parameter count (8 bytes each is float64; real files are
    # float32) stops a wrong URL from filling the disk.
    if spec.size is not None:
        return spec.size
    return int(spec.metrics.params_m * 1e6 * 8) + (16 << 20)


def _is_text(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) reads as UTF-8 text: a character cut at the end is forgiven."""
    text = head.decode("utf-8", "replace").rstrip("\ufffd")
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def _sniff(path: Path) -> None:
    """Name the usual impostors before the parser says something less clear."""
    with open(path, "rb") as handle:
        raw = handle.read(512)
    head = raw.lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise WeightsError("is a web page, not a weights file (a login or error page?)")
    if head.startswith((b"{", b"[")):
        raise WeightsError("is a JSON document (an error message?), not a weights file")
    kinds = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
             b"PK\x03\x04": "a zip archive (extract the .pdparams file from it)",
             b"\x1f\x8b": "a gzip archive (extract the .pdparams file from it)", b"%PDF": "a PDF document"}
    for magic, kind in kinds.items():
        if head.startswith(magic.lower()):
            raise WeightsError(f"is {kind}, not a weights file")
    if _is_text(raw):  # a label list or a config given in its place: every weights file is binary
        raise WeightsError(f"is a text file, not a {WHAT}")


def check_file(
    spec: ModelSpec, path: Path, size: int, sha256: str, *, pinned: str | None = None
) -> dict[str, np.ndarray]:
    """Everything a file must pass before it enters the cache; returns its parsed state dict.

    The size and sha256 published in the manifest, and ``pinned`` (``--sha256``), must match; the file must be
    exactly one safe pickle of a state dict with every parameter name and shape of ``spec``'s architecture.
    Raises :class:`WeightsError` whose message starts with what failed (the caller names the file).
    """
    if spec.size is not None and size != spec.size:
        raise WeightsError(f"has {size} bytes, but {spec.name} weights have {spec.size}")
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise WeightsError(f"has sha256 {sha256}, but {spec.name} weights have {spec.sha256}")
    if pinned is not None and sha256 != pinned:
        raise WeightsError(f"has sha256 {sha256}, not the pinned {pinned}")
    _sniff(path)
    state = read_state_dict(path)
    from ..network.architecture import architecture_for

    architecture_for(spec).check_state_dict(state)
    return state


def _install(spec: ModelSpec, tmp: Path, source: str, size: int, sha256: str) -> VerifiedWeights:
    target = cache.weights_path(spec)
    # The stat is taken before the rename, which keeps it: the file hashed is the file stamped.
    record = cache.WeightsRecord(model=spec.name, sha256=sha256, size=size, source=source, fetched_at=cache.now_iso(),
                                 stat=files.stat_stamp(tmp))
    # The weights go in first, then the record: a file without a record is re-verified before use,
    # a record without its file is ignored, so a crash between the two never yields an unverified file.
    os.replace(tmp, target)
    cache.write_record(spec, record)
    how = "installed" if source.startswith("file:") else "downloaded"
    return VerifiedWeights(spec=spec, path=target, record=record, how=how)


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_error(path: Path, exc: OSError) -> CacheError:
    reason = exc.strerror or str(exc)
    if _is_disk_full(exc):
        return CacheError(
            f"cannot write {path} ({reason}); nothing was installed: free some disk space or set MIXNET_HOME "
            "to a disk with room"
        )
    return CacheError(f"cannot write {path} ({reason}); nothing was installed: set MIXNET_HOME to a writable directory")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _clean_leftovers(spec: ModelSpec) -> None:
    # Called with the lock held: any temporary file of this name belongs to a process that died.
    for path in cache.leftover_paths(spec):
        path.unlink(missing_ok=True)


class _WaitNotice:
    """Says on stderr that this process waits for another's download, and remembers that it did."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.waited = False

    def __call__(self, lock: Path) -> None:
        self.waited = True
        notice(f"waiting for another mixnet process downloading {self.spec.filename} (lock {lock})")


def _fetch_verified(
    spec: ModelSpec, url: str, *, progress: bool | None, pinned: str | None, last_source: bool = True
) -> VerifiedWeights:
    partial = cache.partial_path(spec)
    said: list[str] = []

    def say_start(total: int | None, kept: int) -> None:
        # One line, whether or not stderr is a terminal (where the progress bar shows): a CI log or `2>log` says
        # where a first run's wait went, as the conversion's notice does. Again only when what happens changes.
        size = f"{total / 1e6:.1f} MB" if total else "size not given"
        line = (f"resuming the download of {spec.name} weights at {kept / 1e6:.1f} of {size} from {url}" if kept
                else f"downloading {spec.name} weights ({size}) from {url}")
        if not said or said[-1].split(" ", 1)[0] != line.split(" ", 1)[0]:
            notice(line)
        said.append(line)

    for fresh in (False, True):
        try:
            fetched = fetch_url(
                url, partial, label=spec.filename, progress=progress, resume=not fresh, max_bytes=_size_limit(spec),
                retry_unreachable=last_source, on_start=say_start,
            )
        except DownloadError:
            raise
        except OSError as exc:  # writing the partial file: a full disk, a read-only cache
            discard_partial(partial)
            raise _write_error(partial, exc) from None
        try:
            check_file(spec, partial, fetched.size, fetched.sha256, pinned=pinned)
        except WeightsError as exc:
            discard_partial(partial)
            if fetched.resumed_from and not fresh:
                # The kept bytes may be the problem (a file that changed without its validator changing).
                notice(f"the resumed download of {url} {exc}; downloading it again from the start")
                continue
            raise WeightsError(f"{url} {exc}; deleted the download: check the mirror or URL") from None
        except OSError as exc:
            discard_partial(partial)
            raise _write_error(partial, exc) from None
        try:
            installed = _install(spec, partial, url, fetched.size, fetched.sha256)
            return replace(installed, how="downloaded (resumed)") if fetched.resumed_from else installed
        except OSError as exc:
            discard_partial(partial)
            raise _write_error(cache.weights_path(spec), exc) from None
        finally:
            info_path(partial).unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def download_weights(
    spec: ModelSpec,
    *,
    mirrors: Sequence[str] | None = None,
    progress: bool | None = None,
    sha256: str | None = None,
    force: bool = False,
) -> VerifiedWeights:
    """Download, verify and install ``spec``'s weights, trying each candidate URL until one passes.

    One process at a time per file: others wait for it (saying so on stderr) and then use what it installed.
    An interrupted download is resumed by the next call.
    """
    pinned = normalise_sha256(sha256)
    cache.ensure_dir(cache.weights_dir())
    target = cache.weights_path(spec)
    before = _identity(target)
    wait = _WaitNotice(spec)
    with cache.model_lock(spec, on_wait=wait):
        if not force or _identity(target) != before:
            # Installed by another process while this one waited (or a plain run that raced us to the lock).
            found = cached_weights(spec)
            if found is not None:
                _check_pinned(found, pinned)
                changed = wait.waited or _identity(target) != before
                return replace(found, how="downloaded by another mixnet process") if changed else found
        _clean_leftovers(spec)
        failures: list[MixnetError] = []
        urls = candidate_urls(spec, mirrors)
        for index, url in enumerate(urls):
            try:
                # A mirror that does not answer at all gives way to the next at once; the last is retried.
                return _fetch_verified(spec, url, progress=progress, pinned=pinned, last_source=index + 1 == len(urls))
            except (DownloadError, WeightsError) as exc:
                failures.append(exc)
                if index + 1 < len(urls):
                    notice(f"{exc}; trying the next mirror")
    hint = _no_network_hint(spec) if any(isinstance(failure, UnknownHostError) for failure in failures) else ""
    if len(failures) == 1:
        if hint:
            raise UnknownHostError(f"{failures[0]}{hint}")
        raise failures[0]
    error = UnknownHostError if hint else DownloadError
    raise error(f"no source gave valid {spec.name} weights: " + " | ".join(map(str, failures)) + hint)


def _no_network_hint(spec: ModelSpec) -> str:
    """What to do when a weights host does not resolve: another source, or the file from elsewhere."""
    return (f"; give a mirror that resolves (--mirror URL or MIXNET_MIRROR), or fetch {spec.url} elsewhere, run "
            f"`mixnet download {spec.short_name} --from FILE`, and set MIXNET_OFFLINE=1 to keep mixnet off the "
            "network")


def install_from_file(spec: ModelSpec, source: Path | str, *, sha256: str | None = None) -> VerifiedWeights:
    """Install a weights file the user fetched themselves, with the same checks as a download.

    ``source`` may be the file or a directory holding ``spec.filename``. The user's file is copied, never moved
    or deleted; the copy replaces whatever the cache held only once it has passed every check.
    """
    pinned = normalise_sha256(sha256)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / spec.filename
    if not path.is_file():
        if os.path.lexists(path):  # a pipe, a device, a broken link: there, but not a file that can be checked
            from ..base.files import kind_of_file

            raise UsageError(f"{path} is {kind_of_file(path)}, not a regular file; give a copy of {spec.url} saved "
                             "as a file (or the directory holding it)")
        raise UsageError(f"{path}: no such file; give a copy of {spec.url} (or the directory holding it)")
    cache.ensure_dir(cache.weights_dir())
    with cache.model_lock(spec, on_wait=_WaitNotice(spec)):
        _clean_leftovers(spec)
        tmp = cache.temporary_path(spec)
        try:
            try:
                size, digest = files.copy_hashing(path, tmp)
            except OSError as exc:
                if exc.filename is not None and Path(exc.filename) == path:
                    raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
                raise _write_error(tmp, exc) from None
            try:
                check_file(spec, tmp, size, digest, pinned=pinned)
            except WeightsError as exc:
                raise WeightsError(f"{path} {exc}; nothing was installed") from None
            installed = _install(spec, tmp, f"file:{path.resolve()}", size, digest)
            discard_partial(cache.partial_path(spec))  # whatever was half-downloaded is now obsolete
            return installed
        finally:
            tmp.unlink(missing_ok=True)


def cached_weights(spec: ModelSpec) -> VerifiedWeights | None:
    """The cached file if present and still matching its record; None if not cached.

    The file is hashed when its size, modification time or inode differ from those recorded when it was last
    hashed (every time with ``MIXNET_VERIFY=always``), and its new stat is recorded when it still matches. A file
    whose content no longer matches its record is corrupt: :class:`WeightsError` says how to fetch it again. A
    file with no record (placed by hand, or a crash before the record was written) is verified in full and then
    adopted. Partial downloads (``.part``) are never looked at.
    """
    path = cache.weights_path(spec)
    if not path.is_file():
        return None
    record = cache.read_record(spec)
    if (record is not None and settings.verify_mode() != "always" and files.stamp_vouches(path, record.stat)
            and record.stat is not None and record.stat["size"] == record.size
            and (not spec.sha256 or record.sha256 == spec.sha256)):
        return VerifiedWeights(spec=spec, path=path, record=record)
    try:
        stamp = files.stat_stamp(path)  # before the hash: a change while hashing shows as a changed stat next time
    except OSError:
        return None
    size = stamp["size"]
    sha256 = cache.sha256_of(path)
    if record is None:
        try:
            check_file(spec, path, size, sha256)
        except WeightsError as exc:
            raise WeightsError(
                f"{path} {exc}; delete it or {_download_hint(spec)}"
            ) from None
        record = cache.WeightsRecord(
            model=spec.name, sha256=sha256, size=size, source=f"file:{path}", fetched_at=cache.now_iso(), stat=stamp
        )
        try:
            cache.write_record(spec, record)
        except OSError:
            pass  # a read-only cache still serves what it holds; verification simply repeats next time
        return VerifiedWeights(spec=spec, path=path, record=record)
    if size != record.size or sha256 != record.sha256 or (spec.sha256 and sha256 != spec.sha256):
        raise WeightsError(
            f"cached weights {path} are corrupt (sha256 {sha256[:12]}..., expected {record.sha256[:12]}...); "
            f"{_download_hint(spec)}"
        )
    _restamp(spec, record, stamp)
    return VerifiedWeights(spec=spec, path=path, record=record)


def _restamp(spec: ModelSpec, record: cache.WeightsRecord, stamp: dict[str, int]) -> None:
    """Keep the stat of a file just hashed and found intact, so that the next use skips the hash. Best effort,
    under the file's lock and only when it is free (a download may be replacing the file): a read-only or busy
    cache hashes again next time."""
    if record.stat == stamp:
        return
    try:
        with cache.model_lock(spec, wait=False):
            if cache.read_record(spec) == record:  # not replaced meanwhile
                cache.write_record(spec, replace(record, stat=stamp))
    except (MixnetError, OSError):
        pass


def _check_pinned(found: VerifiedWeights, pinned: str | None) -> None:
    if pinned is not None and found.record.sha256 != pinned:
        raise WeightsError(
            f"cached weights {found.path} have sha256 {found.record.sha256}, not the pinned {pinned}; "
            f"run `mixnet download {found.spec.short_name} --force --sha256 {pinned}` to fetch them again"
        )


def ensure_weights(
    spec: ModelSpec,
    *,
    mirrors: Sequence[str] | None = None,
    offline: bool | None = None,
    force: bool = False,
    progress: bool | None = None,
    sha256: str | None = None,
) -> VerifiedWeights:
    """The verified cached weights of ``spec``, downloading them first when needed (and allowed).

    ``sha256`` pins the file: a cached or downloaded file with another checksum is refused.
    """
    pinned = normalise_sha256(sha256)
    offline = settings.offline() if offline is None else offline
    if not force:
        try:
            found = cached_weights(spec)
        except WeightsError as exc:
            if offline:
                raise
            # A damaged cached file is replaced, not reported for the user to delete by hand.
            notice(f"{exc.args[0].split(';')[0]}; downloading them again")
            found, force = None, True
        if found is not None:
            _check_pinned(found, pinned)
            return found
    if offline:
        short = spec.short_name
        raise OfflineError(
            f"{spec.name} weights are not in the cache ({cache.weights_path(spec)}) and offline mode is on; "
            f"run `mixnet download {short}` with network access, or fetch {spec.url} yourself and run "
            f"`mixnet download {short} --from FILE`"
        )
    return download_weights(spec, mirrors=mirrors, progress=progress, sha256=pinned, force=force)


def load_state(weights: VerifiedWeights) -> dict[str, np.ndarray]:
    """Parse verified weights into a state dict (the safe unpickler; never ``pickle.load``).

    The bytes parsed are the bytes checked: the file is read once, and its sha256 must still be the one
    recorded when it was verified.
    """
    try:
        data = weights.path.read_bytes()
    except OSError as exc:
        raise WeightsError(
            f"cannot read {weights.path} ({exc.strerror or exc}); {_download_hint(weights.spec)}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights.record.sha256:
        raise WeightsError(
            f"{weights.path} changed since it was verified (sha256 {digest[:12]}..., expected "
            f"{weights.record.sha256[:12]}...); {_download_hint(weights.spec)}"
        )
    try:
        return read_state_dict(data)
    except MixnetError as exc:
        raise WeightsError(f"{weights.path} {exc}; {_download_hint(weights.spec)}") from None


def _check_finite(state: dict[str, np.ndarray], source: Path) -> None:
    """A training run that diverged saves NaN or infinite values: every answer from them would be NaN."""
    for name, value in state.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise WeightsError(f"{source} holds NaN or infinite values (in {name}); the training that made it "
                               "diverged: use an earlier checkpoint")


def custom_weights_name(path: Path, sha256: str) -> str:
    """A fine-tune's name in results: its file's stem and the first 7 hex digits of its sha256
    (``my_flowers-3fa2c1d``), so that two fine-tunes of one architecture, or two epochs saved under the same file
    name, can be told apart."""
    return f"{path.stem}-{sha256[:7]}"


def custom_weights(path: Path | str, model: ModelSpec | None = None) -> VerifiedWeights:
    """Your own weights: a ``.pdparams`` file of MixNet_S, M or L fine-tuned on any number of classes, as PaddleClas
    trains and saves them (``paddle.save(model.state_dict())``).

    The file is read once, parsed by the safe loader, and checked against the architecture: ``model`` when given,
    else the one of S, M, L whose every parameter name and shape it holds. The class count is the classifier's
    (``output.bias``). The file stays where it is; what is built from it is cached under its sha256 like the
    released weights' (``VerifiedWeights.spec`` carries the detected architecture and class count, and the name
    results give it, :func:`custom_weights_name`). Raises
    :class:`WeightsError` naming the file when it is not MixNet weights (or not ``model``'s), and
    :class:`UsageError` when it is missing or unreadable.
    """
    from ..network.architecture import architecture_for
    from ..base.manifest import load_manifest

    source = Path(path).expanduser()
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--weights {source}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--weights {source}: is a directory; give the .pdparams file") from None
    except OSError as exc:
        raise UsageError(f"--weights {source}: cannot read ({exc.strerror or exc})") from None
    try:
        _sniff(source)
        state = read_state_dict(data)
    except MixnetError as exc:
        raise WeightsError(f"{source} {exc}; {_TRAINED_HINT}") from None
    _check_finite(state, source)
    bias = state.get("output.bias")
    if bias is None or bias.ndim != 1 or bias.shape[0] < 1:
        raise WeightsError(f"{source} has no classifier (output.bias) of a MixNet; give the weights of a MixNet_S, "
                           "MixNet_M or MixNet_L trained with PaddleClas")
    num_classes = int(bias.shape[0])
    candidates = [model] if model is not None else list(load_manifest().models.values())
    problems = []
    for base in candidates:
        spec = replace(base, num_classes=num_classes, custom=True, url=source.resolve().as_uri(),
                       sha256=None, size=len(data))
        try:
            architecture_for(spec).check_state_dict(state)
        except WeightsError as exc:
            problems.append(str(exc))
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        spec = replace(spec, sha256=sha256, weights_name=custom_weights_name(source, sha256))
        record = cache.WeightsRecord(model=spec.name, sha256=sha256, size=len(data), source=f"file:{source}",
                                     fetched_at=cache.now_iso())
        return VerifiedWeights(spec=spec, path=source, record=record, how="yours")
    if model is not None:
        raise WeightsError(f"{source} {problems[0]}; leave out --model to detect the architecture")
    raise WeightsError(f"{source} holds none of MixNet_S, MixNet_M, MixNet_L with {num_classes} classes "
                       f"({problems[0]})")
