"""The epoch loop: jitted steps over sharded batches, evaluation, logging, checkpoints, resume.

:func:`fit` trains a tuple of K train states with one compiled step per batch (K=1 for a
teacher or a single student; K>1 for students distilled together). Metrics stay on the
device and are fetched once per log interval, so the host never waits on a step. A
checkpoint is written at the end of every ``checkpoint_every`` epochs, after the epoch's
losses were checked to be finite; the step count in it fixes where the data stream resumes,
so an interrupted run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import data, train
from kd_jax.writers import emit
from kd_jax.checkpoint import Checkpointer
from kd_jax.objectives import Objective

__all__ = ["FitResult", "NonFiniteLossError", "fit", "make_distill_step", "make_evaluator",
           "make_supervised_step", "replicate"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class FitResult:
    states: tuple[train.TrainState, ...]
    history: list[list[dict[str, float]]]  # per student, one record per epoch
    train_time_s: float
    resumed_from_step: int


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on all devices of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def make_supervised_step(mesh: Mesh, *, dataset: str) -> Callable:
    """``(states, batch) -> (states, metrics[K])`` for supervised training, jitted, donating."""

    def step(states, batch):
        new_states, metrics = [], []
        for state in states:
            s, m = train.train_step(state, batch, dataset=dataset)
            new_states.append(s)
            metrics.append(m)
        return tuple(new_states), jax.tree.map(lambda *x: jnp.stack(x), *metrics)

    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def make_distill_step(mesh: Mesh, *, objectives: Sequence[Objective], teacher_apply,
                      dataset: str, steps_per_epoch: int, impl: str = "auto",
                      teacher_preprocess=None) -> Callable:
    """``(states, teacher_variables, batch) -> (states, metrics[K])``, jitted, donating states.

    The teacher's variables are an argument (not baked into the program as constants) and
    are not donated: they are reused at every step. ``impl`` picks how the K student updates
    are expressed: ``"loop"`` (K graphs in one program, :func:`kd_jax.train.distill_step_many`)
    or ``"vmap"`` (one batched update, :func:`kd_jax.train.distill_step_vmap`; needs one
    shared objective and architecture). ``"auto"`` takes the one measured faster on the
    platform (``benchmarks/throughput.py``): the loop on CPU, where XLA's batched
    convolutions ran 2–3x slower than K separate ones; vmap on GPU/TPU when the students
    share their objective (on an H200 at batch 128, K=4: 12.2 ms against 13.0 ms).
    ``teacher_preprocess``: the teacher's own input normalisation (see
    :func:`kd_jax.train.distill_step_many`).
    """
    objectives = tuple(objectives)
    if impl == "auto":
        same = len(set(objectives)) == 1
        impl = "vmap" if same and len(objectives) > 1 and _platform(mesh) != "cpu" else "loop"
    if impl == "loop":
        step = partial(train.distill_step_many, objectives=objectives,
                       teacher_apply=teacher_apply, dataset=dataset,
                       steps_per_epoch=steps_per_epoch, teacher_preprocess=teacher_preprocess)
    elif impl == "vmap":
        if len(set(objectives)) != 1:
            raise ValueError("impl='vmap' needs every student to share one objective; "
                             "use impl='loop' for mixed objectives.")

        def step(states, teacher_variables, batch):
            stacked, metrics = train.distill_step_vmap(
                train.stack_states(states), teacher_variables, batch,
                objective=objectives[0], teacher_apply=teacher_apply, dataset=dataset,
                steps_per_epoch=steps_per_epoch, teacher_preprocess=teacher_preprocess)
            return train.unstack_states(stacked), metrics
    else:
        raise ValueError(f"unknown impl {impl!r}; choose 'auto', 'loop' or 'vmap'.")
    return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def _platform(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def make_evaluator(mesh: Mesh, *, images: np.ndarray | None = None,
                   labels: np.ndarray | None = None, batch_size: int, dataset: str,
                   preprocess=None, batches: Callable[[], Any] | None = None) -> Callable:
    """``evaluate(states) -> [{"test_accuracy", "test_loss"}, ...]``, one dict per state.

    Every test example counts exactly once (the last batch is padded and masked). The
    batches come from ``images``/``labels`` (:func:`kd_jax.data.eval_batches`) or, for data
    decoded on the host, from ``batches()``, a fresh iterator of ``{"image", "label",
    "mask"}`` batches per evaluation (e.g. :func:`kd_jax.hostdata.eval_batches`). A state
    may be anything with ``params``, ``batch_stats`` and ``apply_fn``; ``preprocess`` is
    the models' own input normalisation (default: ``dataset``'s).
    """
    if batches is None:
        if images is None or labels is None:
            raise ValueError("make_evaluator needs images and labels, or batches.")

        def batches():
            return data.eval_batches(images, labels, batch_size=batch_size, mesh=mesh)

    def sums(states, batch):
        out = [train.eval_step({"params": s.params, "batch_stats": s.batch_stats}, batch,
                               apply_fn=s.apply_fn, dataset=dataset, preprocess=preprocess)
               for s in states]
        return jax.tree.map(lambda *x: jnp.stack(x), *out)

    sums_jit = jax.jit(sums, out_shardings=NamedSharding(mesh, P()))

    def evaluate(states):
        total = None
        for batch in batches():
            s = sums_jit(states, batch)
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        total = jax.device_get(total)
        return [{"test_accuracy": float(total["correct"][k] / total["count"][k]),
                 "test_loss": float(total["loss_sum"][k] / total["count"][k])}
                for k in range(len(states))]

    return evaluate


def fit(states: Sequence[train.TrainState], step_fn: Callable, *, loader, epochs: int,
        evaluate: Callable, names: Sequence[str], phase: str,
        checkpointer: Checkpointer | None = None, checkpoint_every: int = 1,
        lr_fn: Callable[[int], float | Sequence[float]] | None = None, log_every: int = 50,
        writers: Sequence[Any] = (), hooks: Sequence[Callable[[dict], None]] = (),
        context: dict[str, Any] | None = None, progress: bool = True,
        meta: dict[str, Any] | None = None) -> FitResult:
    """Trains ``states`` (K of them, stepped together by ``step_fn``) for ``epochs`` epochs.

    ``step_fn(states, batch) -> (states, metrics)`` with ``metrics["loss"|"accuracy"]`` of
    shape ``[K]`` (and optionally ``metrics["terms"]``, one dict of loss parts per student,
    logged as each record's ``"terms"``); ``loader.epoch(e, start_step)`` yields the batches of epoch ``e``;
    ``evaluate(states)`` returns one ``{"test_accuracy", ...}`` per state. With a
    ``checkpointer`` the run resumes from its newest readable checkpoint and skips when
    already finished. ``lr_fn(step)`` gives the learning rate each record reports: one for
    all students, or a sequence of K (students whose schedules differ, e.g. a first stage's).

    Every log interval and every epoch, each student's record (see :mod:`kd_jax.writers`;
    ``context`` is merged into it, e.g. ``{"run": ...}``) goes to every writer of ``writers``
    (:func:`kd_jax.writers.emit`), then to every ``hook(record)``: periodic actions such as a
    time estimate or an interruption check (a hook that raises stops the run; the last
    checkpoint is kept). Raises :class:`NonFiniteLossError` on a NaN/inf loss, naming the step.
    """
    states = tuple(states)
    k = len(states)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = epochs * steps_per_epoch
    history: list[list[dict[str, float]]] = [[] for _ in range(k)]
    train_time = 0.0
    start = 0
    if checkpointer is not None:
        restored = checkpointer.restore(states)
        if restored is not None:
            start, states, saved = restored
            history, train_time = saved["history"], saved["train_time_s"]
    resumed_from = start
    context = dict(context or {})

    def log(record):
        record = {**record, **context}
        emit(writers, record)
        for hook in hooks:
            hook(record)

    bar = _progress_bar(progress and jax.process_index() == 0, phase, total_steps, start)

    step = start
    try:
        for epoch in range(start // steps_per_epoch, epochs):
            t_epoch = time.perf_counter()
            pending, sums, seen = [], np.zeros((2, k)), 0
            term_sums = [{} for _ in range(k)]
            t_interval, interval_start = time.perf_counter(), step
            batches = loader.epoch(epoch, start_step=step - epoch * steps_per_epoch)
            for batch in batches:
                states, metrics = step_fn(states, batch)
                pending.append(metrics)
                step += 1
                bar.update(1)
                end_of_epoch = step == (epoch + 1) * steps_per_epoch
                if len(pending) < log_every and not end_of_epoch:
                    continue
                fetched = jax.device_get(pending)
                losses = np.stack([m["loss"] for m in fetched])
                accs = np.stack([m["accuracy"] for m in fetched])
                _check_finite(losses, step - len(fetched), names, checkpointer)
                sums += [losses.sum(0), accs.sum(0)]
                seen += len(fetched)
                terms, ran = _interval_terms(fetched, k)
                for i in range(k):
                    for name, value in terms[i].items():
                        total, count = term_sums[i].get(name, (0.0, 0))
                        term_sums[i][name] = (total + value * ran[i][name], count + ran[i][name])
                now = time.perf_counter()
                rate = (step - interval_start) * loader.batch_size / max(now - t_interval, 1e-9)
                t_interval, interval_start, pending = now, step, []
                lr = lr_fn(step - 1) if lr_fn is not None else None
                lrs = ([float(x) for x in lr] if isinstance(lr, (list, tuple))
                       else [None if lr is None else float(lr)] * k)
                for i, name in enumerate(names):
                    log({"kind": "step", "phase": phase, "student": name, "epoch": epoch + 1,
                         "step": step, "loss": float(losses[:, i].mean()),
                         "accuracy": float(accs[:, i].mean()), "lr": lrs[i],
                         "images_per_s": rate, **({"terms": terms[i]} if terms[i] else {})})
                # Each student's own loss: their objectives differ, a mean would mix them.
                # With more than one term, its parts follow in brackets.
                per_student = " ".join(
                    f"{n} {v:.3f}" + (" [" + " ".join(f"{t} {x:.3g}" for t, x in terms[i].items())
                                      + "]" if len(terms[i]) > 1 else "")
                    for i, (n, v) in enumerate(zip(names, losses.mean(0))))
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} {rate:.0f} img/s loss "
                                    f"{per_student}")
            epoch_time = time.perf_counter() - t_epoch
            train_time += epoch_time
            results = evaluate(states)
            for i, name in enumerate(names):
                train_loss = float(sums[0, i] / max(seen, 1))
                # "loss"/"accuracy" of an epoch record: the epoch's mean training loss and
                # the test accuracy after it.
                record = {"kind": "epoch", "phase": phase, "student": name,
                          "epoch": epoch + 1, "step": step, "loss": train_loss,
                          "accuracy": results[i]["test_accuracy"], "train_loss": train_loss,
                          "train_accuracy": float(sums[1, i] / max(seen, 1)),
                          **results[i], "epoch_time_s": epoch_time,
                          "images_per_s": seen * loader.batch_size / epoch_time}
                if term_sums[i]:
                    record["terms"] = {t: v / n for t, (v, n) in term_sums[i].items()}
                history[i].append(record)
                log(record)
            if checkpointer is not None and ((epoch + 1) % checkpoint_every == 0
                                             or epoch + 1 == epochs):
                mean_acc = float(np.mean([r["test_accuracy"] for r in results]))
                checkpointer.save(step, states, metrics={"test_accuracy": mean_acc},
                                  meta={**(meta or {}), "history": history,
                                        "train_time_s": train_time, "epoch": epoch + 1})
    finally:
        bar.close()
    return FitResult(states=states, history=history, train_time_s=train_time,
                     resumed_from_step=resumed_from)


def _interval_terms(fetched: list[dict], k: int
                    ) -> tuple[list[dict[str, float]], list[dict[str, int]]]:
    """Each student's mean of every term over the fetched steps in which it ran, and that
    number of steps (``{}`` without terms). A term that did not run in a step (a first
    stage's terms after the stage, the objective's own during it) reports NaN there; a term
    that ran in none of the steps is left out. A NaN of a term that ran makes the loss NaN,
    which :func:`_check_finite` stops at."""
    out, counts = [], []
    for i in range(k):
        per_step = [m["terms"][i] for m in fetched if "terms" in m]
        names = per_step[0].keys() if per_step else ()
        means, ran = {}, {}
        for t in names:
            values = np.asarray([p[t] for p in per_step], np.float64)
            n = int(np.sum(~np.isnan(values)))
            if n:
                means[t], ran[t] = float(np.nansum(values) / n), n
        out.append(means)
        counts.append(ran)
    return out, counts


def _check_finite(losses: np.ndarray, first_step: int, names, checkpointer) -> None:
    bad = ~np.isfinite(losses)
    if not bad.any():
        return
    row, col = np.argwhere(bad)[0]
    kept = checkpointer.latest_step() if checkpointer is not None else None
    where = (f"the last good checkpoint (step {kept}) is kept in {checkpointer.directory}"
             if kept is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(
        f"non-finite loss ({losses[row, col]}) at step {first_step + row + 1} for "
        f"{names[col]}; training stopped and {where}. Lower the learning rate or check "
        "the inputs.")


def _progress_bar(enabled: bool, phase: str, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=phase, unit="step", dynamic_ncols=True,
                leave=True)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass
