"""Mesh and shardings for data parallelism: ``jax.jit`` over a 1-D ``("data",)`` mesh.

Every batch array is split along its leading axis over the ``"data"`` axis
(:func:`batch_sharding`); parameters and optimiser state are replicated
(:func:`replicated`). The same code runs on one CPU, one GPU, several GPUs, or several
processes after :func:`maybe_initialize_distributed`, which starts JAX's distributed runtime
for a Slurm, Open MPI, Kubernetes or Cloud TPU launch (JAX's own detection) or for explicit
settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kd_jax._rendezvous import _ADDRESS, DistributedInitError, _one_line, _rendezvous

__all__ = [
    "DATA_AXIS",
    "DEFAULT_INITIALIZATION_TIMEOUT",
    "DistributedInitError",
    "batch_sharding",
    "check_batch_size",
    "make_mesh",
    "maybe_initialize_distributed",
    "process_rows",
    "replicated",
]

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes).

    Built with ``jax.make_mesh``, which orders TPU devices along the physical interconnect;
    CPU and GPU devices keep the order ``(process_index, id)``, so each process's devices
    form one contiguous block of rows of every batch sharded with :func:`batch_sharding`.
    The axis is ``AxisType.Auto`` (the sharding of intermediates is left to the compiler).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device or None for all devices")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.make_mesh((len(ordered),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=ordered)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``"data"``: ``NamedSharding(mesh, P("data"))``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device: ``NamedSharding(mesh, P())``."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises ``ValueError`` unless ``global_batch_size`` is a positive multiple of the devices."""
    n = mesh.size
    if global_batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {global_batch_size}")
    if global_batch_size % n:
        lower = global_batch_size // n * n
        upper = lower + n
        example = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {n} devices; "
            f"choose a multiple of {n} (e.g. {example})"
        )


def process_rows(global_batch_size: int, mesh: Mesh) -> np.ndarray:
    """Rows of a ``batch_sharding(mesh)`` batch held by this process's devices, ascending, int64.

    With one process this is every row; over a :func:`make_mesh` mesh on CPUs or GPUs it is
    one contiguous range. It is the order ``jax.make_array_from_process_local_data`` expects
    the process-local rows in.
    """
    check_batch_size(global_batch_size, mesh)
    per_device = global_batch_size // mesh.size
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({index[0].indices(global_batch_size)[0] for index in indices.values()})
    return np.concatenate([np.arange(s, s + per_device, dtype=np.int64) for s in starts])


# ---------------------------------------------------------------------- multi-process start-up

DEFAULT_INITIALIZATION_TIMEOUT = 300  # seconds, JAX's own default


_FLAGS = {
    "coordinator_address": "--coordinator-address",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
}
# Read, in this order, for an argument left None. JAX reads JAX_COORDINATOR_ADDRESS itself;
# JAX_NUM_PROCESSES and JAX_PROCESS_ID complete it for launchers JAX does not detect; the
# KD_JAX_* names are kd_jax's earlier ones.
_ENV = {
    "coordinator_address": ("JAX_COORDINATOR_ADDRESS", "KD_JAX_COORDINATOR"),
    "num_processes": ("JAX_NUM_PROCESSES", "KD_JAX_NUM_PROCESSES"),
    "process_id": ("JAX_PROCESS_ID", "KD_JAX_PROCESS_ID"),
}
_LABELS = {
    "coordinator_address": "coordinator address",
    "num_processes": "process count",
    "process_id": "process id",
}
_CLUSTER_NAMES = {
    "SlurmCluster": "Slurm",
    "OmpiCluster": "Open MPI",
    "K8sCluster": "Kubernetes",
    "GceTpuCluster": "Cloud TPU VM",
    "GkeTpuCluster": "GKE TPU",
    "Mpi4pyCluster": "MPI (mpi4py)",
}
_OVERRIDE = (
    "--coordinator-address host:port, --num-processes N and --process-id I (coordinator_address=, "
    "num_processes=, process_id=) override the detected settings; --num-processes 1 runs one "
    "process alone"
)


@dataclasses.dataclass(frozen=True)
class _Setting:
    value: object
    source: str  # "argument", "$NAME" (an environment variable) or a cluster's name

    def describe(self, key: str) -> str:
        if self.source == "argument":
            return f"{_FLAGS[key]} {self.value} ({key}={self.value!r})"
        if self.source.startswith("$"):
            return f"{self.source[1:]}={self.value}"
        return f"the {self.source} launch's {_LABELS[key]} {self.value}"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: float = DEFAULT_INITIALIZATION_TIMEOUT,
    local_device_ids: Sequence[int] | None = None,
    detect_cluster: bool = True,
) -> bool:
    """Starts JAX's distributed runtime when this process is one of several; returns whether it did.

    Each setting comes from the first of: the argument (the experiment's
    ``--coordinator-address``, ``--num-processes``, ``--process-id``); the environment variable
    ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID``
    (kd_jax's older ``KD_JAX_COORDINATOR``, ``KD_JAX_NUM_PROCESSES``, ``KD_JAX_PROCESS_ID``
    also work); the cluster launcher JAX detects (Slurm ``srun``, Open MPI ``mpirun``,
    Kubernetes, Cloud TPU pods), which fills whatever is still unset. One process, from
    ``num_processes=1``, a launcher that started one task, or no settings and no launcher, is
    a no-op, as is a call after the runtime started.

    Before JAX connects, the processes meet at the coordinator's address, so a process that
    never arrives ends the others after ``initialization_timeout`` seconds with a message
    naming the missing process ids (JAX itself aborts without saying which). Call this before
    any other JAX call that touches devices.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: the number of processes, >= 1.
      process_id: this process, ``0 <= process_id < num_processes``.
      initialization_timeout: seconds to wait for every process to arrive (and again for
        JAX's own connection).
      local_device_ids: the local devices this process uses; default ``JAX_LOCAL_DEVICE_IDS``,
        else JAX's choice (one GPU per task under Slurm and Open MPI, else all).
      detect_cluster: whether to ask JAX's cluster detection for unset settings.

    Raises:
      ValueError: a malformed or inconsistent setting; the message names the flag or variable.
      DistributedInitError: a launch was detected or requested, but its processes did not
        start as one (one never arrived, the coordinator was unreachable, the launcher's
        settings could not be read, or JAX failed).
    """
    if jax.distributed.is_initialized():
        return False
    if not initialization_timeout > 0:
        raise ValueError(
            f"initialization_timeout must be positive seconds, got {initialization_timeout!r}"
        )
    settings = _given_settings(coordinator_address, num_processes, process_id)
    _check_settings(settings)
    if _value(settings, "num_processes") == 1:
        return False  # Explicitly one process: no launcher is consulted.
    if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [_env_int("JAX_LOCAL_DEVICE_IDS", part) for part in
                            os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    cluster = _detect_cluster() if detect_cluster else None
    if cluster is not None:
        settings, local_device_ids = _settings_from_cluster(
            cluster, settings, local_device_ids, initialization_timeout)
        _check_settings(settings)
    elif not settings:
        return False
    _require_complete(settings)
    address = _value(settings, "coordinator_address")
    count = _value(settings, "num_processes")
    index = _value(settings, "process_id")
    if count == 1:
        return False
    who = f"kd_jax: process {index} of {count}" + (
        f" of a {_cluster_name(cluster)} launch" if cluster is not None else "")
    hint = _OVERRIDE if cluster is not None else (
        "check --coordinator-address, --num-processes and --process-id (coordinator_address=, "
        "num_processes=, process_id=)")
    _rendezvous(address, count, index, initialization_timeout, who, hint)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            local_device_ids=local_device_ids,
            cluster_detection_method="deactivate",  # Already done above.
            initialization_timeout=max(1, int(np.ceil(initialization_timeout))),
        )
    except Exception as err:
        raise DistributedInitError(
            f"{who}: jax.distributed.initialize failed ({_one_line(err)}); {hint}"
        ) from err
    return True


def _given_settings(coordinator_address, num_processes, process_id) -> dict[str, _Setting]:
    """The arguments given, else the environment's values, by key; unset keys are absent."""
    settings = {}
    for key, value in [("coordinator_address", coordinator_address),
                       ("num_processes", num_processes), ("process_id", process_id)]:
        if value is not None:
            settings[key] = _Setting(value, "argument")
            continue
        for name in _ENV[key]:
            raw = os.environ.get(name, "").strip()
            if raw:
                value = raw if key == "coordinator_address" else _env_int(name, raw)
                settings[key] = _Setting(value, f"${name}")
                break
    return settings


def _env_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _value(settings: dict[str, _Setting], key: str):
    setting = settings.get(key)
    return None if setting is None else setting.value


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_settings(settings: dict[str, _Setting]) -> None:
    """Raises ValueError, naming the flag or variable, for a malformed or inconsistent value."""
    address = settings.get("coordinator_address")
    if address is not None:
        match = _ADDRESS.match(address.value) if isinstance(address.value, str) else None
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ValueError(
                f"coordinator address {address.describe('coordinator_address')} is not host:port "
                "with a port in 1-65535 (e.g. 10.0.0.1:1234, node001:1234 or [::1]:1234)"
            )
    count = settings.get("num_processes")
    if count is not None and not (_is_int(count.value) and count.value >= 1):
        raise ValueError(
            f"process count {count.describe('num_processes')} must be an integer >= 1"
        )
    index = settings.get("process_id")
    if index is not None and not (_is_int(index.value) and index.value >= 0):
        raise ValueError(f"process id {index.describe('process_id')} must be an integer >= 0")
    if index is not None and count is not None and index.value >= count.value:
        raise ValueError(
            f"process id {index.describe('process_id')} is out of range for process count "
            f"{count.describe('num_processes')}: process ids run from 0 to {count.value - 1}"
        )


def _require_complete(settings: dict[str, _Setting]) -> None:
    """Raises ValueError naming what is missing when no launcher could fill it in."""
    given = " and ".join(s.describe(k) for k, s in settings.items())
    nothing_detected = ("no cluster launcher (Slurm, Open MPI, Kubernetes, Cloud TPU) was "
                        "detected to supply the rest")
    if "coordinator_address" not in settings:
        raise ValueError(
            f"{given} was given without a coordinator address, and {nothing_detected}; pass "
            "--coordinator-address host:port (coordinator_address=) or set "
            "JAX_COORDINATOR_ADDRESS, or --num-processes 1 to run one process"
        )
    for key, variable in [("num_processes", "JAX_NUM_PROCESSES"),
                          ("process_id", "JAX_PROCESS_ID")]:
        if key not in settings:
            raise ValueError(
                f"{given} was given without a {_LABELS[key]}, and {nothing_detected}; pass "
                f"{_FLAGS[key]} ({key}=) or set {variable}"
            )


def _detect_cluster():
    """The JAX cluster environment (a ``ClusterEnv`` subclass) this process runs in, or None.

    The same choice as ``jax.distributed.initialize()`` without arguments: the first
    registered environment, opt-in ones (mpi4py) excepted, whose variables are present.
    """
    try:  # JAX has no public API for detection alone.
        from jax._src import clusters

        environments = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        return None
    for environment in environments:
        if getattr(environment, "opt_in_only_method", False):
            continue
        try:
            if environment.is_env_present():
                return environment
        except Exception:  # A broken probe (e.g. an unreachable TPU metadata server) is no launch.
            continue
    return None


def _cluster_name(cluster) -> str:
    return _CLUSTER_NAMES.get(cluster.__name__, getattr(cluster, "name", "") or cluster.__name__)


def _settings_from_cluster(cluster, settings, local_device_ids, timeout):
    """Fills unset settings (and the local devices) from the detected launcher, as JAX would."""
    name = _cluster_name(cluster)
    try:
        address, count, index, local_device_ids = cluster.auto_detect_unset_distributed_params(
            _value(settings, "coordinator_address"),
            _value(settings, "num_processes"),
            _value(settings, "process_id"),
            local_device_ids,
            None,
            max(1, int(np.ceil(timeout))),
        )
    except Exception as err:
        raise DistributedInitError(
            f"kd_jax: detected a {name} launch, but reading its process layout failed "
            f"({_one_line(err)}); {_OVERRIDE}"
        ) from err
    filled = dict(settings)
    for key, value in [("coordinator_address", address), ("num_processes", count),
                       ("process_id", index)]:
        if key not in filled and value is not None:
            filled[key] = _Setting(value, name)
    return filled, local_device_ids
