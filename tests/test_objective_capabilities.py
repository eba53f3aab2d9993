"""Objective-level capabilities of issue 24: epoch arguments scaled by resolve (CTKD's
curriculum) and the gradient split with its optimiser (DOT)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, data, dot, loop, objectives, parallel, train
from kd_jax.objectives import METHODS, Objective, Term
from tiny import TinyNet, toy_data

BATCH, EPOCHS, LR = 16, 3, 0.02


# ------------------------------------------------------------------ epoch arguments (CTKD)

@pytest.mark.parametrize("epochs, expected", [(2, 10 * 2 / 240), (24, 1.0), (240, 10.0),
                                              (480, 10.0)])
def test_resolve_scales_ctkds_lambda_epochs_like_a_warmup(epochs, expected):
    term = objectives.resolve("ctkd", epochs=epochs).term("ctkd")
    np.testing.assert_allclose(term.arguments["lambda_epochs"], expected, rtol=1e-12)
    assert METHODS["ctkd"].term("ctkd").arguments["lambda_epochs"] == 10.0  # preset unchanged
    # An override after the scaling is taken as given.
    over = objectives.resolve("ctkd", epochs=2, terms=("ctkd.lambda_epochs=3",))
    assert over.term("ctkd").arguments["lambda_epochs"] == 3.0


def test_epoch_arguments_must_be_float_arguments_of_the_term():
    with pytest.raises(ValueError, match="epoch_arguments must be float arguments"):
        objectives.register_term("bad_epochs", lambda x, **_: 0.0, defaults={"k": 1},
                                 epoch_arguments=("k",))
    with pytest.raises(ValueError, match="epoch_arguments must be float arguments"):
        objectives.register_term("bad_epochs", lambda x, **_: 0.0, defaults={"e": 1.0},
                                 epoch_arguments=("missing",))
    assert "bad_epochs" not in objectives.registered_terms()


# ------------------------------------------------------------------ DOT: declaration

def test_dot_objective_declares_each_terms_part():
    preset = METHODS["dot"]
    assert preset.optimizer == "dot" and dict(preset.optimizer_args) == {"delta": 0.075}
    assert preset.gradient_parts() == (("ce",), ("kd",))
    assert preset.as_dict()["optimizer"] == {"name": "dot", "delta": 0.075}
    assert "optimizer" not in METHODS["kd"].as_dict()  # the other presets' records unchanged
    assert "part" not in str(METHODS["kd"].as_dict())
    assert objectives.resolve("dot", epochs=2, temperature=2.0) \
        .term("kd").arguments["temperature"] == 2.0
    with pytest.raises(ValueError, match="part='task' or part='distill' on kd"):
        Objective((Term.of("ce", part="task"), Term.of("kd")), optimizer="dot")
    with pytest.raises(ValueError, match="only optimizer='dot' uses"):
        Objective((Term.of("ce", part="task"), Term.of("kd")))
    with pytest.raises(ValueError, match="part must be one of"):
        Term.of("ce", part="both")
    with pytest.raises(ValueError, match="takes no argument momentum"):
        Objective(preset.terms, optimizer="dot", optimizer_args=(("momentum", 0.8),))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Objective(optimizer="adam")
    assert hash(preset) == hash(Objective(preset.terms, optimizer="dot",
                                          optimizer_args=(("delta", 0.075),)))


def test_make_optimizer_builds_dot_from_the_runs_settings():
    config = train.OptimConfig(lr=0.1, lr_batch_size=BATCH, momentum=0.8, weight_decay=1e-3,
                               schedule="constant")
    tx = train.make_optimizer(config, batch_size=BATCH, steps_per_epoch=4, epochs=2,
                              objective=METHODS["dot"])
    params = {"w": jax.numpy.array([1.0, -2.0])}
    g, h = {"w": jax.numpy.array([0.5, 0.25])}, {"w": jax.numpy.array([-1.0, 2.0])}
    state = tx.init(params)
    step, state = tx.update((g, h), state, params)
    step, state = tx.update((g, h), state, params)
    ref = dot.dot(0.1, momentum=0.8, delta=0.075, weight_decay=1e-3)
    ref_state = ref.init(params)
    ref_step, ref_state = ref.update((g, h), ref_state, params)
    ref_step, ref_state = ref.update((g, h), ref_state, params)
    chex.assert_trees_all_close(step, ref_step)
    with pytest.raises(ValueError, match="needs --optimizer sgd"):
        train.make_optimizer(train.OptimConfig(optimizer="adam"), batch_size=BATCH,
                             steps_per_epoch=4, epochs=2, objective=METHODS["dot"])
    with pytest.raises(ValueError, match="without --nesterov"):
        train.make_optimizer(train.OptimConfig(nesterov=True), batch_size=BATCH,
                             steps_per_epoch=4, epochs=2, objective=METHODS["dot"])


# ------------------------------------------------------------------ DOT: the step

@pytest.fixture(scope="module")
def setup():
    mesh = parallel.make_mesh()
    images, labels = toy_data(64)
    loader = data.TrainLoader(images, labels, batch_size=BATCH, seed=0, mesh=mesh)
    config = train.OptimConfig(lr=0.05, lr_batch_size=BATCH)
    kw = dict(batch_size=BATCH, steps_per_epoch=loader.steps_per_epoch, epochs=EPOCHS)
    teacher = TinyNet(width=8)
    state = loop.replicate(train.create_train_state(  # on the mesh: the step compiles once
        teacher, train.make_optimizer(config, **kw), init_seed=0, data_seed=0), mesh)
    step = jax.jit(lambda s, b: train.train_step(s, b, dataset="cifar10"))
    for epoch in range(EPOCHS):
        for batch in loader.epoch(epoch):
            state, _ = step(state, batch)
    return mesh, loader, teacher, {"params": state.params, "batch_stats": state.batch_stats}


def _student(objective, config, loader, teacher, seed=1):
    tx = train.make_optimizer(config, batch_size=BATCH, steps_per_epoch=loader.steps_per_epoch,
                              epochs=EPOCHS, objective=objective)
    model = objectives.prepare_student(TinyNet(width=4), objective, teacher)
    return train.create_train_state(model, tx, init_seed=seed, data_seed=0)


def _steps(states, objs, tvars, teacher, loader, n):
    step = jax.jit(lambda s, b: train.distill_step_many(
        s, tvars, b, objectives=objs, teacher_apply=teacher.apply, dataset="cifar10",
        steps_per_epoch=loader.steps_per_epoch))
    batches = iter(loader.epoch(0))
    states = loop.replicate(states, parallel.make_mesh())  # as the outputs: one compilation
    for _ in range(n):
        states, metrics = step(states, next(batches))
    return states, metrics


def test_dot_step_gives_the_task_and_the_distillation_gradient_their_own_trace(setup):
    """After one step DOT's two traces are the gradients of CE's and KD's parts alone (plus
    the weight decay on the task's), as plain SGD's trace of each part trained alone."""
    _, loader, teacher, tvars = setup
    config = train.OptimConfig(lr=LR, lr_batch_size=BATCH)
    dot_obj = METHODS["dot"]
    ce_alone = Objective((Term.of("ce", 0.1),))
    kd_alone = Objective((Term.of("ce", 0.0), Term.of("kd", 0.9, temperature=4.0)))
    states = (_student(dot_obj, config, loader, teacher),
              _student(ce_alone, config, loader, teacher),
              _student(kd_alone, train.OptimConfig(lr=LR, lr_batch_size=BATCH,
                                                   weight_decay=0.0), loader, teacher))
    (d, c, k), _ = _steps(states, (dot_obj, ce_alone, kd_alone), tvars, teacher, loader, 1)
    assert isinstance(d.opt_state, dot.DotState)
    chex.assert_trees_all_close(d.opt_state.task_trace,
                                optax.tree_utils.tree_get(c.opt_state, "trace"),
                                rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(d.opt_state.distill_trace,
                                optax.tree_utils.tree_get(k.opt_state, "trace"),
                                rtol=1e-5, atol=1e-7)
    # The BatchNorm statistics are of the one forward pass, as without DOT.
    chex.assert_trees_all_close(d.batch_stats, c.batch_stats)


def test_dot_with_zero_delta_is_the_default_sgd_step(setup):
    _, loader, teacher, tvars = setup
    config = train.OptimConfig(lr=LR, lr_batch_size=BATCH)
    dot0 = Objective(METHODS["dot"].terms, optimizer="dot", optimizer_args=(("delta", 0.0),))
    kd = METHODS["kd"]
    states = (_student(dot0, config, loader, teacher), _student(kd, config, loader, teacher))
    (a, b), metrics = _steps(states, (dot0, kd), tvars, teacher, loader, 3)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"][0], metrics["loss"][1], rtol=1e-5)
    # With delta > 0 the step is another one.
    states = (_student(METHODS["dot"], config, loader, teacher),
              _student(kd, config, loader, teacher))
    (a, b), _ = _steps(states, (METHODS["dot"], kd), tvars, teacher, loader, 3)
    assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(b.params)[0])


def test_dot_preset_trains_beside_other_students_and_resumes_bit_exactly(setup, tmp_path):
    mesh, loader, teacher, tvars = setup
    config = train.OptimConfig(lr=LR, lr_batch_size=BATCH)
    objs = (objectives.resolve("dot", epochs=EPOCHS), objectives.resolve("ctkd", epochs=EPOCHS))
    evaluate = loop.make_evaluator(mesh, images=toy_data(16)[0], labels=toy_data(16)[1],
                                   batch_size=8, dataset="cifar10")
    step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=teacher.apply,
                                  dataset="cifar10", steps_per_epoch=loader.steps_per_epoch)

    def run(directory, epochs):
        states = tuple(_student(o, config, loader, teacher, seed=i + 1)
                       for i, o in enumerate(objs))
        return loop.fit(loop.replicate(states, mesh), lambda s, b: step(s, tvars, b),
                        loader=loader, epochs=epochs, evaluate=evaluate,
                        names=["dot", "ctkd"], phase="t",
                        checkpointer=checkpoint.Checkpointer(directory), progress=False,
                        log_every=1)

    whole = run(tmp_path / "whole", EPOCHS)
    run(tmp_path / "parts", 1)  # stopped after one epoch (its checkpoint kept) ...
    resumed = run(tmp_path / "parts", EPOCHS)  # ... and rerun to the end
    assert resumed.resumed_from_step == loader.steps_per_epoch
    for a, b in zip(whole.states, resumed.states):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params),
                     jax.device_get(b.params))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.opt_state),
                     jax.device_get(b.opt_state))
    assert isinstance(whole.states[0].opt_state, dot.DotState)
    for name, hist in zip(["dot", "ctkd"], whole.history):
        assert hist[-1]["loss"] < hist[0]["loss"], (name, hist)


# ------------------------------------------------------------------ OFD

@pytest.fixture(scope="module")
def resnet_teacher():
    """A resnet8 teacher whose BatchNorm scales and shifts are spread, so that each
    channel's margin differs."""
    from kd_jax import models
    teacher = models.create("resnet8", 10)
    variables = teacher.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                             train=False)
    rng = np.random.default_rng(0)

    def spread(path, x):
        name = jax.tree_util.keystr(path)
        if "bn" in name and "'scale'" in name:
            return jnp.asarray(rng.uniform(0.3, 2.0, x.shape), x.dtype)
        if "bn" in name and "'bias'" in name:
            return jnp.asarray(rng.uniform(-1.5, 1.0, x.shape), x.dtype)
        return x

    params = jax.tree_util.tree_map_with_path(spread, variables["params"])
    return teacher, {"params": params, "batch_stats": variables["batch_stats"]}


def test_ofd_margins_come_from_the_teachers_batchnorm_before_each_relu(resnet_teacher):
    teacher, tvars = resnet_teacher
    state = objectives.init_state(METHODS["ofd"], teacher=teacher, teacher_variables=tvars)
    margins = state["ofd"]["margins"]
    assert sorted(margins) == ["stage1", "stage2", "stage3"]
    for stage, margin in margins.items():  # resnet8: one block per stage; bn2 precedes the ReLU
        bn = tvars["params"][f"{stage}_block0"]["bn2"]
        chex.assert_trees_all_close(margin, objectives.more_terms.losses.ofd_margin(
            bn["scale"], bn["bias"]))
        assert np.all(np.asarray(margin) < 0) and np.ptp(np.asarray(margin)) > 0.1
    with pytest.raises(ValueError, match="pass init_state.*teacher=model"):
        objectives.init_state(METHODS["ofd"])
    tiny = TinyNet(width=8)
    tiny_vars = tiny.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="use a ResNet teacher"):
        objectives.init_state(METHODS["ofd"], teacher=tiny, teacher_variables=tiny_vars)


def test_ofd_connectors_map_the_pre_relu_maps_deepest_first(resnet_teacher):
    """TinyNet's two stages pair with resnet8's last two (mdistiller aligns from the end); a
    connector is a 1×1 convolution + BatchNorm of the student's map *before* its ReLU."""
    teacher, tvars = resnet_teacher
    obj = METHODS["ofd"]
    student = objectives.prepare_student(TinyNet(width=4), obj, teacher)
    svars = student.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32),
                         return_features=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    _, t_features = teacher.apply(tvars, x, train=False, return_features=True)
    _, features, heads = student.apply(svars, x, train=False, return_features=True,
                                       teacher_features=t_features)
    out = heads["ofd"]
    assert sorted(out) == ["stage2", "stage3"]
    assert out["stage3"].shape == (2, 16, 16, 64) and out["stage2"].shape == (2, 32, 32, 32)
    head = svars["params"]["head_ofd"]
    raw = features["stage2"]
    assert np.any(np.asarray(raw) < 0)  # the pre-ReLU map: a post-ReLU one would have none
    expected = (raw @ head["stage3_conv"]["kernel"][0, 0]) / np.sqrt(1 + 1e-5)
    expected = expected * head["stage3_bn"]["scale"] + head["stage3_bn"]["bias"]
    np.testing.assert_allclose(out["stage3"], expected, rtol=1e-4, atol=1e-5)


def test_ofd_preset_trains_and_resumes_bit_exactly(resnet_teacher, tmp_path):
    teacher, tvars = resnet_teacher
    mesh = parallel.make_mesh()
    images, labels = toy_data(64)
    loader = data.TrainLoader(images, labels, batch_size=BATCH, seed=0, mesh=mesh)
    config = train.OptimConfig(lr=LR, lr_batch_size=BATCH)
    obj = objectives.resolve("ofd", epochs=EPOCHS)
    evaluate = loop.make_evaluator(mesh, images=toy_data(16)[0], labels=toy_data(16)[1],
                                   batch_size=8, dataset="cifar10")
    step = loop.make_distill_step(mesh, objectives=(obj,), teacher_apply=teacher.apply,
                                  dataset="cifar10", steps_per_epoch=loader.steps_per_epoch)

    def run(directory, epochs):
        state = _student(obj, config, loader, teacher)
        state = state.replace(aux_state=objectives.init_state(obj, teacher=teacher,
                                                              teacher_variables=tvars))
        return loop.fit(loop.replicate((state,), mesh), lambda s, b: step(s, tvars, b),
                        loader=loader, epochs=epochs, evaluate=evaluate, names=["ofd"],
                        phase="t", checkpointer=checkpoint.Checkpointer(directory),
                        progress=False, log_every=1)

    whole = run(tmp_path / "whole", EPOCHS)
    run(tmp_path / "parts", 1)
    resumed = run(tmp_path / "parts", EPOCHS)
    assert resumed.resumed_from_step == loader.steps_per_epoch
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole.states[0].params),
                 jax.device_get(resumed.states[0].params))
    assert "head_ofd" in whole.states[0].params
    epochs = [h for h in whole.history[0] if "terms" in h and "epoch" in h]
    assert epochs[-1]["terms"]["ofd"] < epochs[0]["terms"]["ofd"], epochs
    # The margins are state: checkpointed and resumed unchanged.
    chex.assert_trees_all_close(jax.device_get(resumed.states[0].aux_state),
                                jax.device_get(whole.states[0].aux_state))
    exported = objectives.backbone_variables(
        objectives.prepare_student(TinyNet(width=4), obj, teacher),
        {"params": whole.states[0].params, "batch_stats": whole.states[0].batch_stats})
    assert not any(k.startswith("head_") for k in exported["params"])


# ------------------------------------------------------------------ DOT in the experiment

@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    import os

    import tensorflow_datasets as tfds

    from fake_tfds import fake_as_data_source
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    with tfds.testing.mock_data(
            as_data_source_fn=fake_as_data_source({"train": 1000, "test": 500}, balanced=True)):
        yield tmp_path_factory.mktemp("tfds")
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


def test_experiment_builds_each_students_optimizer_and_teacher_set_up(fake_cifar, tmp_path):
    """--method kd,dot,ofd in one students pass: the DOT student trains with DOT, the KD one
    with the run's SGD; OFD's margins come from the shipped ResNet teacher; each export is
    the bare student with its objective recorded."""
    from kd_jax.experiment import PRESETS, configure, run
    config = configure(PRESETS["smoke"], data_dir=str(fake_cifar), epochs=1, train_subset=100,
                       test_subset=100, methods=("kd", "dot", "ofd"),
                       teacher_checkpoint="pretrained:cifar10/resnet20", log_every=1)
    res = run(config, str(tmp_path), progress=False)
    rows = {s["method"]: s for s in res.students}
    assert set(rows) == {"none", "kd", "dot", "ofd"}
    assert rows["ofd"]["params"] == rows["kd"]["params"]  # the connectors are not exported
    (dot_path,) = tmp_path.glob("students_*/students/dot_seed0")
    (kd_path,) = tmp_path.glob("students_*/students/kd_seed0")
    dot_vars, dot_meta = checkpoint.load_variables(str(dot_path))
    kd_vars, kd_meta = checkpoint.load_variables(str(kd_path))
    assert dot_meta["objective"]["optimizer"] == {"name": "dot", "delta": 0.075}
    assert "optimizer" not in kd_meta["objective"]
    assert rows["dot"]["params"] == rows["kd"]["params"]
    # Same initialisation, teacher, data and loss; two steps (100 images, batch 48): the
    # second step's momenta differ (DOT's first step is SGD's), so do the weights.
    assert jax.tree.structure(dot_vars) == jax.tree.structure(kd_vars)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(dot_vars["params"]),
                                                       jax.tree.leaves(kd_vars["params"])))


# ------------------------------------------------------------------ 4 devices = 1 device

_DEVICES_SCRIPT = """
import jax, numpy as np
from kd_jax import data, models, objectives, parallel, train
from tiny import TinyNet, toy_data
assert len(jax.devices()) == 4
teacher = models.create("resnet8", 10)
tvars = teacher.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
# Issue 24's nine methods; a 2-epoch run of 4 steps each: the first stages (AB, FT, FSP)
# take one step. Students of width 16 have resnet8's stem, stage1 and stage2 widths (FSP,
# KD-SVD).
objs = tuple(objectives.resolve(m, epochs=2) for m in
             ("dot", "ofd", "ab", "ft", "fsp", "kdsvd", "simkd", "mlkd", "ctkd"))
config = train.OptimConfig(lr=0.02, lr_batch_size=16)
images, labels = toy_data(64)
out = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    loader = data.TrainLoader(images, labels, batch_size=16, seed=0, mesh=mesh)
    states = []
    for i, obj in enumerate(objs):
        tx = train.make_optimizer(config, batch_size=16, steps_per_epoch=4, epochs=2,
                                  objective=obj)
        model = objectives.prepare_student(TinyNet(width=16), obj, teacher)
        aux = objectives.init_state(obj, teacher=teacher, teacher_variables=tvars)
        state = train.create_train_state(model, tx, init_seed=i + 1, data_seed=0,
                                         aux_state=aux)
        states.append(state.replace(params=objectives.heads_from_teacher(obj, state.params,
                                                                         tvars)))
    from kd_jax import loop
    states = loop.replicate(tuple(states), mesh)
    step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=teacher.apply,
                                  dataset="cifar10", steps_per_epoch=4)
    for batch in loader.epoch(0):
        states, metrics = step(states, tvars, batch)
    out.append(jax.device_get([(s.params, s.batch_stats, s.opt_state) for s in states]))
a, b = out
for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
print("equal")
"""


def test_issue_24_methods_on_four_devices_equal_one_device():
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "equal" in proc.stdout, proc.stderr[-3000:]
