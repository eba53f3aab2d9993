"""Throughput of kd_jax's compiled steps on all local devices, beside a straightforward step.

    python benchmarks/throughput.py                                  # resnet56 -> resnet20
    python benchmarks/throughput.py --students 4 --compare-single    # K students, one teacher pass
    python benchmarks/throughput.py --epoch-check                    # loop overhead vs step time
    python benchmarks/throughput.py --method-costs --num-classes 100 # every --method against KD

Times each compiled step after a warm-up, with ``block_until_ready``, as the median over
``--repeats`` blocks of ``--steps`` steps. The library's distillation step and a
straightforward Flax step (teacher ``apply`` + student ``value_and_grad`` + optax SGD under one
``jax.jit``, nothing else: no augmentation, no metrics) run in alternating blocks, so their
ratio holds when the machine's speed drifts. Batches are synthetic (random uint8 images).

``--method-costs`` times the distillation step of every preset in
``kd_jax.objectives.METHODS`` (``none``: the labels-only step, the floor) in alternating blocks
with the KD step of the same models, and reports each as ms/step, as a multiple of KD (the
median over blocks of the paired ratio) and with its compile time. Each preset runs in its own
process, its KD step beside it, under ``--method-timeout`` seconds: a preset that fails to
build, crashes or runs past the limit is listed with what happened instead of stopping the run.

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kd_jax import data, loop, losses, models, objectives, parallel, train  # noqa: E402

CIFAR10_TRAIN = 50_000  # CIFAR-10 and CIFAR-100 alike


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks (the median is kept)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--method", default="kd", choices=sorted(objectives.METHODS))
    p.add_argument("--num-classes", type=int, default=10,
                   help="classes of the models and of the synthetic training set's labels "
                        "(100: CIFAR-100's shapes)")
    p.add_argument("--method-costs", action="store_true",
                   help="time every --method preset against the KD step of the same models")
    p.add_argument("--methods", default=None,
                   help="with --method-costs: a comma list of presets (default: all)")
    p.add_argument("--costs-out", default=None,
                   help="with --method-costs: write the table to PATH.md and the JSON to "
                        "PATH.json")
    p.add_argument("--method-timeout", type=float, default=900.0,
                   help="with --method-costs: seconds one preset's process may take (its KD "
                        "step's and its own compilation and timing); past it the preset is "
                        "listed as timed out")
    p.add_argument("--one-method", default=None, help=argparse.SUPPRESS)  # a child process
    p.add_argument("--students", type=int, default=1,
                   help="K students distilled in one step (student images/s = K x batch / time)")
    p.add_argument("--students-impl", choices=["loop", "vmap"], default="loop",
                   help="K students as K graphs in one jit (loop) or one vmapped update")
    p.add_argument("--compare-single", action="store_true",
                   help="also time one student alone: the K-pass vs K separate runs ratio")
    p.add_argument("--no-fold-teacher", action="store_true",
                   help="run the library's teacher without folding BatchNorm into its convs")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the straightforward step (and the paired ratio)")
    p.add_argument("--epoch-check", action="store_true",
                   help="run the experiment's epoch loop over --epoch-steps steps and compare "
                        "its time with steps x step time")
    p.add_argument("--epoch-steps", type=int, default=30)
    p.add_argument("--sweep", default=None,
                   help="comma list of K (e.g. 1,2,4,8): time a K-student pass for each K "
                        "against K separate single-student steps, with compile times")
    args = p.parse_args(argv)
    # The --method-costs parent leaves the accelerator to its children (it never touches jax).
    if args.dtype is None and not (args.method_costs and args.one_method is None):
        args.dtype = "bfloat16" if jax.devices()[0].platform != "cpu" else "float32"
    return args


def _timed(step, carry, steps):
    """Seconds per step of ``carry = step(carry)`` over ``steps`` steps (already compiled)."""
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(steps):
        carry = step(carry)
    jax.block_until_ready(carry)
    return carry, (time.perf_counter() - start) / steps


def _compile_seconds(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


class Bench:
    def __init__(self, args):
        self.args = args
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(args.batch_size, self.mesh)
        dtype = jnp.dtype(args.dtype)
        c = args.num_classes
        self.teacher = models.create(args.teacher, num_classes=c, dtype=dtype)
        self.student = models.create(args.student, num_classes=c, dtype=dtype)
        rng = np.random.default_rng(0)
        b = args.batch_size
        images = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, c, b).astype(np.int32)
        shard = parallel.batch_sharding(self.mesh)
        self.batch = {"image": jax.device_put(images, shard),
                      "label": jax.device_put(labels, shard),
                      "index": jax.device_put(np.arange(b, dtype=np.int32), shard)}
        # The training set's labels, for objectives with state (CRD's memory bank).
        self.train_labels = np.arange(CIFAR10_TRAIN, dtype=np.int32) % c
        self.float_images = jax.device_put(
            np.asarray(data.normalize(jnp.asarray(images), dataset="cifar10")), shard)
        self.steps_per_epoch = CIFAR10_TRAIN // b
        self.tx = self.optimizer()
        tvars = self.teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
        self.tvars = loop.replicate({"params": tvars["params"],
                                     "batch_stats": tvars["batch_stats"]}, self.mesh)
        self.objective = objectives.from_method(args.method)
        # As the experiment does: the frozen teacher runs with BatchNorm folded into its convs.
        self.teacher_apply = (self.teacher.apply if args.no_fold_teacher
                              else models.folded_apply(self.teacher))

    def optimizer(self, objective=None):
        return train.make_optimizer(train.OptimConfig(lr=0.05), batch_size=self.args.batch_size,
                                    steps_per_epoch=self.steps_per_epoch, epochs=240,
                                    objective=objective)

    def students(self, k, objective=None):
        objective = objective or self.objective
        model = objectives.prepare_student(self.student, objective, self.teacher)
        tx = self.optimizer(objective)
        return loop.replicate(tuple(
            train.create_train_state(
                model, tx, init_seed=i, data_seed=0,
                aux_state=objectives.init_state(objective, num_examples=CIFAR10_TRAIN,
                                                train_labels=self.train_labels, seed=i,
                                                teacher=self.teacher,
                                                teacher_variables=self.tvars))
            for i in range(k)), self.mesh)

    def library_distill(self, k, impl, objective=None):
        """(step: carry -> carry, carry, compile seconds) for the library's K-student step."""
        objective = objective or self.objective
        states = self.students(k, objective)
        fn = loop.make_distill_step(self.mesh, objectives=[objective] * k,
                                    teacher_apply=self.teacher_apply, dataset="cifar10",
                                    steps_per_epoch=self.steps_per_epoch, impl=impl)
        compiled, seconds = _compile_seconds(fn, states, self.tvars, self.batch)
        return (lambda s: compiled(s, self.tvars, self.batch)[0]), states, seconds

    def library_train(self):
        states = self.students(1)
        fn = loop.make_supervised_step(self.mesh, dataset="cifar10")
        compiled, _ = _compile_seconds(fn, states, self.batch)
        return (lambda s: compiled(s, self.batch)[0]), states

    def straightforward_distill(self):
        """Teacher apply + student value_and_grad + optax under one jit, nothing else."""
        teacher, student, tx = self.teacher, self.student, self.tx
        temperature, alpha = 4.0, 0.9

        def step(carry, tvars, images, labels):
            params, batch_stats, opt_state = carry
            t_logits = teacher.apply(tvars, images, train=False)

            def loss_fn(p):
                logits, updates = student.apply({"params": p, "batch_stats": batch_stats},
                                                images, train=True, mutable=["batch_stats"])
                loss = losses.distillation_loss(logits, t_logits, labels,
                                                temperature=temperature, alpha=alpha).mean()
                return loss, updates["batch_stats"]

            (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state

        v = student.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False)
        carry = loop.replicate((v["params"], v["batch_stats"], tx.init(v["params"])), self.mesh)
        fn = jax.jit(step, donate_argnums=0)
        labels = self.batch["label"]
        compiled, _ = _compile_seconds(fn, carry, self.tvars, self.float_images, labels)
        return (lambda c: compiled(c, self.tvars, self.float_images, labels)), carry

    def teacher_forward(self, folded=False):
        apply = models.folded_apply(self.teacher) if folded else self.teacher.apply
        fn = jax.jit(lambda v, x: apply(v, x, train=False))
        compiled, _ = _compile_seconds(fn, self.tvars, self.float_images)
        return (lambda _: compiled(self.tvars, self.float_images)), None


def measure_pair(a, b, steps, repeats):
    """Alternating blocks of A and B; per-block seconds/step of each."""
    (step_a, carry_a), (step_b, carry_b) = a, b
    carry_a, _ = _timed(step_a, carry_a, 2)  # warm-up
    carry_b, _ = _timed(step_b, carry_b, 2)
    times_a, times_b = [], []
    for _ in range(repeats):
        carry_a, ta = _timed(step_a, carry_a, steps)
        carry_b, tb = _timed(step_b, carry_b, steps)
        times_a.append(ta)
        times_b.append(tb)
    return times_a, times_b


def measure(fn_carry, steps, repeats):
    step, carry = fn_carry
    carry, _ = _timed(step, carry, 2)
    times = []
    for _ in range(repeats):
        carry, t = _timed(step, carry, steps)
        times.append(t)
    return times


def epoch_check(bench, step_seconds):
    """Runs loop.fit for two epochs of ``--epoch-steps`` steps; the second epoch's training
    time (evaluation excluded) against steps x the measured step time."""
    args = bench.args
    n = args.epoch_steps * args.batch_size
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    loader = data.TrainLoader(images, labels, batch_size=args.batch_size, seed=0,
                              mesh=bench.mesh)
    k = args.students
    states = bench.students(k)
    step = loop.make_distill_step(bench.mesh, objectives=[bench.objective] * k,
                                  teacher_apply=bench.teacher.apply, dataset="cifar10",
                                  steps_per_epoch=loader.steps_per_epoch)
    evaluate = loop.make_evaluator(bench.mesh, images=images[:args.batch_size],
                                   labels=labels[:args.batch_size],
                                   batch_size=args.batch_size, dataset="cifar10")
    result = loop.fit(states, lambda s, b: step(s, bench.tvars, b), loader=loader, epochs=2,
                      evaluate=evaluate, names=[f"s{i}" for i in range(k)], phase="bench",
                      progress=False, log_every=50)
    epoch_time = result.history[0][1]["epoch_time_s"]
    return epoch_time, epoch_time / (loader.steps_per_epoch * step_seconds)


def sweep(bench, ks, out):
    """K-student passes against K separate runs (K x the one-student step), per K."""
    args = bench.args
    b = args.batch_size
    rows = []
    single = None
    for k in sorted(set([1] + ks)):
        step_fn, states, compile_s = bench.library_distill(k, args.students_impl)
        t = statistics.median(measure((step_fn, states), args.steps, args.repeats))
        single = t if k == 1 else single
        rows.append({"students": k, "step_s": t, "compile_s": compile_s,
                     "student_images_per_s": k * b / t,
                     "ratio_vs_separate_runs": t / (k * single)})
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {args.dtype}, batch {b}, "
          f"{args.teacher} -> {args.student}, method {args.method}, {args.students_impl}")
    print(f"{'K':>3} {'s/step':>8} {'student img/s':>14} {'vs K separate runs':>19} "
          f"{'compile s':>10}")
    for r in rows:
        print(f"{r['students']:>3} {r['step_s']:>8.3f} {r['student_images_per_s']:>14.1f} "
              f"{r['ratio_vs_separate_runs']:>19.3f} {r['compile_s']:>10.1f}")
    last = rows[-1]
    t_train = statistics.median(measure(bench.library_train(), args.steps, args.repeats))
    fwd = statistics.median(measure(bench.teacher_forward(), args.steps, args.repeats))
    out.update(train_step_images_per_s=b / t_train, teacher_forward_images_per_s=b / fwd)
    out.update(sweep=rows, students=last["students"],
               distill_step_images_per_s=last["student_images_per_s"],
               epoch_seconds_estimate=bench.steps_per_epoch * last["step_s"])
    print(json.dumps(out))


def method_cost(bench, name):
    """One preset's step against the KD step of the same models, in alternating blocks.
    Prints a JSON progress line after each phase (the parent reads them if it stops us)."""
    args = bench.args
    row = {"method": name, "device_kind": jax.devices()[0].device_kind,
           "devices": jax.device_count(), "dtype": args.dtype}
    kd_step, kd_carry, kd_compile_s = bench.library_distill(1, "loop", objectives.METHODS["kd"])
    row["kd_compile_s"] = kd_compile_s
    print(json.dumps({"phase": "kd compiled", **row}), flush=True)
    try:
        objective = objectives.METHODS[name]
        if objective.needs_teacher or objective.optimizer != "default":
            step, carry, compile_s = bench.library_distill(1, "loop", objective)
        else:  # as the experiment: a labels-only objective takes the supervised step
            start = time.perf_counter()
            step, carry = bench.library_train()
            compile_s = time.perf_counter() - start  # includes building the states
        row["compile_s"] = compile_s
        print(json.dumps({"phase": "compiled", **row}), flush=True)
    except Exception as err:  # a preset that cannot be built here is reported, not fatal
        row["error"] = f"not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    try:
        carry, _ = _timed(step, carry, 2)
        kd_carry, _ = _timed(kd_step, kd_carry, 2)
        print(json.dumps({"phase": "warmed up", **row}), flush=True)
        times, kd_times = [], []
        for _ in range(args.repeats):
            carry, t = _timed(step, carry, args.steps)
            kd_carry, t_kd = _timed(kd_step, kd_carry, args.steps)
            times.append(t)
            kd_times.append(t_kd)
    except Exception as err:
        row["error"] = f"failed to run: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    row.update(step_ms=1e3 * statistics.median(times),
               kd_step_ms=1e3 * statistics.median(kd_times),
               times_kd=statistics.median(t / k for t, k in zip(times, kd_times)),
               kd_step_ms_min_max=[1e3 * min(kd_times), 1e3 * max(kd_times)])
    return row


def _run_child(argv, name, timeout):
    """Runs ``method_cost`` for ``name`` in a fresh process; its row, or one that says why
    there is none (the process timed out, crashed or printed no row)."""
    script = os.path.abspath(__file__)
    command = [sys.executable, script, *argv, "--one-method", name]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and nothing else
        stdout, stderr = proc.communicate()
        timed_out = True
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    rows = [r for r in lines if r.get("method") == name and "phase" not in r]
    if rows and not timed_out:
        return {**rows[-1], "process_s": time.perf_counter() - start}
    last = lines[-1] if lines else {"method": name}
    row = {k: v for k, v in last.items() if k != "phase"}
    reached = last.get("phase", "started")
    if timed_out:
        row["error"] = f"timed out after {timeout:.0f} s (last phase reached: {reached})"
    else:
        tail = [line for line in stderr.splitlines() if line.strip()][-1:] or ["no output"]
        row["error"] = (f"process exited with code {proc.returncode} (last phase reached: "
                        f"{reached}): {tail[0][:200]}")
    row["process_s"] = time.perf_counter() - start
    return row


def method_costs(args, argv):
    """Every preset's ``method_cost``, each in its own process under ``--method-timeout``."""
    names = (args.methods.split(",") if args.methods else list(objectives.METHODS))
    rows = []
    for name in names:
        row = _run_child(argv, name, args.method_timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = next((r for r in rows if "device_kind" in r), {})
    title = (f"{info.get('device_kind', '?')} x {info.get('devices', '?')}, "
             f"{info.get('dtype', args.dtype or '?')}, batch {args.batch_size}, "
             f"{args.teacher} -> {args.student}, {args.num_classes} classes, memory bank N = "
             f"{CIFAR10_TRAIN:,}; {args.repeats} paired blocks of {args.steps} steps, each "
             f"method in its own process (limit {args.method_timeout:.0f} s)")
    command = "python benchmarks/throughput.py " + " ".join(argv)
    lines = [f"Method costs ({title})", "", f"    {command}", "", "| method | ms/step | KD ms/step (same blocks) "
             "| × KD | compile s (method / KD) |", "|---|---|---|---|---|"]

    def seconds(r, key):
        return f"{r[key]:.1f}" if r.get(key) is not None else "–"

    for r in rows:
        compile_s = f"{seconds(r, 'compile_s')} / {seconds(r, 'kd_compile_s')}"
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | {compile_s} |")
        else:
            lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['kd_step_ms']:.1f} | "
                         f"{r['times_kd']:.2f} | {compile_s} |")
    table = "\n".join(lines)
    print(table)
    out = {"device_kind": info.get("device_kind"), "devices": info.get("devices"),
           "teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
           "dtype": info.get("dtype", args.dtype), "num_classes": args.num_classes,
           "num_examples": CIFAR10_TRAIN, "steps": args.steps, "repeats": args.repeats,
           "method_timeout_s": args.method_timeout,
           "command": command,
           "method_costs": rows}
    if args.costs_out:
        with open(args.costs_out + ".md", "w") as f:
            f.write(table + "\n")
        with open(args.costs_out + ".json", "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.method_costs and args.one_method is None:
        method_costs(args, argv)
        return
    bench = Bench(args)
    if args.one_method is not None:
        print(json.dumps(method_cost(bench, args.one_method)), flush=True)
        return
    k, b = args.students, args.batch_size
    device = jax.devices()[0]
    rows = []
    out = {"device_kind": device.device_kind, "devices": jax.device_count(),
           "teacher": args.teacher, "student": args.student, "batch_size": b,
           "dtype": args.dtype, "method": args.method, "students": k,
           "students_impl": args.students_impl}

    if args.sweep:
        sweep(bench, [int(x) for x in args.sweep.split(",")], out)
        return
    step_fn, states, compile_s = bench.library_distill(k, args.students_impl)
    if args.no_baseline:
        lib_times = measure((step_fn, states), args.steps, args.repeats)
    else:
        lib_times, base_times = measure_pair((step_fn, states), bench.straightforward_distill(),
                                             args.steps, args.repeats)
        ratios = [tb / tl for tl, tb in zip(lib_times, base_times)]
        base = statistics.median(base_times)
        rows.append(("straightforward distill step (1 student)", base, b / base))
        out["straightforward_step_images_per_s"] = b / base
        out["library_vs_straightforward_speedup"] = statistics.median(ratios)
        out["speedup_min_max"] = [min(ratios), max(ratios)]
    lib = statistics.median(lib_times)
    rows.append((f"kd_jax distill step ({k} student{'s' if k > 1 else ''}, {args.students_impl})",
                 lib, k * b / lib))
    out["distill_step_images_per_s"] = k * b / lib
    out["distill_step_compile_s"] = compile_s

    if args.compare_single and k > 1:
        single_fn, single_states, single_compile = bench.library_distill(1, "loop")
        single = statistics.median(measure((single_fn, single_states), args.steps, args.repeats))
        rows.append(("kd_jax distill step (1 student)", single, b / single))
        out["single_student_step_s"] = single
        out["k_pass_vs_separate_runs"] = lib / (k * single)
        out["single_compile_s"] = single_compile

    train_times = measure(bench.library_train(), args.steps, args.repeats)
    t_train = statistics.median(train_times)
    rows.append((f"kd_jax train step ({args.student}, labels only)", t_train, b / t_train))
    out["train_step_images_per_s"] = b / t_train

    fwd, fwd_folded = measure_pair(bench.teacher_forward(), bench.teacher_forward(folded=True),
                                   args.steps, args.repeats)
    fwd, fwd_folded = statistics.median(fwd), statistics.median(fwd_folded)
    rows.append((f"teacher forward ({args.teacher}, inference)", fwd, b / fwd))
    rows.append((f"teacher forward ({args.teacher}, BatchNorm folded)", fwd_folded,
                 b / fwd_folded))
    out["teacher_forward_images_per_s"] = b / fwd
    out["teacher_forward_folded_images_per_s"] = b / fwd_folded
    out["epoch_seconds_estimate"] = bench.steps_per_epoch * lib

    if args.epoch_check:
        epoch_time, ratio = epoch_check(bench, lib)
        out["epoch_check_seconds"] = epoch_time
        out["epoch_vs_steps_x_step_time"] = ratio

    print(f"{device.device_kind} x {jax.device_count()}, {args.dtype}, batch {b}, "
          f"{args.teacher} -> {args.student}, method {args.method}")
    print(f"{'step':<52} {'ms/step':>9} {'images/s':>10}")
    for name, seconds, rate in rows:
        print(f"{name:<52} {1e3 * seconds:>9.1f} {rate:>10.1f}")
    if "library_vs_straightforward_speedup" in out:
        lo, hi = out["speedup_min_max"]
        print(f"library / straightforward speed: {out['library_vs_straightforward_speedup']:.3f}x "
              f"(median of {args.repeats} paired blocks; min {lo:.3f}, max {hi:.3f})")
    if "k_pass_vs_separate_runs" in out:
        print(f"{k}-student pass / {k} separate runs: {out['k_pass_vs_separate_runs']:.3f} "
              f"(compile {compile_s:.1f}s vs {out['single_compile_s']:.1f}s)")
    if "epoch_vs_steps_x_step_time" in out:
        print(f"epoch loop / (steps x step time): {out['epoch_vs_steps_x_step_time']:.3f}")
    print(f"epoch estimate (CIFAR-10, {bench.steps_per_epoch} steps): "
          f"{out['epoch_seconds_estimate']:.0f}s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
