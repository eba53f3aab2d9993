"""The engine: optimisers, steps, objectives, the loop; devices, processes and resume."""

import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, data, loop, objectives, parallel, train
from tiny import TinyNet, toy_data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------ optimisers

def test_learning_rate_scales_linearly_with_batch_size():
    config = train.OptimConfig(lr=0.05, lr_batch_size=64)
    assert train.learning_rate(config, 128) == pytest.approx(0.1)
    assert train.learning_rate(config, 32) == pytest.approx(0.025)
    fixed = train.OptimConfig(lr=0.05, lr_batch_size=64, scale_lr=False)
    assert train.learning_rate(fixed, 128) == pytest.approx(0.05)


def test_step_schedule_is_the_crd_recipe():
    # 240 epochs at batch 64: 0.05, then x0.1 at epochs 150, 180, 210.
    sched = train.make_schedule(train.OptimConfig(), batch_size=64, steps_per_epoch=10,
                                epochs=240)
    for epoch, lr in [(0, 0.05), (149, 0.05), (150, 0.005), (179, 0.005), (180, 5e-4),
                      (210, 5e-5), (239, 5e-5)]:
        assert float(sched(epoch * 10)) == pytest.approx(lr, rel=1e-5), epoch


def test_warmup_then_cosine():
    config = train.OptimConfig(lr=0.1, lr_batch_size=128, schedule="cosine", warmup_epochs=1)
    sched = train.make_schedule(config, batch_size=128, steps_per_epoch=100, epochs=8)
    assert float(sched(0)) == 0.0
    assert float(sched(50)) == pytest.approx(0.05)
    assert float(sched(100)) == pytest.approx(0.1)
    assert float(sched(450)) == pytest.approx(0.05, rel=1e-3)  # halfway through the cosine
    assert float(sched(800)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_optimizer_and_schedule():
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(train.OptimConfig(optimizer="rmsprop"), batch_size=8,
                             steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        train.make_schedule(train.OptimConfig(schedule="poly"), batch_size=8,
                            steps_per_epoch=1, epochs=1)


def _torch_sgd(params, grad_fn, *, lr, momentum, weight_decay, nesterov, steps):
    """torch.optim.SGD's update (dampening 0), in float64 NumPy: the decay is added to the
    gradient, then momentum, then the step; the buffer starts as the first gradient."""
    p, buf = np.array(params, np.float64), None
    for _ in range(steps):
        d = grad_fn(p) + weight_decay * p
        buf = d if buf is None else momentum * buf + d
        p = p - lr * (d + momentum * buf if nesterov else buf)
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_weight_decay_is_coupled_l2(nesterov):
    """make_optimizer's SGD equals torch.optim.SGD over several momentum steps. With momentum
    0.9 coupled (L2 into the gradient, before momentum) and decoupled decay differ, so
    trace -> add_decayed_weights -> scale_by_learning_rate (decay after momentum) fails, as
    do a dropped decay, a decay applied twice and nesterov ignored."""
    a = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])

    def grad(p):  # a quadratic's gradient: it depends on the parameters, as real ones do
        return a @ p - np.array([1.0, -2.0, 0.5])

    p0 = np.array([2.0, -1.0, 0.5])
    config = train.OptimConfig(lr=0.1, lr_batch_size=1, momentum=0.9, nesterov=nesterov,
                               weight_decay=0.2, schedule="constant")
    tx = train.make_optimizer(config, batch_size=1, steps_per_epoch=1, epochs=1)
    params = {"w": jnp.asarray(p0, jnp.float32)}
    opt_state = tx.init(params)
    for _ in range(6):
        g = {"w": jnp.asarray(grad(np.asarray(params["w"], np.float64)), jnp.float32)}
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    want = _torch_sgd(p0, grad, lr=0.1, momentum=0.9, weight_decay=0.2, nesterov=nesterov,
                      steps=6)
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6)
    decoupled = _torch_sgd(p0, grad, lr=0.1, momentum=0.9, weight_decay=0.0,
                           nesterov=nesterov, steps=6)
    assert np.abs(want - decoupled).max() > 1e-2  # the decay matters at this size


# ------------------------------------------------------------------------- steps

def _setup(n=64, batch_size=16, epochs=3, lr=0.02):
    mesh = parallel.make_mesh()
    images, labels = toy_data(n)
    loader = data.TrainLoader(images, labels, batch_size=batch_size, seed=0, mesh=mesh)
    tx = train.make_optimizer(train.OptimConfig(lr=lr, lr_batch_size=batch_size),
                              batch_size=batch_size, steps_per_epoch=loader.steps_per_epoch,
                              epochs=epochs)
    return mesh, loader, tx


@pytest.fixture(scope="module")
def trained_teacher():
    mesh, loader, tx = _setup(lr=0.05)
    teacher = TinyNet(width=8)
    # On the mesh, as the step's outputs are: uncommitted inputs would compile the step twice.
    state = loop.replicate(train.create_train_state(teacher, tx, init_seed=0, data_seed=0), mesh)
    step = jax.jit(lambda s, b: train.train_step(s, b, dataset="cifar10"))
    losses = []
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return teacher, {"params": state.params, "batch_stats": state.batch_stats}, losses


def test_supervised_loss_falls(trained_teacher):
    *_, losses = trained_teacher
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def _students(methods, teacher, tx, seeds=None, labels=None, **overrides):
    """Students of ``methods`` (presets with "term.key=value" overrides per method), with their
    objectives' state for the toy training set (``labels``, default ``toy_data()``'s)."""
    labels = toy_data()[1] if labels is None else labels
    objs = [objectives.from_method(m, *overrides.get(m, ())) for m in methods]
    states = []
    for i, obj in enumerate(objs):
        model = objectives.prepare_student(TinyNet(width=4), obj, teacher)
        seed = seeds[i] if seeds else i + 1
        aux = objectives.init_state(obj, num_examples=len(labels), train_labels=labels,
                                    seed=seed)
        states.append(train.create_train_state(model, tx, init_seed=seed, data_seed=0,
                                               aux_state=aux))
    # Placed on the mesh as a step's outputs are, so that its second call reuses the first's
    # program (uncommitted inputs would compile it a second time).
    return objs, loop.replicate(tuple(states), parallel.make_mesh())


def test_every_objective_trains_and_its_loss_falls(trained_teacher):
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup(epochs=4, lr=0.02)
    # KD-SVD aligns singular vectors over channels, so it needs the teacher's stage widths
    # (RepDistiller's too); its preset is tested in test_losses_more.py. OFD takes its margins
    # from a ResNet teacher's BatchNorm, and DOT's optimiser is its own; both presets are
    # trained in test_objective_capabilities.py.
    # The methods with a first stage (AB, FT, FSP) and SimKD (it reuses a "classifier" layer,
    # which the tiny nets lack) train on ResNets in test_staged_methods.py.
    methods = [m for m in objectives.METHODS if m not in ("kdsvd", "ofd", "dot", "simkd")
               and objectives.METHODS[m].stage is None]
    objs, states = _students(methods, teacher, tx, fitnet=("fitnet.weight=10",),
                             dkd=("dkd.warmup_epochs=0",), reviewkd=("reviewkd.warmup_epochs=0",),
                             crd=("crd.num_negatives=32",))
    step = jax.jit(lambda s, b: train.distill_step_many(
        s, tvars, b, objectives=objs, teacher_apply=teacher.apply, dataset="cifar10",
        steps_per_epoch=loader.steps_per_epoch))
    history, ce = [], []
    for epoch in range(4):
        for batch in loader.epoch(epoch):
            states, metrics = step(states, batch)
            chex.assert_shape(metrics["loss"], (len(methods),))
            history.append(np.asarray(metrics["loss"]))
            ce.append([float(t["ce"]) for t in metrics["terms"]])
            for loss, terms in zip(metrics["loss"], metrics["terms"]):  # parts sum to the loss
                np.testing.assert_allclose(sum(terms.values()), loss, rtol=1e-5)
    history, ce = np.stack(history), np.array(ce)
    assert np.all(np.isfinite(history))
    first, last = history[:3].mean(0), history[-3:].mean(0)
    for i, (method, a, b) in enumerate(zip(methods, first, last)):
        if method == "crd":
            # On 64 toy images whose class sets the colour, instances of a class are nearly
            # identical: the instance-level contrast cannot fall in 16 steps (CRD's own
            # learning is tested in test_crd_heads_learn_to_contrast). Its CE must.
            a, b = ce[:3, i].mean(), ce[-3:, i].mean()
        assert b < a, f"{method}: loss {a:.4f} -> {b:.4f} did not fall"
    chex.assert_tree_all_finite([s.params for s in states])


def test_teacher_is_frozen_and_never_differentiated(trained_teacher):
    """In the library's jitted step (loop.make_distill_step, as fit runs it) every call of
    the teacher is in inference mode with nothing mutable (so its batch_stats cannot change),
    and no gradient reaches its variables. Fails if the step runs the teacher in training
    mode (train=True with mutable batch_stats) or drops teacher_outputs' stop_gradient."""
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup()
    calls = []

    def recording_apply(variables, images, **kwargs):  # records each call as it is traced
        calls.append({k: kwargs.get(k) for k in ("train", "mutable")})
        return teacher.apply(variables, images, **kwargs)

    objs, states = _students(["kd", "at"], teacher, tx)  # logits only, and features
    step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=recording_apply,
                                  dataset="cifar10", steps_per_epoch=loader.steps_per_epoch)
    for batch in loader.epoch(0):
        states, _ = step(states, tvars, batch)
    assert calls and all(c == {"train": False, "mutable": None} for c in calls), calls

    batch = next(loader.epoch(1))
    images = data.normalize(batch["image"], dataset="cifar10")

    def through_teacher(tv):
        logits, feats = train.teacher_outputs((teacher.apply,), (tv,), images,
                                              with_features=True)
        return jnp.sum(logits) + jnp.sum(feats["stage2"])

    grads = jax.grad(through_teacher)(tvars)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_teacher_runs_in_inference_mode(trained_teacher):
    teacher, tvars, _ = trained_teacher
    images = data.normalize(jnp.asarray(toy_data(8)[0]), dataset="cifar10")
    logits, _ = train.teacher_outputs((teacher.apply,), (tvars,), images, with_features=False)
    # Inference mode uses the running averages: an example's logits do not depend on the
    # rest of the batch.
    alone, _ = train.teacher_outputs((teacher.apply,), (tvars,), images[:1],
                                     with_features=False)
    chex.assert_trees_all_close(logits[:1], alone, rtol=1e-5, atol=1e-6)


def test_ensemble_of_teachers_averages_logits(trained_teacher):
    teacher, tvars, _ = trained_teacher
    other = TinyNet(width=8)
    ovars = other.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3)), train=False)
    images = data.normalize(jnp.asarray(toy_data(8)[0]), dataset="cifar10")
    mean, _ = train.teacher_outputs((teacher.apply, other.apply), (tvars, ovars), images,
                                    with_features=False)
    expected = (teacher.apply(tvars, images) + other.apply(ovars, images)) / 2
    chex.assert_trees_all_close(mean, expected, rtol=1e-5, atol=1e-6)


def test_k_student_pass_equals_students_trained_alone(trained_teacher):
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup()
    methods, seeds = ["kd", "dkd", "at"], [3, 4, 5]

    def run(ms, ss):
        objs, states = _students(ms, teacher, tx, seeds=ss)
        step = jax.jit(lambda s, b: train.distill_step_many(
            s, tvars, b, objectives=objs, teacher_apply=teacher.apply, dataset="cifar10",
            steps_per_epoch=loader.steps_per_epoch))
        for epoch in range(2):
            for batch in loader.epoch(epoch):
                states, _ = step(states, batch)
        return states

    together = run(methods, seeds)
    for k, (m, s) in enumerate(zip(methods, seeds)):
        (alone,) = run([m], [s])
        chex.assert_trees_all_close(together[k].params, alone.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(together[k].batch_stats, alone.batch_stats, rtol=1e-5,
                                    atol=1e-6)


def test_distill_step_single_student_api(trained_teacher):
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup()
    (obj,), (state,) = _students(["kd"], teacher, tx)
    batch = next(loader.epoch(0))
    new_state, metrics = jax.jit(lambda s, b: train.distill_step(
        s, tvars, b, objective=obj, teacher_apply=teacher.apply, dataset="cifar10",
        steps_per_epoch=4))(state, batch)
    chex.assert_shape((metrics["loss"], metrics["accuracy"]), ((), ()))
    assert int(new_state.step) == 1
    with pytest.raises(ValueError, match="objective"):
        train.distill_step_many((state, state), tvars, batch, objectives=(obj,),
                                teacher_apply=teacher.apply, dataset="cifar10",
                                steps_per_epoch=4)


def test_eval_step_counts_only_masked_in_examples(trained_teacher):
    teacher, tvars, _ = trained_teacher
    images, labels = toy_data(8)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels),
             "mask": jnp.array([True] * 5 + [False] * 3)}
    out = train.eval_step(tvars, batch, apply_fn=teacher.apply, dataset="cifar10")
    logits = teacher.apply(tvars, data.normalize(jnp.asarray(images), dataset="cifar10"))
    correct = np.asarray(jnp.argmax(logits, -1) == labels)[:5].sum()
    assert float(out["count"]) == 5.0
    assert float(out["correct"]) == correct
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)[:5].sum()
    assert float(out["loss_sum"]) == pytest.approx(float(ce), rel=1e-5)


def test_same_seed_is_bit_identical(trained_teacher):
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup()

    def run():
        objs, states = _students(["kd"], teacher, tx)
        step = jax.jit(lambda s, b: train.distill_step_many(
            s, tvars, b, objectives=objs, teacher_apply=teacher.apply, dataset="cifar10",
            steps_per_epoch=loader.steps_per_epoch))
        for batch in loader.epoch(0):
            states, _ = step(states, batch)
        return states[0].params

    jax.tree.map(np.testing.assert_array_equal, run(), run())


# --------------------------------------------------------------------------- loop

def test_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path):
    mesh, loader, tx = _setup()
    state = train.create_train_state(TinyNet(width=4), tx, init_seed=0, data_seed=0)
    real_step = loop.make_supervised_step(mesh, dataset="cifar10")
    calls = {"n": 0}

    def poisoned(states, batch):
        states, metrics = real_step(states, batch)
        calls["n"] += 1
        if calls["n"] == 6:  # the second step of epoch 2 (4 steps per epoch)
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return states, metrics

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    evaluate = loop.make_evaluator(mesh, images=toy_data(16)[0], labels=toy_data(16)[1],
                                   batch_size=8, dataset="cifar10")
    with pytest.raises(loop.NonFiniteLossError, match=r"step 6 for tiny.*step 4"):
        loop.fit(loop.replicate((state,), mesh), poisoned, loader=loader, epochs=3,
                 evaluate=evaluate, names=["tiny"], phase="t", checkpointer=ckpt,
                 progress=False, log_every=100)
    assert ckpt.all_steps() == [4]


def test_fit_resumes_and_skips_a_finished_run(tmp_path):
    mesh, loader, tx = _setup()
    evaluate = loop.make_evaluator(mesh, images=toy_data(16)[0], labels=toy_data(16)[1],
                                   batch_size=8, dataset="cifar10")

    def run(epochs_done_check=None):
        state = train.create_train_state(TinyNet(width=4), tx, init_seed=0, data_seed=0)
        return loop.fit(loop.replicate((state,), mesh),
                        loop.make_supervised_step(mesh, dataset="cifar10"), loader=loader,
                        epochs=2, evaluate=evaluate, names=["tiny"], phase="t",
                        checkpointer=checkpoint.Checkpointer(tmp_path / "c"), progress=False)

    first = run()
    second = run()
    assert first.resumed_from_step == 0 and second.resumed_from_step == 8
    assert len(second.history[0]) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first.states[0].params),
                 jax.device_get(second.states[0].params))


# ------------------------------------------------- devices, processes, SIGKILL

def _run_engine(*args, env_extra=None, check=True, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_run.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine_run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _devices(n):
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    _run_engine("--out", out)
    return _load(out)


@pytest.mark.slow
def test_four_devices_match_one_device(reference_run, tmp_path):
    _run_engine("--out", tmp_path / "four.npz", env_extra=_devices(4))
    four = _load(tmp_path / "four.npz")
    assert four.keys() == reference_run.keys()
    for k in four:
        np.testing.assert_allclose(four[k], reference_run[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_batch_not_divisible_by_devices_names_both_numbers():
    code = ("from kd_jax import parallel\n"
            "try:\n    parallel.check_batch_size(30, parallel.make_mesh())\n"
            "except ValueError as e:\n    print(e)\n")
    env = {**os.environ, **_devices(4), "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert "30" in out and "4 devices" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "engine_run.py"), "--out", str(tmp_path / "mp.npz"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    _run_engine("--out", tmp_path / "two.npz", env_extra=_devices(2))
    multi, single = _load(tmp_path / "mp.npz"), _load(tmp_path / "two.npz")
    assert multi.keys() == single.keys()
    for k in multi:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(reference_run, tmp_path):
    # Killed mid-epoch 2 of the students (4 steps per epoch): resumes from step 4.
    killed = _run_engine("--out", tmp_path / "r.npz", "--workdir", tmp_path / "w",
                         "--kill-at-step", 6, check=False)
    assert killed.returncode == -9
    assert not (tmp_path / "r.npz").exists()
    resumed = _run_engine("--out", tmp_path / "r.npz", "--workdir", tmp_path / "w")
    assert "resumed_from 4" in resumed.stdout
    result = _load(tmp_path / "r.npz")
    assert result.keys() == reference_run.keys()
    for k in result:
        np.testing.assert_array_equal(result[k], reference_run[k], err_msg=k)


@pytest.mark.parametrize("method, overrides", [("kd", ()), ("crd", ("crd.num_negatives=32",))])
def test_vmap_impl_equals_the_loop_and_auto_picks_the_loop_on_cpu(trained_teacher, method,
                                                                  overrides):
    # CRD: heads and a memory bank per student, stacked and vmapped like the parameters.
    teacher, tvars, _ = trained_teacher
    mesh, loader, tx = _setup()
    objs = [objectives.from_method(method, *overrides)] * 2

    def run(impl):
        _, states = _students([method, method], teacher, tx, seeds=[3, 4],
                              **{method: overrides})
        step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=teacher.apply,
                                      dataset="cifar10", steps_per_epoch=loader.steps_per_epoch,
                                      impl=impl)
        for batch in loader.epoch(0):
            states, metrics = step(states, tvars, batch)
        chex.assert_shape(metrics["loss"], (2,))
        return states

    looped, vmapped = run("loop"), run("vmap")
    for a, b in zip(looped, vmapped):
        chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(a.aux_state, b.aux_state, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="share one objective"):
        loop.make_distill_step(mesh, objectives=[objs[0], objectives.from_method("dkd")],
                               teacher_apply=teacher.apply, dataset="cifar10",
                               steps_per_epoch=4, impl="vmap")
    if method != "kd":  # auto's choice depends on the platform and on shared objectives only
        return
    # "auto" on this CPU mesh compiles the loop's program, not vmap's (which two students of
    # one objective would allow): its jaxpr is the loop's. Fails if auto picked vmap on CPU.
    assert {d.platform for d in mesh.devices.flat} == {"cpu"}
    _, states = _students([method, method], teacher, tx, seeds=[3, 4])
    batch = next(loader.epoch(0))
    jaxprs = {impl: str(jax.make_jaxpr(loop.make_distill_step(
        mesh, objectives=objs, teacher_apply=teacher.apply, dataset="cifar10",
        steps_per_epoch=loader.steps_per_epoch, impl=impl))(states, tvars, batch))
        for impl in ("auto", "loop", "vmap")}
    assert jaxprs["auto"] == jaxprs["loop"] != jaxprs["vmap"]


def test_out_of_range_labels_give_a_non_finite_loss_everywhere():
    """One behaviour across the library: a label outside [0, C) makes that example's loss NaN
    (train_step, eval_step, the objectives, kd_jax.losses), never a silently wrapped class."""
    import numpy as np
    from kd_jax import losses, objectives
    logits = jnp.zeros((3, 10))
    labels = jnp.array([1, -1, 10])
    ce = objectives.cross_entropy(logits, labels)
    assert np.isfinite(ce[0]) and np.isnan(ce[1]) and np.isnan(ce[2])
    kd = jax.jit(lambda s, t, y: losses.distillation_loss(s, t, y, temperature=4.0,
                                                          alpha=0.9))(logits, logits, labels)
    assert np.isfinite(kd[0]) and np.isnan(kd[1]) and np.isnan(kd[2])
    for method in ("none", "dkd", "dist"):
        loss = objectives.objective_loss(objectives.METHODS[method], student_logits=logits,
                                         student_features=None, teacher_logits=logits,
                                         teacher_features=None, labels=labels, epoch=1.0)
        assert np.isnan(loss), method
    # The steps: a batch with one label out of range has a NaN loss (fails if a step clips or
    # wraps the labels, e.g. jnp.clip(labels, 0, C - 1) or labels % C), one in range does not.
    model = TinyNet(width=4)
    state = train.create_train_state(model, optax.sgd(0.1), init_seed=0, data_seed=0)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_step = jax.jit(lambda s, b: train.train_step(s, b, dataset="cifar10"))
    eval_step = jax.jit(lambda v, b: train.eval_step(v, b, apply_fn=model.apply,
                                                     dataset="cifar10"))
    images = jnp.asarray(toy_data(4)[0])
    for bad, finite in [(1, True), (-1, False), (10, False)]:
        batch = {"image": images, "label": jnp.array([0, bad, 2, 3]), "mask": jnp.ones(4, bool)}
        assert np.isfinite(train_step(state, batch)[1]["loss"]) == finite, ("train_step", bad)
        assert np.isfinite(eval_step(variables, batch)["loss_sum"]) == finite, ("eval_step", bad)


def test_fit_logs_each_students_loss_terms(capsys):
    mesh, loader, tx = _setup(epochs=1)
    teacher = TinyNet(width=8)
    images, _ = toy_data()
    tvars = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    objs = [objectives.from_method("kd"), objectives.from_method("none")]
    states = [train.create_train_state(TinyNet(width=4), tx, init_seed=i, data_seed=0)
              for i in (1, 2)]
    step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=teacher.apply,
                                  dataset="cifar10", steps_per_epoch=loader.steps_per_epoch)
    evaluate = loop.make_evaluator(mesh, images=images, labels=toy_data()[1], batch_size=16,
                                   dataset="cifar10")
    records = []

    class Writer:  # CLU's contract only: gets every record's numbers as scalars
        scalars = []

        def write_scalars(self, step, scalars):
            self.scalars.append((step, scalars))

        write_texts = flush = close = lambda self, *a: None

    writer = Writer()
    loop.fit(loop.replicate(tuple(states), mesh), lambda s, b: step(s, tvars, b), loader=loader,
             epochs=1, evaluate=evaluate, names=["kd", "none"], phase="students", log_every=2,
             writers=[writer], hooks=[records.append], context={"run": "r1"}, progress=True)
    # 1 epoch of the loader's steps at log_every=2, plus the epoch records, per student.
    steps = loader.steps_per_epoch
    assert len(records) == 2 * (-(-steps // 2) + 1), len(records)
    assert {r["kind"] for r in records} == {"step", "epoch"}
    assert all(r["run"] == "r1" for r in records)  # the context reaches every record
    assert len(writer.scalars) == len(records)
    assert any(k == "students/kd/epoch/terms/kd" for _, s in writer.scalars for k in s)
    for record in records:
        expected = {"ce", "kd"} if record["student"] == "kd" else {"ce"}
        assert set(record["terms"]) == expected, record
        assert sum(record["terms"].values()) == pytest.approx(record["loss"], rel=1e-5)
    bar = capsys.readouterr().err
    assert "kd " in bar and "[ce " in bar and " kd " in bar.split("[ce ")[1]  # parts shown
