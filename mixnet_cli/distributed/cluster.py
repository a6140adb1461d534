"""The Ray cluster: connecting to one (or starting one of this machine alone, on loopback, for the duration),
and sizing the actor pool from its CPUs and GPUs before any actor starts."""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..base.errors import EngineError, UsageError
from .extra import _import_ray


# CPUs each node keeps free of actors, for the small tasks Ray Data still runs (a Dataset you bring keeps its own
# read tasks): two actors asking for a whole CPU each on a 2-CPU node leave nothing for them, and the job hangs
# without a warning. Actors ask for fractional CPUs instead.
RESERVED_CPUS_PER_NODE = 0.5
# An actor that dies (a crash in a native library, a killed process) is restarted and its batch retried this many
# times; Ray's default for Ray Data is to restart forever, so one image that crashes the process would loop.
MAX_ACTOR_RESTARTS = 3


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each asks of Ray: ``cpus`` (fractional), ``threads`` (engine threads), ``gpus``
    (fractional; 0 for CPU actors, which then never touch a GPU: see :func:`actor_device`)."""

    actors: int
    cpus: float
    threads: int
    gpus: float = 0.0

    @property
    def device(self) -> str:
        """The device each actor is told to open."""
        return "gpu" if self.gpus else "cpu"


def plan_actors(
    node_cpus: Sequence[float],
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    *,
    cluster_gpus: float = 0.0,
    device: str = "cpu",
    gpus_per_actor: float | None = None,
) -> ActorPlan:
    """Size the actor pool from the cluster's resources, before any actor starts.

    On the CPU (``device`` ``cpu``, or ``auto`` on a cluster without GPUs): by default one actor per node, asking
    for the node's CPUs less :data:`RESERVED_CPUS_PER_NODE`; with ``actors`` given, the cluster's CPUs (less the
    reserve) shared between them. One actor with 2 threads beat two with 1 thread each on a 2-CPU node, in time
    and memory. On GPUs (``gpu``, ``gpu:N``, or ``auto`` on a cluster with ``cluster_gpus``): each actor asks Ray
    for ``gpus_per_actor`` GPUs (default 1; fractions share a GPU), and there is one actor per such share
    (``cluster_gpus / gpus_per_actor``, rounded down) unless ``actors`` says; CPUs are shared as above. Raises
    :class:`UsageError` for a cluster with no CPUs, ``gpu`` on a cluster without GPUs, ``gpus_per_actor`` above
    the cluster's GPUs or without GPUs asked for, and non-positive counts."""
    nodes = [cpus for cpus in node_cpus if cpus > 0]
    if not nodes:
        raise UsageError("the Ray cluster has no node with CPUs; start workers with `ray start --address ...`")
    if actors is not None and actors < 1:
        raise UsageError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise UsageError(f"--cpus-per-actor must be above 0, got {cpus_per_actor:g}")
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        raise UsageError(f"--gpus-per-actor must be above 0, got {gpus_per_actor:g}")
    wants_gpu = device.startswith("gpu")
    if wants_gpu and cluster_gpus <= 0:
        raise UsageError(f"--device {device}: the Ray cluster has no GPU (its nodes offer CPUs only); use --device "
                         "cpu, or add nodes with GPUs (`ray start --num-gpus N`)")
    uses_gpu = wants_gpu or (device == "auto" and cluster_gpus > 0)
    gpus = 0.0
    if uses_gpu:
        gpus = gpus_per_actor if gpus_per_actor is not None else 1.0
        if gpus > cluster_gpus:
            raise UsageError(f"--gpus-per-actor {gpus:g}: more than the cluster's {cluster_gpus:g} GPU(s); ask for "
                             "at most that many")
        count = actors or max(1, math.floor(cluster_gpus / gpus + 1e-9))
    else:
        if gpus_per_actor is not None:
            raise UsageError(f"--gpus-per-actor needs GPUs: add --device gpu (this job runs on the CPU: --device "
                             f"{device}{', and the cluster has no GPU' if device == 'auto' else ''})")
        count = actors or len(nodes)
    if cpus_per_actor is None:
        usable = sum(max(cpus - RESERVED_CPUS_PER_NODE, 0.25) for cpus in nodes)
        largest = max(nodes) - RESERVED_CPUS_PER_NODE
        # Quarters of a CPU: Ray schedules fractions, and an actor must fit on one node.
        cpus_per_actor = max(0.25, math.floor(min(usable / count, largest) * 4) / 4)
    return ActorPlan(actors=count, cpus=cpus_per_actor, threads=max(1, math.ceil(cpus_per_actor)), gpus=gpus)


def _cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _node_cpus(ray: Any) -> list[float]:
    return [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]


def _starts_local_cluster(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def _loopback_environment() -> None:
    """For a cluster that lives as long as this process: every socket on loopback, no usage reports (unless
    the user set these). Ray reads the first variable when it is imported, so this must run before (a program
    that imported ray already must set it itself); unset, Ray takes the routable address even for node
    127.0.0.1, and its servers listen on every interface."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's token authentication would write a new token to ~/.ray/auth_token, outside mixnet's cache; a token in
    # the environment serves this one cluster (its processes inherit it) and is written nowhere.
    if not any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connected to Ray for the duration: an already initialised session as it is; ``address`` (``auto``,
    ``host:port``, ``ray://...``) or ``RAY_ADDRESS`` connects to a running cluster; with neither, a cluster of
    this machine alone is started on 127.0.0.1 (never the routable address, no dashboard, usage stats off
    unless set) and stopped at the end. Yields the ``ray`` module."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_reachable(address)
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    session_files: str | None = None
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    if _starts_local_cluster(address):
        _loopback_environment()
        # The cluster's session files (logs, sockets, spilled objects) in a folder of its own, deleted with it:
        # Ray's default, /tmp/ray, keeps every session's. Short, under the system's temporary folder: Ray's
        # Unix socket paths inside it must stay under the OS's 107-character limit.
        session_files = tempfile.mkdtemp(prefix="mixnet-ray-")
        options.update(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                       _temp_dir=session_files)
    try:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if address is None:
                raise EngineError(f"cannot start Ray on this machine ({exc})") from None
            raise UsageError(f"--address {address}: cannot connect to a Ray cluster ({exc}); start one with "
                             "`ray start --head` or check the address") from None
        # Ray Data logs every execution plan at INFO on the driver's stderr; the command prints its own summary.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if session_files is not None:
            shutil.rmtree(session_files, ignore_errors=True)


# How long a cluster's address may take to accept a connection before the command gives up on it.
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail in one line, within :data:`CONNECT_TIMEOUT_S`, when nothing accepts connections at ``address``
    (``host:port`` or ``ray://host:port``): ``ray.init`` itself keeps retrying such an address for minutes.
    ``auto`` is left to Ray, which finds the cluster of this machine or says there is none."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__).lower()
        raise UsageError(f"--address {address}: nothing answers there ({why}); start a cluster with "
                         "`ray start --head` or check the address") from None


def _forwarded_environment() -> dict[str, str]:
    """The driver's MIXNET_* settings, for the actors: on other nodes they would not be set otherwise."""
    return {name: value for name, value in os.environ.items() if name.startswith("MIXNET_")}
