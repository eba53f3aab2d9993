"""Per-seed and timing tables of a finished protocol run, from its files alone.

    python experiments/protocol_report.py results/cifar10-cpu

Reads ``results.json`` and ``metrics.jsonl`` in the directory and prints Markdown: each method's
accuracy per seed with its difference to the baseline of the same seed, whether every distilled
seed beats its baseline, the test accuracy after the first epoch, the pass's wall time per
epoch (training and evaluation), and each student's loss terms in its first and last epoch. The protocol READMEs quote these tables.
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def report(directory: str) -> str:
    with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
    records = []
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    students = results["students"]
    base = {s["seed"]: s["test_accuracy"] for s in students if s["method"] == "none"}
    lines = ["| method | seed | test accuracy (%) | baseline, same seed (%) | difference |",
             "|---|---|---|---|---|"]
    verdicts = {}
    for s in students:
        b = base.get(s["seed"])
        diff = "—" if s["method"] == "none" or b is None else \
            f"{100 * (s['test_accuracy'] - b):+.2f}"
        if s["method"] != "none" and b is not None:
            verdicts.setdefault(s["method"], []).append(s["test_accuracy"] > b)
        lines.append(f"| {s['method']} | {s['seed']} | {100 * s['test_accuracy']:.2f} | "
                     f"{'—' if b is None else f'{100 * b:.2f}'} | {diff} |")
    lines.append("")
    for method, wins in verdicts.items():
        lines.append(f"- {method} beats the baseline of the same seed on {sum(wins)} of "
                     f"{len(wins)} seeds.")
    epochs = [r for r in records if r.get("kind") == "epoch" and r.get("phase", "").startswith(
        "students")]
    first = {r["student"]: r["test_accuracy"] for r in epochs if r["epoch"] == 1}
    if first:
        lines.append("- After the first epoch: " + ", ".join(
            f"{name} {100 * acc:.1f}%" for name, acc in first.items()) + ".")
    times = {}
    for r in epochs:
        times.setdefault(r["epoch"], r["epoch_time_s"])
    if times:
        per_epoch = ", ".join(f"{e}: {t / 60:.1f}" for e, t in sorted(times.items()))
        lines.append(f"- Training time per epoch of the pass (min): {per_epoch}; median "
                     f"{statistics.median(times.values()) / 60:.1f} min, total "
                     f"{sum(times.values()) / 60:.0f} min (evaluation excluded).")
    lines += _terms_table(epochs)
    t = results["teacher"]
    lines.append(f"- Teacher: {t['arch']} from {t.get('source') or 'training'}, "
                 f"{100 * t['test_accuracy']:.2f}% measured in the run"
                 + (f" (published {100 * t['published_accuracy']:.2f}%)"
                    if t.get("published_accuracy") else "") + ".")
    return "\n".join(lines) + "\n"


def _terms_table(epochs: list[dict]) -> list[str]:
    """Each student's loss terms (weighted parts, epoch means) in the first and last epoch."""
    by_student: dict[str, list[dict]] = {}
    for r in epochs:
        if r.get("terms"):
            by_student.setdefault(r["student"], []).append(r)
    if not by_student:
        return []
    out = ["", "Loss terms (weighted parts of the training loss, epoch means):", "",
           "| student | term | first epoch | last epoch | change |", "|---|---|---|---|---|"]
    for student, recs in by_student.items():
        recs = sorted(recs, key=lambda r: r["epoch"])
        first, last = recs[0], recs[-1]
        for term, a in first["terms"].items():
            b = last["terms"].get(term, float("nan"))
            change = f"{100 * (b - a) / abs(a):+.0f}%" if a else "—"
            out.append(f"| {student} | {term} | {a:.4g} | {b:.4g} | {change} |")
    out.append("")
    return out


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else "."))
