"""Mesh and shardings for data parallelism: ``jax.jit`` over a 1-D ``("data",)`` mesh.

Every batch array is split along its leading axis over the ``"data"`` axis
(:func:`batch_sharding`); parameters and optimiser state are replicated
(:func:`replicated`). The same code runs on one CPU, one GPU, several GPUs, or several
processes after :func:`maybe_initialize_distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch_size",
    "make_mesh",
    "maybe_initialize_distributed",
    "process_rows",
    "replicated",
]

DATA_AXIS = "data"

_ENV_COORDINATOR = "KD_JAX_COORDINATOR"
_ENV_NUM_PROCESSES = "KD_JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "KD_JAX_PROCESS_ID"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes).

    Devices are ordered by ``(process_index, id)``, so each process's devices form one
    contiguous block of the mesh and therefore one contiguous block of rows of every
    batch sharded with :func:`batch_sharding`.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device or None for all devices")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered), (DATA_AXIS,))


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

    With one process this is every row; over a :func:`make_mesh` mesh it is one contiguous
    range. It is the order ``jax.make_array_from_process_local_data`` expects the
    process-local rows in.
    """
    check_batch_size(global_batch_size, mesh)
    per_device = global_batch_size // mesh.size
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({index[0].indices(global_batch_size)[0] for index in indices.values()})
    return np.concatenate([np.arange(s, s + per_device, dtype=np.int64) for s in starts])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when a coordinator is given; returns whether it did.

    Arguments fall back to the environment variables ``KD_JAX_COORDINATOR`` (``host:port``),
    ``KD_JAX_NUM_PROCESSES`` and ``KD_JAX_PROCESS_ID``. Without a coordinator address this is
    a no-op (single process), as it is when JAX's distributed runtime is already initialised.
    It must run before any other JAX call that touches devices.
    """
    coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(_ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(_ENV_PROCESS_ID)
    if coordinator_address is None:
        if num_processes is not None or process_id is not None:
            raise ValueError(
                "num_processes/process_id were given without a coordinator address; pass "
                f"coordinator_address='host:port' or set {_ENV_COORDINATOR}"
            )
        return False
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
