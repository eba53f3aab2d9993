"""The report of a run: ``Results`` (what ``results.json`` holds), the table, the curves."""

from __future__ import annotations

import dataclasses
import json
import statistics
from typing import Any

from kd_jax.experiment.config import ExperimentConfig, configure
from kd_jax.experiment.plan import student_jobs, student_objective

__all__ = ["Results", "plot_curves", "results_table", "summarise"]


@dataclasses.dataclass(frozen=True)
class Results:
    """A finished experiment, as Python objects: what ``results.json`` holds.

    ``teacher``: its architecture, test accuracy, parameters, training time and, for a loaded
    teacher, its source, published accuracy, normalisation and checkpoint digest.
    ``students``: one dict per (method, seed) with its test and best test accuracy,
    parameters, training time and throughput. ``config``: the :class:`ExperimentConfig` as
    run. ``objectives``: each method's objective with every value in effect (as dicts).
    ``workdir``: where the run's files are (``None`` when read from a file elsewhere).
    ``Results.from_json(json.load(open("results.json")))`` reads a stored run.
    """

    dataset: str
    teacher: dict[str, Any]
    students: list[dict[str, Any]]
    config: ExperimentConfig
    objectives: dict[str, Any]
    teacher_checkpoint: str | None = None
    devices: str | None = None
    workdir: str | None = None
    reused: bool = False  # True when a finished run's stored results were returned at once

    def to_json(self) -> dict[str, Any]:
        """The content of ``results.json`` (JSON types: tuples become lists)."""
        return json.loads(json.dumps({
            "dataset": self.dataset, "teacher": self.teacher, "students": self.students,
            "config": dataclasses.asdict(self.config), "objectives": self.objectives,
            "teacher_checkpoint": self.teacher_checkpoint, "devices": self.devices}))

    @classmethod
    def from_json(cls, obj: dict[str, Any], workdir: str | None = None) -> Results:
        settings = {k: v for section in obj["config"].values() for k, v in section.items()}
        return cls(dataset=obj["dataset"], teacher=obj["teacher"], students=obj["students"],
                   config=configure(ExperimentConfig(), **settings),
                   objectives=obj["objectives"],
                   teacher_checkpoint=obj.get("teacher_checkpoint"),
                   devices=obj.get("devices"), workdir=workdir)

    def accuracy(self, method: str) -> list[float]:
        """The test accuracies of ``method``'s students, by seed."""
        return [s["test_accuracy"] for s in self.students if s["method"] == method]

    def table(self) -> str:
        """The Markdown table (``results.md``)."""
        return results_table(self.to_json())


def summarise(config: ExperimentConfig, teacher: dict, students: list[dict]) -> dict:
    """``results.json`` without the run's context (teacher checkpoint, devices)."""
    return {
        "dataset": config.data.dataset,
        "teacher": {k: teacher.get(k) for k in ("arch", "test_accuracy", "params",
                                                "train_time_s")}
        | {k: teacher[k] for k in ("shortcut", "source", "origin", "published_accuracy",
                                   "checkpoint_sha256", "normalization") if k in teacher},
        "students": [{k: s[k] for k in ("arch", "method", "seed", "test_accuracy",
                                        "best_test_accuracy", "params", "train_time_s",
                                        "images_per_s")}
                     | {"students_in_pass": s.get("students_in_pass", 1)} for s in students],
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        # Each method's objective with the values in effect (presets and overrides resolved).
        "objectives": {m: student_objective(m, config).as_dict()
                       for m in dict.fromkeys(m for m, _ in student_jobs(config))},
    }


def results_table(results: dict) -> str:
    """The Markdown table of ``results``: method, accuracy mean ± std, gain over baseline."""
    by_method: dict[str, list[float]] = {}
    arch = {}
    for s in results["students"]:
        by_method.setdefault(s["method"], []).append(s["test_accuracy"])
        arch[s["method"]] = s["arch"]
    base = statistics.mean(by_method["none"]) if "none" in by_method else None
    t = results["teacher"]
    source = ""
    if t.get("source"):
        source = f" from `{t['source']}`"
        if t.get("published_accuracy"):
            source += f" (published {100 * t['published_accuracy']:.2f}%)"
    lines = [f"Teacher {t['arch']}{source}: {100 * t['test_accuracy']:.2f}% test accuracy "
             f"({results['dataset']}, measured in this run).", "",
             "| Method | Student | Test accuracy (%) | Gain over baseline | Seeds |",
             "|---|---|---|---|---|"]
    for method, accs in by_method.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = "baseline (none)" if method == "none" else method
        gain = "—" if method == "none" or base is None else f"{100 * (mean - base):+.2f}"
        lines.append(f"| {name} | {arch[method]} | {100 * mean:.2f} ± {100 * std:.2f} | "
                     f"{gain} | {len(accs)} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: str, teacher_hist: list[dict] | None, students: list[dict]) -> None:
    """``curves.png``: test accuracy and training loss per epoch of every model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("teacher", teacher_hist, "k")] if teacher_hist else []
    series += [(f"{s['method']} seed {s['seed']}", s.get("history", []), None) for s in students]
    for label, hist, color in series:
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in hist], label=label, color=color,
                    marker="o", markersize=3)
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], label=label, color=color,
                     marker="o", markersize=3)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss (objective)", title="Training loss",
                yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
