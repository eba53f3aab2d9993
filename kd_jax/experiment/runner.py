"""``run(config, workdir)``: the whole experiment in one call."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

from kd_jax.experiment.config import ConfigError, ExperimentConfig
from kd_jax.experiment.plan import split_passes, student_jobs, validate
from kd_jax.experiment.report import Results, plot_curves, summarise
from kd_jax.experiment.workdir import (DiskFullError, acquire_lock, check_not_locked,
                                       disk_full_message, ensure_writable, is_disk_full,
                                       read_json_or_none, write_json)

__all__ = ["default_workdir", "preflight", "run", "stored_results"]


def default_workdir(config: ExperimentConfig) -> str:
    """``runs/<dataset>_<teacher>_<student>``."""
    return os.path.join("runs", f"{config.data.dataset}_{config.run.teacher}_"
                                f"{config.run.student}")


def preflight(config: ExperimentConfig, workdir: str | None = None) -> str:
    """Every check that needs no device and writes nothing: the configuration, the workdir's
    lock, the data directory. Returns the workdir. Raises :class:`ConfigError`."""
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig (see kd_jax.experiment.configure), "
                        f"got {type(config).__name__}.")
    validate(config)
    if config.run.teacher_checkpoint:
        _check_teacher_matches(config)
    workdir = workdir or default_workdir(config)
    check_not_locked(workdir)
    data_dir = config.data.data_dir
    if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
        raise ConfigError(f"--data-dir {data_dir} does not exist; pass the directory that holds "
                          "prepared TFDS datasets (e.g. ../shared/tfds), or omit it to use "
                          "$TFDS_DATA_DIR or ~/tensorflow_datasets.")
    return workdir


def _check_teacher_matches(config: ExperimentConfig) -> None:
    from kd_jax import data, pretrained
    spec = config.run.teacher_checkpoint
    try:
        meta = pretrained.teacher_meta(spec)
    except ValueError as err:
        raise ConfigError(f"--teacher-checkpoint {err}") from err
    classes = data.num_classes(config.data.dataset)
    if meta.get("arch") != config.run.teacher or meta.get("num_classes") != classes:
        raise ConfigError(
            f"--teacher-checkpoint {spec!r} holds a {meta.get('arch')} with "
            f"{meta.get('num_classes')} classes, but this run's teacher is {config.run.teacher} "
            f"with {classes} classes ({config.data.dataset}); pass --teacher {meta.get('arch')} "
            "and the matching --dataset, or another checkpoint.")


def stored_results(config: ExperimentConfig, workdir: str) -> Results | None:
    """The stored results if every phase of this exact configuration has finished."""
    stored = read_json_or_none(os.path.join(workdir, "results.json"))
    if not isinstance(stored, dict) or "config" not in stored:
        return None
    import json
    if stored["config"] != json.loads(json.dumps(dataclasses.asdict(config))):
        return None
    if config.run.teacher_checkpoint:
        from kd_jax import pretrained
        digest = stored.get("teacher", {}).get("checkpoint_sha256")
        if digest != pretrained.checkpoint_digest(
                pretrained.teacher_dir(config.run.teacher_checkpoint)):
            return None  # the checkpoint at that path changed: the stored students are stale
    return dataclasses.replace(Results.from_json(stored, workdir), reused=True)


def run(config: ExperimentConfig, workdir: str | None = None, *,
        writers: Sequence[Any] | None = None, progress: bool = True,
        hooks: Sequence[Callable[[dict], None]] = ()) -> Results:
    """Runs the experiment of ``config`` in ``workdir`` and returns its :class:`Results`.

    The teacher phase (trained from labels, reused when this configuration's teacher
    finished, or loaded from ``config.run.teacher_checkpoint``), the student passes (the
    baseline and every method, ``seeds`` each, K per compiled step), then the report:
    ``results.json``, ``results.md``, ``metrics.jsonl``, ``curves.png``, ``log.txt`` and
    ``config.json`` in ``workdir`` (default ``runs/<dataset>_<teacher>_<student>``). Calling
    it again resumes where it stopped (bit-identical on CPU) and skips finished phases; a
    finished run returns its stored results at once (``Results.reused``).

    ``writers``: extra metric writers (:mod:`kd_jax.writers`; CLU's contract) that receive
    every record ``metrics.jsonl`` gets and every log line; they are flushed, not closed.
    ``hooks``: callables run with every record (a raising hook stops the run; the last
    checkpoint is kept). Multi-host: call :func:`kd_jax.parallel.maybe_initialize_distributed`
    first; writers run on process 0 only.

    Raises :class:`ConfigError` for a mistake in the configuration or its environment
    (before anything is written), :class:`kd_jax.data.DataNotFoundError`,
    :class:`kd_jax.loop.NonFiniteLossError`, or :class:`DiskFullError` (one line naming the
    workdir; rerunning resumes once space is freed).
    """
    workdir = preflight(config, workdir)
    import jax

    from kd_jax import parallel
    try:
        parallel.check_batch_size(config.data.batch_size, parallel.make_mesh())
    except ValueError as err:
        raise ConfigError(str(err)) from err
    stored = stored_results(config, workdir)
    if stored is not None:
        return stored
    ensure_writable(workdir)
    lead = jax.process_index() == 0
    lock = acquire_lock(workdir) if lead else None
    session = None
    try:
        if lead:  # what this invocation runs; --config config.json reruns it
            write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(config))
        own, jsonl = _own_writers(workdir) if lead else ([], None)
        from kd_jax.experiment.phases import Session
        session = Session(config, workdir, writers=own + (list(writers or []) if lead else []),
                          hooks=hooks, progress=progress, jsonl=jsonl)
        try:
            results = _run(session)
        finally:
            for w in session.writers:
                w.flush()
            for w in own:
                w.close()
        return results
    except (OSError, ValueError, RuntimeError) as err:
        if is_disk_full(err):
            need = session.checkpoint_bytes if session is not None else 0
            raise DiskFullError(disk_full_message(workdir, need)) from err
        raise
    finally:
        if lock is not None:
            lock.close()


def _own_writers(workdir: str):
    from kd_jax.writers import JsonlWriter, TensorBoardWriter, TextWriter
    jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    own = [jsonl, TextWriter(os.path.join(workdir, "log.txt"))]
    try:
        own.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    except ImportError:
        pass  # the [tensorboard] extra is optional
    return own, jsonl


def _run(session) -> Results:
    import jax
    c = session.c
    jobs = student_jobs(c)
    session.say(f"kd_jax: {c.data.dataset} {c.run.teacher} -> {c.run.student} on "
                f"{session.devices} {session.platform} device(s), {session.dtype.name}; "
                f"workdir {session.workdir}")
    stored_teacher = session.stored_teacher()
    if c.run.teacher_checkpoint:
        teacher_plan = f"load {c.run.teacher_checkpoint}"
    elif stored_teacher is not None:
        teacher_plan = (f"reuse {c.run.teacher} trained for {c.teacher_epochs_} epochs in "
                        f"{session.teacher_dir()}")
    else:
        teacher_plan = f"train {c.run.teacher} for {c.teacher_epochs_} epochs"
    session.say(f"plan: teacher: {teacher_plan}; students: {len(jobs)} x {c.run.student} "
                f"({', '.join(f'{m}/seed{s}' for m, s in jobs)}) for {c.schedule.epochs} "
                f"epochs in {len(split_passes(jobs, c.run.max_parallel_students))} pass(es)")
    teacher = session.teacher_phase()
    students = session.student_phase(teacher)
    summary = summarise(c, teacher, students)
    results = Results(dataset=summary["dataset"], teacher=summary["teacher"],
                      students=summary["students"], config=c, objectives=summary["objectives"],
                      teacher_checkpoint=c.run.teacher_checkpoint,
                      devices=f"{session.devices} x {session.device_kind}",
                      workdir=session.workdir)
    if jax.process_index() == 0:
        wd = session.workdir
        teacher_hist = None
        if not c.run.teacher_checkpoint:
            teacher_hist = read_json_or_none(os.path.join(session.teacher_dir(), "history.json"))
        plot_curves(os.path.join(wd, "curves.png"), teacher_hist, students)
        with open(os.path.join(wd, "results.md"), "w") as f:
            f.write(results.table())
        write_json(os.path.join(wd, "results.json"), results.to_json())
    return results
