"""Host input throughput of kd_jax.hostdata: decoded + augmented images/s against its levers.

    python benchmarks/pipeline.py                                   # generated 500x375 JPEGs
    python benchmarks/pipeline.py --workers 0,1,2,4,8 --images 4096
    python benchmarks/pipeline.py --folder /data/imagenet           # a folder:PATH's train split
    python benchmarks/pipeline.py --markdown results/benchmarks/pipeline_cpu.md

Without ``--folder`` it writes ``--images`` JPEGs of ``--size`` (quality 90, 1/f "photographs"
of about 115 KB at 500x375, near ImageNet's mean file) and ``--images // 8`` of ``--large-size``
into image folders under the temporary directory (kept and reused by later runs). Two parts:

1. One thread, no loader: wall and CPU milliseconds per image for a JPEG decode alone, the
   training transform (random-resized crop 224 + flip) with and without reduced-size decoding
   (``draft``), and the evaluation transform (resize 256 + centre crop 224). CPU time is the
   work's cost even when other work shares the cores: cores to feed a step of R images/s are
   about R x (CPU ms per image) / 1000.
2. ``HostLoader.epoch`` / ``eval_batches`` (process-local NumPy batches, or on the device mesh
   where the row says so): images/s after the first batch (``steady``; worker start-up and
   pipeline fill excluded), seconds to the first batch and the main process's CPU per image
   (all of the work with ``workers=0``; the hand-over alone with workers), for each lever: decode processes
   (``workers``), threads per process, ``prefetch`` and ``draft``. Rows are measured in
   interleaved rounds (``--repeats``), the median kept, so drifting machine load hits all rows.

Prints the tables (and writes them with the machine and the command to ``--markdown``); the
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kd_jax import hostdata, parallel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", help="an image folder (reads FOLDER/train); default: generated")
    p.add_argument("--images", type=int, default=1024, help="generated images of --size")
    p.add_argument("--size", default="500x375", help="generated image size, WxH")
    p.add_argument("--large-size", default="1600x1200",
                   help="size of the --images/8 large generated images (the draft rows)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated decode process counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--markdown", help="also write the tables here (with machine and command)")
    return p.parse_args(argv)


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """1/f noise, channels correlated: compresses like a photograph (~115 KB at 500x375, q90)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = 1.0 / f
    amplitude[0, 0] = 0.0
    shape = (height, width // 2 + 1)
    common = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    channels = [np.fft.irfft2((0.8 * common + 0.2 * (rng.normal(size=shape) + 1j * rng.normal(
        size=shape))) * amplitude, s=(height, width)) for _ in range(3)]
    x = np.stack(channels, -1)
    x = (x - x.mean()) / x.std()
    return np.clip(128 + 50 * x + rng.normal(0, 2, x.shape), 0, 255).astype(np.uint8)


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def generate(count: int, size: tuple[int, int], classes: int = 8) -> Path:
    """A folder:PATH of ``count`` JPEGs of ``size``, made once and reused (``PATH/done``)."""
    root = Path(tempfile.gettempdir()) / f"kd_jax-pipeline-{size[0]}x{size[1]}-{count}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / "train" / f"c{i % classes}" / f"{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(rng, *size)).save(path, format="JPEG", quality=90)
    (root / "done").write_text("complete\n")
    return root


def single_core(source, count: int = 64) -> dict[str, dict[str, float]]:
    """Milliseconds per image on one thread: wall and CPU time, medians of 5 interleaved
    passes over ``count`` images. CPU time is what the work costs when other work shares
    the cores; wall time is what it takes here."""
    items = [source.read(i) for i in range(min(count, len(source)))]
    rng = np.random.default_rng(0)

    def decode(d, w):
        with Image.open(io.BytesIO(d)) as image:
            image.convert("RGB")

    jobs = {
        "JPEG decode (PIL, to RGB)": decode,
        "train: random-resized crop + flip, draft": lambda d, w: hostdata.train_transform(
            d, w, rng, draft=True),
        "train: random-resized crop + flip, no draft": lambda d, w: hostdata.train_transform(
            d, w, rng, draft=False),
        "eval: resize 256 + centre crop 224": hostdata.eval_transform,
    }
    times = {name: ([], []) for name in jobs}
    for _ in range(5):
        for name, job in jobs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for data_, _, where in items:
                job(data_, where)
            times[name][0].append((time.perf_counter() - t0) / len(items) * 1e3)
            times[name][1].append((time.process_time() - c0) / len(items) * 1e3)
    return {name: {"wall": statistics.median(w), "cpu": statistics.median(c)}
            for name, (w, c) in times.items()}


def measure(make_batches) -> tuple[float, float, float]:
    """Images/s after the first batch, seconds to the first batch, and this process's CPU
    milliseconds per image after the first batch (all its threads; not its workers')."""
    t0 = time.perf_counter()
    first = c_first = None
    images = 0
    for batch in make_batches():
        n = len(batch["label"])
        if first is None:
            first, c_first = time.perf_counter(), time.process_time()
        else:
            images += n
    end, c_end = time.perf_counter(), time.process_time()
    images = max(images, 1)
    return images / max(end - first, 1e-9), first - t0, (c_end - c_first) / images * 1e3


def main(argv=None):
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    top = max(workers)
    b = args.batch_size
    if args.folder:
        typical = hostdata.open_source(f"folder:{args.folder}", "train")
        large, what = None, f"folder {args.folder}/train ({len(typical)} images)"
    else:
        typical_dir = generate(args.images, _size(args.size))
        large_dir = generate(max(args.images // 8, 4 * b), _size(args.large_size))
        typical = hostdata.open_source(f"folder:{typical_dir}", "train")
        large = hostdata.open_source(f"folder:{large_dir}", "train")
        mean_kb = np.mean([os.path.getsize(typical.path(i)) for i in range(len(typical))])
        what = (f"generated: {len(typical)} JPEGs {args.size} (mean {mean_kb / 1e3:.0f} KB) "
                f"and {len(large)} {args.large_size}, quality 90")
    print(what, flush=True)
    per_image = {f"{args.size}": single_core(typical)}
    if large is not None:
        per_image[args.large_size] = single_core(large, count=32)

    def train(source, mesh=None, **kw):
        return lambda: hostdata.HostLoader(source, batch_size=b, seed=0, mesh=mesh,
                                           **kw).epoch(0)

    def evaluate(source, **kw):
        return lambda: hostdata.eval_batches(source, batch_size=b, mesh=None, **kw)

    rows = {"train, workers=0 (this process, one thread)": train(typical)}
    for w in [w for w in workers if w > 0]:
        rows[f"train, workers={w} (processes)"] = train(typical, workers=w)
        if w > 1:
            rows[f"train, workers=0, threads={w}"] = train(typical, threads=w)
    rows[f"train, workers={top}, prefetch=1"] = train(typical, workers=top, prefetch=1)
    rows[f"train, workers={top}, prefetch=4"] = train(typical, workers=top, prefetch=4)
    rows[f"train, workers={top}, no draft"] = train(typical, workers=top, draft=False)
    rows[f"train, workers={top}, on the device mesh"] = train(
        typical, workers=top, mesh=parallel.make_mesh())
    if large is not None:
        rows[f"train {args.large_size}, workers={top}"] = train(large, workers=top)
        rows[f"train {args.large_size}, workers={top}, no draft"] = train(
            large, workers=top, draft=False)
    rows["eval, workers=0"] = evaluate(typical)
    rows[f"eval, workers={top}"] = evaluate(typical, workers=top)
    rows[f"eval, workers=0, threads={top}"] = evaluate(typical, threads=top)
    import grain  # noqa: F401  (imported before timing: the loader defers it)

    load = [os.getloadavg()[0]]
    results = {name: [] for name in rows}
    for r in range(args.repeats):
        for name, make in rows.items():
            results[name].append(measure(make))
            print(f"round {r + 1}/{args.repeats}: {name}: "
                  f"{results[name][-1][0]:.0f} images/s", flush=True)
    load.append(os.getloadavg()[0])
    table = {name: {"images_per_s": statistics.median(m[0] for m in ms),
                    "first_batch_s": statistics.median(m[1] for m in ms),
                    "main_cpu_ms_per_image": statistics.median(m[2] for m in ms)}
             for name, ms in results.items()}
    lines = report(args, what, per_image, table, argv, load)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(json.dumps({"machine": machine(), "load_average": load, "per_image_ms": per_image,
                      "loader": table}))


def report(args, what, per_image, table, argv, load) -> list[str]:
    command = "python benchmarks/pipeline.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    lines = ["# Host input pipeline throughput (kd_jax.hostdata)", "",
             f"- Machine: {machine()}", f"- Command: `{command.strip()}`", f"- Data: {what}",
             f"- Batch size {args.batch_size}; medians of {args.repeats} interleaved rounds; "
             f"1-minute load average {load[0]:.1f} before the loader rows, {load[1]:.1f} after "
             "(other work on the machine shares its cores).",
             "", "## One thread, no loader (ms per image: wall / CPU)", "",
             "| work | " + " | ".join(per_image) + " |",
             "|---|" + "---:|" * len(per_image)]
    for name in next(iter(per_image.values())):
        lines.append(f"| {name} | " + " | ".join(
            f"{v[name]['wall']:.2f} / {v[name]['cpu']:.2f}" for v in per_image.values()) + " |")
    lines += ["", "## HostLoader (images/s per host)", "",
              "| configuration | steady images/s | s to first batch | main process CPU ms/image |",
              "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['images_per_s']:.0f} | {row['first_batch_s']:.2f} | "
              f"{row['main_cpu_ms_per_image']:.2f} |" for name, row in table.items()]
    alone = next((row for name, row in table.items() if name.startswith("train, workers=0 (")),
                 None)
    handover = [row["main_cpu_ms_per_image"] for name, row in table.items()
                if name.startswith("train, workers=") and "workers=0" not in name]
    if alone is not None and handover:
        ms = alone["main_cpu_ms_per_image"]
        need = ", ".join(f"{rate:,} images/s: {rate * ms / 1e3:.1f} cores"
                         for rate in (1000, 3000, 10000))
        lines += ["", "## Cores to feed a step", "",
                  f"The training transform costs {ms:.2f} CPU ms per image inside the loader "
                  f"(`workers=0`, first batch excluded), {1e3 / ms:.0f} images/s per core the "
                  f"work has to itself; with workers the main process spends "
                  f"{statistics.median(handover):.2f} CPU ms per image on the hand-over. So a "
                  f"step of R images/s needs about R x {ms:.2f} / 1000 decode cores ({need}), "
                  "plus one for the training process."]
    return lines


def machine() -> str:
    """The CPU model and core count (``lscpu``)."""
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        fields = dict(line.split(":", 1) for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            if ":" in line)
        model, cores = fields["Model name"].strip(), int(fields["CPU(s)"])
    except (OSError, subprocess.CalledProcessError, KeyError, ValueError):
        pass
    return f"{model}, {cores} cores, Pillow {Image.__version__}"


if __name__ == "__main__":
    main()
