"""Test accuracy of every shipped teacher on the full published CIFAR test set.

    python experiments/eval_pretrained.py [--data-dir ~/tensorflow_datasets] [--out results/pretrained]

Each teacher is loaded with :func:`kd_jax.pretrained.load` and evaluated with its own input
preprocessing on all 10,000 test images, which must be the published CIFAR-10/100 (built as
``../shared/README.md`` explains; never the JPEG copy in ``../shared/tfds``, on which these
models lose about 10 points). Writes ``results.json`` and ``results.md`` (published vs kd_jax)
to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evaluate(name: str, data_dir: str | None, batch_size: int = 500) -> dict:
    import jax
    import numpy as np
    import optax
    from kd_jax import data, loop, parallel, pretrained, train

    dataset, arch = name.split("/")
    model, variables, preprocess = pretrained.load(arch, dataset=dataset)
    meta = pretrained.info(arch, dataset=dataset)
    images, labels = data.load_arrays(dataset, "test", data_dir=data_dir)
    mesh = parallel.make_mesh()
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=optax.identity())
    t0 = time.perf_counter()
    (ev,) = loop.make_evaluator(mesh, images=images, labels=labels, batch_size=batch_size,
                                dataset=dataset, preprocess=preprocess)(
        loop.replicate((state,), mesh))
    correct = int(round(ev["test_accuracy"] * len(labels)))
    return {"name": name, "arch": arch, "dataset": dataset, "shortcut": meta["shortcut"],
            "published_accuracy": meta["published_accuracy"],
            "test_accuracy": ev["test_accuracy"], "correct": correct, "count": int(len(labels)),
            "difference_points": 100 * (ev["test_accuracy"] - meta["published_accuracy"]),
            "normalization": meta["normalization"]["name"], "origin": meta["source"]["origin"],
            "source_sha256": meta["source"]["sha256"], "params": meta["params"],
            "eval_time_s": time.perf_counter() - t0,
            "test_labels_per_class_min": int(np.bincount(labels).min()),
            "device": jax.devices()[0].device_kind}


def table(rows: list[dict]) -> str:
    lines = ["| Teacher | Dataset | Shortcut | Published top-1 (%) | kd_jax top-1 (%) | Difference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `pretrained:{r['name']}` | {r['dataset']} | {r['shortcut']} | "
                     f"{100 * r['published_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} "
                     f"({r['correct']}/{r['count']}) | {round(r['difference_points'], 2) + 0.0:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir holding the published cifar10/cifar100 (default: "
                        "$TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    p.add_argument("--out", default="results/pretrained", help="where results.json/md go")
    args = p.parse_args(argv)
    from kd_jax import data, pretrained
    if args.data_dir and os.path.abspath(args.data_dir).rstrip("/").endswith("shared/tfds"):
        print("eval_pretrained.py: error: ../shared/tfds is the JPEG copy of CIFAR-10; build the "
              "published data (../shared/README.md) and pass its data dir.", file=sys.stderr)
        return 2
    try:
        rows = [evaluate(name, args.data_dir) for name in pretrained.available()]
    except data.DataNotFoundError as err:
        print(f"eval_pretrained.py: error: {err}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"teachers": rows, "machine": platform.processor() or platform.machine()},
                  f, indent=2)
    md = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
