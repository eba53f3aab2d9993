"""Orbax checkpoints of train states: the last k, the best by a metric, atomic, with fallback.

A checkpoint holds one pytree (any nesting of train states, e.g. the K students of a
many-student pass) plus a small JSON document of metadata (epoch, history, config).
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. Orbax's compressed chunks carry no
checksum, so every save also records a SHA-256 of all arrays (in order, with their paths,
dtypes and shapes) in the metadata, and every restore recomputes and compares it: bit rot is
a corrupt checkpoint, not a silently wrong model. If the newest checkpoint cannot be read
or fails that check, :meth:`Checkpointer.restore` warns, moves it aside into
``<directory>/corrupt/`` (kept for inspection; the step can then be saved again) and falls
back to the one before; with none readable it warns and returns ``None`` (start afresh).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

__all__ = ["Checkpointer", "CorruptCheckpointError", "load_meta", "load_variables",
           "save_variables", "tree_digest", "variables_digest"]

_DIGEST_KEY = "_kd_jax_sha256"


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays do not match the digest recorded when it was saved."""


def tree_digest(tree: Any) -> str:
    """SHA-256 over every array of ``tree``: path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _verified(tree: Any, meta: dict[str, Any], where: str) -> dict[str, Any]:
    """``meta`` without the digest, after checking ``tree`` against it (checkpoints written
    before digests were recorded are accepted as they are)."""
    meta = dict(meta)
    expected = meta.pop(_DIGEST_KEY, None)
    if expected is not None and tree_digest(tree) != expected:
        raise CorruptCheckpointError(f"the arrays in {where} do not match the SHA-256 recorded "
                                     "when it was saved (bit rot or a modified file)")
    return meta


class _WorkerErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_worker_errors():
    """Drops Orbax's "<thread>.run() raised an exception" log records (the same error is
    raised in the calling thread)."""
    logger, quiet = logging.getLogger("absl"), _WorkerErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Checkpointer:
    """Saves and restores ``(tree, meta)`` pairs under ``directory``, one per step.

    Keeps the ``max_to_keep`` newest steps and, when ``best_metric`` is given, also the
    step with the highest value of that metric (e.g. ``"test_accuracy"``).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 best_metric: str | None = "test_accuracy"):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        policies = [pp.LatestN(n=max_to_keep)]
        if best_metric is not None:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: Any, *, meta: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
        """Writes ``tree`` and ``meta`` (JSON-serialisable) as ``step``; blocks until durable."""
        meta = {**meta, _DIGEST_KEY: tree_digest(tree)}
        # A failed write (e.g. a full disk) is raised here; Orbax's worker threads also log it
        # with their tracebacks, which would bury the caller's one-line report.
        with _quiet_worker_errors():
            self._manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                        meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,
            )
            self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None
                ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores into the structure, dtypes and shardings of ``target``.

        ``target`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves. With ``step=None``
        the newest readable step is used: a newest checkpoint that fails to load (corrupt,
        truncated, or not matching its recorded digest) is reported with a warning, moved
        aside into ``<directory>/corrupt/`` and the previous one is tried. Returns
        ``(step, tree, meta)``, or ``None`` (with a warning if some were unreadable) when
        there is no readable checkpoint.
        """
        abstract = jax.tree.map(_abstract, target)
        steps = [step] if step is not None else self.all_steps()[::-1]
        bad = []
        for s in steps:
            try:
                restored = self._manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               meta=ocp.args.JsonRestore()))
                if not isinstance(restored["meta"], dict):
                    raise CorruptCheckpointError(f"step {s}'s metadata is not a JSON object")
                meta = _verified(restored["state"], restored["meta"],
                                 f"step {s} of {self.directory}")
            except Exception as err:  # noqa: BLE001 — any read failure means "not usable"
                if step is not None:
                    raise
                moved = self._move_aside(s)
                warnings.warn(f"checkpoint step {s} in {self.directory} could not be read "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                              f"moved it to {moved}; trying an older one.")
                bad.append(s)
                continue
            return s, restored["state"], meta
        if bad:
            warnings.warn(f"no readable checkpoint in {self.directory} (steps {bad} moved to "
                          f"{os.path.join(self.directory, 'corrupt')}); starting afresh.")
        return None

    def _move_aside(self, step: int) -> str:
        """Renames step ``step`` out of the manager's view, so that it can be saved again."""
        target = os.path.join(self.directory, "corrupt",
                              f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = os.path.join(self.directory, str(step))
            if os.path.exists(source):
                os.replace(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"kd_jax_checkpoint_moved_{step}")
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def save_variables(directory: str | os.PathLike, variables: Any, meta: dict[str, Any]) -> None:
    """Writes a model's ``variables`` (params, batch_stats) and a JSON ``meta`` (arch,
    num_classes, dataset, accuracy …) as one self-describing Orbax checkpoint: what
    ``--teacher-checkpoint`` reads. Replaces an existing one atomically."""
    directory = os.path.abspath(os.fspath(directory))
    meta = {**meta, _DIGEST_KEY: tree_digest(variables)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
            force=True)


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON ``meta`` of a :func:`save_variables` checkpoint (no arrays are read)."""
    meta = _raw_meta(directory)
    meta.pop(_DIGEST_KEY, None)
    return meta


def _raw_meta(directory) -> dict[str, Any]:
    with open(os.path.join(os.fspath(directory), "meta", "metadata")) as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"the metadata of {directory} is not a JSON object")
    return meta


def load_variables(directory: str | os.PathLike, target: Any | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """Reads ``(variables, meta)`` written by :func:`save_variables`; with ``target`` (a
    tree of arrays or ``ShapeDtypeStruct``) the arrays take its structure and shardings."""
    directory = os.path.abspath(os.fspath(directory))
    restore = (ocp.args.StandardRestore(jax.tree.map(_abstract, target))
               if target is not None else ocp.args.StandardRestore())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(
            variables=restore, meta=ocp.args.JsonRestore()))
    return out["variables"], _verified(out["variables"], out["meta"], directory)


def variables_digest(directory: str | os.PathLike) -> str | None:
    """The SHA-256 of the arrays recorded when :func:`save_variables` wrote ``directory``
    (``None`` for checkpoints written before digests were recorded); no arrays are read."""
    return _raw_meta(directory).get(_DIGEST_KEY)
