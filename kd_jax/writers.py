"""Metric writers: one interface for ``metrics.jsonl``, TensorBoard, the text log and yours.

The interface is CLU's ``MetricWriter`` contract, without depending on ``clu`` (which imports
TensorFlow): ``write_scalars(step, scalars)``, ``write_texts(step, texts)``, ``flush()``,
``close()``. Any object with those four methods can be passed to
:func:`kd_jax.loop.fit` or :func:`kd_jax.experiment.run` (``writers=[...]``)::

    class PrintWriter:
        def write_scalars(self, step, scalars): print(step, scalars)
        def write_texts(self, step, texts): print(step, texts)
        def flush(self): pass
        def close(self): pass

The training loop produces *records*: one per log interval and student (``kind="step"``) and
one per epoch and student (``kind="epoch"``), each a flat dict of context (``phase``,
``student``, ``kind``, ``run``), counters (``epoch``, ``step``), scalars and, for objectives
with several terms, ``terms: {name: value}``. :func:`emit` hands a record to each writer:
writers with a ``write_record(record)`` method (the three below) get it whole; any other
writer gets ``write_scalars(step, scalars_of(record))``, every number of the record under
``"<phase>/<student>/<kind>/<name>"`` (terms as ``".../terms/<term>"``), so a custom writer
receives every scalar that ``metrics.jsonl`` gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["JsonlWriter", "MetricWriter", "TensorBoardWriter", "TextWriter", "emit",
           "scalars_of", "write_texts"]

_CONTEXT = ("kind", "phase", "student", "run")


@runtime_checkable
class MetricWriter(Protocol):
    """CLU's metric-writer contract: what :func:`emit` and :func:`write_texts` call."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """Every number of ``record`` keyed ``"<phase>/<student>/<kind>/<name>"`` (terms under
    ``.../terms/<term>``); ``step`` is the writer's step argument, not a scalar."""
    prefix = "/".join(str(record[k]) for k in ("phase", "student", "kind") if k in record)
    out = {}
    for name, value in record.items():
        if name in _CONTEXT or name == "step":
            continue
        if name == "terms" and isinstance(value, Mapping):
            out.update({f"{prefix}/terms/{t}": float(v) for t, v in value.items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{name}"] = value
    return out


def emit(writers: Iterable[Any], record: Mapping[str, Any]) -> None:
    """Hands ``record`` to every writer (see the module docstring)."""
    scalars = None
    for writer in writers:
        if hasattr(writer, "write_record"):
            writer.write_record(record)
        else:
            if scalars is None:
                scalars = scalars_of(record)
            writer.write_scalars(int(record["step"]), scalars)


def write_texts(writers: Iterable[Any], step: int, texts: Mapping[str, str]) -> None:
    for writer in writers:
        writer.write_texts(int(step), texts)


class JsonlWriter:
    """``metrics.jsonl``: one JSON object per record, appended; the source of truth."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def write_record(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.write_record({"step": step, **scalars})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass  # texts go to the text log

    def flush(self) -> None:
        pass  # every record is written and closed at once

    def close(self) -> None:
        pass

    def drop_after(self, phase: str, step: int, run: str) -> None:
        """Forgets the records of ``phase`` of the configuration ``run`` past ``step`` (written
        before an interruption, to be written again by the resumed run); records of other
        configurations and lines cut by a kill are dropped or kept accordingly."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not (rec.get("phase") == phase and rec.get("run") == run
                    and rec.get("step", 0) > step):
                keep.append(line)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)


class TensorBoardWriter:
    """Event files (tensorboardX, the ``[tensorboard]`` extra), one run directory per phase,
    configuration and student: ``<root>/<phase>_<run>/<student>``, so that ``tensorboard
    --logdir runs/`` shows each curve apart. Every number of a record is written as
    ``<kind>/<name>`` (``step/loss``, ``epoch/test_accuracy``, ``epoch/terms/kd``, ...)."""

    def __init__(self, root: str | os.PathLike):
        from tensorboardX import SummaryWriter  # ImportError without the extra
        self._writer_class = SummaryWriter
        self.root = os.fspath(root)
        self._writers: dict[tuple, Any] = {}

    def _writer(self, key: tuple):
        if key not in self._writers:
            path = os.path.join(self.root, f"{key[0]}_{key[1]}", str(key[2]).replace("/", "_"))
            self._writers[key] = self._writer_class(logdir=path)
        return self._writers[key]

    def write_record(self, record: Mapping[str, Any]) -> None:
        key = (record.get("phase"), record.get("run"), record.get("student"))
        writer = self._writer(key)
        kind = record.get("kind", "step")
        for name, value in record.items():
            if name == "terms" and isinstance(value, Mapping):
                for term, v in value.items():
                    writer.add_scalar(f"{kind}/terms/{term}", v, global_step=int(record["step"]))
            elif (name not in _CONTEXT and name not in ("step", "epoch")
                  and isinstance(value, int | float) and not isinstance(value, bool)):
                writer.add_scalar(f"{kind}/{name}", value, global_step=int(record["step"]))
        if record.get("kind") == "epoch":
            writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        writer = self._writer(("scalars", "", ""))
        for name, value in scalars.items():
            writer.add_scalar(name, value, global_step=step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass  # the text log holds them

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class TextWriter:
    """The human-readable log: every text to the terminal (above any progress bar) and to
    ``log.txt``; every epoch record as one summary line."""

    def __init__(self, path: str | os.PathLike | None, *, echo: bool = True):
        self.path = None if path is None else os.fspath(path)
        self.echo = echo

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for text in texts.values():
            self._line(text)

    def write_record(self, record: Mapping[str, Any]) -> None:
        if record.get("kind") == "epoch":
            self._line(epoch_line(record))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass  # numbers go to metrics.jsonl; epoch summaries come as records

    def _line(self, text: str) -> None:
        if self.echo:
            from tqdm.auto import tqdm
            tqdm.write(text)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text + "\n")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_line(record: Mapping[str, Any]) -> str:
    """One epoch record as the log's summary line."""
    terms = record.get("terms", {})
    return (f"[{record['phase']} {record['student']}] epoch {record['epoch']} "
            f"loss {record['train_loss']:.4f} train_acc {record['train_accuracy']:.4f} "
            f"test_acc {record['test_accuracy']:.4f} "
            f"{record['images_per_s']:.0f} img/s {record['epoch_time_s']:.1f}s"
            + (" (" + ", ".join(f"{t} {v:.4g}" for t, v in terms.items()) + ")"
               if len(terms) > 1 else ""))
