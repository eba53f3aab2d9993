"""Orbax checkpoints of train states: the last k, the best by a metric, atomic, with fallback.

A checkpoint holds one pytree (any nesting of train states, e.g. the K students of a
many-student pass) plus a small JSON document of metadata (epoch, history, config).
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. If the newest checkpoint cannot be
read, :meth:`Checkpointer.restore` warns and falls back to the one before it.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

__all__ = ["Checkpointer", "load_meta", "load_variables", "save_variables"]


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
        the newest readable step is used: a newest checkpoint that fails to load (corrupt or
        truncated) is reported with a warning and the previous one is tried. Returns
        ``(step, tree, meta)``, or ``None`` when there is no readable checkpoint.
        """
        abstract = jax.tree.map(_abstract, target)
        steps = [step] if step is not None else self.all_steps()[::-1]
        for s in steps:
            try:
                restored = self._manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 — any read failure means "not usable"
                if step is not None:
                    raise
                warnings.warn(f"checkpoint step {s} in {self.directory} could not be read "
                              f"({type(err).__name__}: {str(err)[:200]}); trying an older one.")
                continue
            return s, restored["state"], dict(restored["meta"])
        return None

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
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
            force=True)


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON ``meta`` of a :func:`save_variables` checkpoint (no arrays are read)."""
    path = os.path.join(os.fspath(directory), "meta", "metadata")
    with open(path) as f:
        return json.load(f)


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
    return out["variables"], dict(out["meta"])
