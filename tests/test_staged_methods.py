"""The capabilities of issue 24's two-stage and head methods: a first stage (AB, FT, FSP),
frozen parameter groups (FT's paraphraser), an inference head through the teacher's
classifier (SimKD), and the loop's term averages over the steps a term ran in."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint, data, loop, models, objectives, parallel, train
from kd_jax.objectives import METHODS, Objective, Stage, Term
from tiny import toy_data

BATCH, EPOCHS = 16, 2


def _changed(before, after):
    """The parameter groups (first two path levels) where any value changed."""
    flat = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path[:2]) for path, c in flat if c}


@pytest.fixture(scope="module")
def setup():
    images, labels = toy_data(64)
    mesh = parallel.make_mesh()
    loader = data.TrainLoader(images, labels, batch_size=BATCH, seed=0, mesh=mesh)
    teacher = models.create("resnet8", 10)
    tstate = train.create_train_state(
        teacher, train.make_optimizer(train.OptimConfig(), batch_size=BATCH,
                                      steps_per_epoch=4, epochs=1), init_seed=0, data_seed=0)
    return loader, teacher, {"params": tstate.params, "batch_stats": tstate.batch_stats}


def _run(setup, method, steps, *, state=None, stage_steps=1):
    loader, teacher, tvars = setup
    spe = loader.steps_per_epoch
    obj = METHODS[method]
    if obj.stage is not None:  # the stage's first `stage_steps` of the run's 2 x 4 steps
        obj = dataclasses.replace(obj, stage=dataclasses.replace(obj.stage,
                                                                 epochs=stage_steps / spe))
    model = objectives.prepare_student(models.create("resnet8", 10), obj, teacher)
    if state is None:
        tx = train.make_optimizer(train.OptimConfig(lr=0.05, lr_batch_size=BATCH),
                                  batch_size=BATCH, steps_per_epoch=spe, epochs=EPOCHS,
                                  objective=obj)
        state = train.create_train_state(model, tx, init_seed=1, data_seed=0)
        if obj.predicting_term is not None:
            state = state.replace(params=objectives.heads_from_teacher(obj, state.params,
                                                                       tvars))
    step = jax.jit(lambda s, b: train.distill_step_many(
        s, tvars, b, objectives=(obj,), teacher_apply=teacher.apply, dataset="cifar10",
        steps_per_epoch=spe))
    history = []
    state = loop.replicate(state, parallel.make_mesh())  # as the outputs: one compilation
    start = int(state.step)
    batches = [b for e in range(EPOCHS) for b in loader.epoch(e)][start:start + steps]
    for batch in batches:
        before = state
        (state,), metrics = step((state,), batch)
        history.append((_changed(before.params, state.params),
                        _changed(before.batch_stats, state.batch_stats),
                        jax.device_get(metrics["terms"][0])))
    return obj, model, state, history


def test_stage_epochs_scale_like_warmups_and_records_carry_the_stage():
    assert METHODS["ab"].stage.epochs == 30.0
    assert objectives.resolve("ab", epochs=2).stage.epochs == pytest.approx(0.25)
    assert objectives.resolve("fsp", epochs=480).stage.epochs == 30.0
    assert METHODS["ft"].as_dict()["stage"]["trains"] == ["head_ft_paraphraser"]
    assert "stage" not in METHODS["kd"].as_dict() and "frozen" not in METHODS["kd"].as_dict()
    over = objectives.resolve("ab", epochs=2, terms=("ab.margin=0.5",))
    assert over.term("ab").arguments["margin"] == 0.5
    assert Stage(2.0, (Term("fsp"),), ("backbone",)).steps(10) == 20
    assert Stage(0.01, (Term("fsp"),), ("backbone",)).steps(10) == 1


def test_stage_and_frozen_groups_are_validated():
    with pytest.raises(ValueError, match="not a parameter group"):
        Objective((Term("ce"),), stage=Stage(1.0, (Term("fsp"),), ("head_fsp",)))
    with pytest.raises(ValueError, match="not a parameter group"):
        Objective((Term("ce"),), frozen=("classifier",))
    with pytest.raises(ValueError, match="epochs must be finite and > 0"):
        Stage(0.0, (Term("fsp"),), ("backbone",))
    with pytest.raises(ValueError, match="once in an objective"):
        Objective((Term("fsp"),), stage=Stage(1.0, (Term("fsp"),), ("backbone",)))
    with pytest.raises(ValueError, match="shorter than the run"):
        train.make_optimizer(train.OptimConfig(), batch_size=8, steps_per_epoch=2, epochs=1,
                             objective=Objective((Term("ce"),), stage=Stage(
                                 1.0, (Term("fsp"),), ("backbone",))))


def test_fsp_stage_trains_the_feature_layers_alone_then_everything(setup):
    _, _, _, history = _run(setup, "fsp", 3)
    (p1, b1, t1), (p2, _, t2), _ = history
    assert p1 and all(g.startswith("backbone/") for g in p1)
    assert "backbone/classifier" not in p1  # a stage trains the feature layers
    assert b1  # the backbone's BatchNorm statistics move in its stage
    assert t1["fsp"] > 0 and np.isnan(t1["ce"])  # the main term did not run
    assert "backbone/classifier" in p2 and np.isnan(t2["fsp"]) and t2["ce"] > 0


def test_ft_trains_its_paraphraser_first_then_freezes_it(setup):
    _, _, state, history = _run(setup, "ft", 4)
    (p1, b1, t1) = history[0]
    assert p1 == {g for g in p1 if g.startswith("head_ft_paraphraser/")} and p1
    assert not b1  # the backbone did not run in training mode for the stage
    assert t1["ft_paraphraser"] > 0 and np.isnan(t1["ft"])
    for params, _, terms in history[1:]:
        assert not any(g.startswith("head_ft_paraphraser") for g in params)
        assert any(g.startswith("head_ft/") for g in params) and terms["ft"] > 0
    # The optimiser's schedule starts after the stage: its count is the main steps'.
    assert int(state.opt_state.count) == 4 and int(state.step) == 4


def test_a_stage_resumes_bit_exact_from_a_checkpoint_inside_it(setup, tmp_path):
    """Two stage steps straight vs one, save, restore, one: the same state to the bit
    (the stage's optimiser state and its count are checkpointed with the rest)."""
    _, _, straight, history = _run(setup, "ab", 2, stage_steps=3)
    assert all(np.isnan(terms["ce"]) for _, _, terms in history)  # both inside the stage
    _, _, half, _ = _run(setup, "ab", 1, stage_steps=3)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, half, meta={})
    _, restored, _ = ckpt.restore(half)
    ckpt.close()
    _, _, resumed, _ = _run(setup, "ab", 1, state=restored, stage_steps=3)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_simkd_predicts_through_its_projector_and_the_teachers_frozen_classifier(setup):
    _, teacher, tvars = setup
    obj, model, state, history = _run(setup, "simkd", 3)
    head = state.params["head_simkd"]
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(head["classifier"][k], tvars["params"]["classifier"][k])
    # A copy, not the teacher's buffer: the student's state is donated to its step (the
    # experiment's jit), which must not delete the teacher's variables.
    fresh = objectives.heads_from_teacher(obj, state.params, tvars)["head_simkd"]["classifier"]
    for k in ("kernel", "bias"):
        assert fresh[k].unsafe_buffer_pointer() != \
            tvars["params"]["classifier"][k].unsafe_buffer_pointer()
    assert all("head_simkd/classifier" not in p for p, _, _ in history)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    deployed = model.apply(variables, x, train=False)
    _, features = model.backbone.apply(
        {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}, x,
        train=False, return_features=True)
    assert not np.allclose(deployed, model.backbone.apply(
        {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}, x,
        train=False))
    exported = objectives.backbone_variables(model, variables)
    assert set(exported["params"]) == {"backbone", "head_simkd"}
    np.testing.assert_allclose(model.apply(exported, x, train=False), deployed, rtol=1e-6)
    backbone_alone = train.num_params(state.params["backbone"]) - train.num_params(
        state.params["backbone"]["classifier"])
    assert objectives.deployed_params(model, state.params) == \
        backbone_alone + train.num_params(head)
    assert features["stage3"].shape[-1] == head["classifier"]["kernel"].shape[0]
    plain = objectives.prepare_student(models.create("resnet8", 10), METHODS["fitnet"], teacher)
    fitnet_state = train.create_train_state(plain, train.make_optimizer(
        train.OptimConfig(), batch_size=BATCH, steps_per_epoch=4, epochs=1), init_seed=0,
        data_seed=0)
    assert objectives.deployed_params(plain, fitnet_state.params) == \
        train.num_params(fitnet_state.params["backbone"])


def test_loop_averages_each_term_over_the_steps_it_ran_in():
    fetched = [{"terms": ({"ab": 4.0, "ce": float("nan")},)},
               {"terms": ({"ab": 2.0, "ce": float("nan")},)},
               {"terms": ({"ab": float("nan"), "ce": 1.0},)}]
    means, ran = loop._interval_terms(fetched, 1)
    assert means == [{"ab": 3.0, "ce": 1.0}] and ran == [{"ab": 2, "ce": 1}]
    means, _ = loop._interval_terms(fetched[:2], 1)
    assert means == [{"ab": 3.0}]  # a term that ran in none of the steps is left out


@pytest.mark.parametrize("student_hw,teacher_hw,kernel", [
    (8, 8, (1, 1, 4, 6)),      # equal sizes: 1x1
    (16, 8, (3, 3, 4, 6)),     # twice the teacher's: 3x3, stride 2
    (8, 16, (4, 4, 4, 6)),     # half the teacher's: 4x4 transposed, stride 2
    (10, 8, (3, 3, 4, 6)),     # larger: valid (1 + 10 - 8) x (1 + 10 - 8)
])
def test_ab_connectors_map_every_size_repdistillers_convreg_maps(student_hw, teacher_hw,
                                                                 kernel):
    from kd_jax.objectives.staged_terms import ABConnectors
    rng = np.random.default_rng(0)
    s = {"stage1": jnp.asarray(rng.normal(size=(2, student_hw, student_hw, 4)), jnp.float32)}
    t = {"stage1": jnp.zeros((2, teacher_hw, teacher_hw, 6))}
    variables = ABConnectors().init(jax.random.PRNGKey(0), s, t, True)
    assert variables["params"]["stage1_conv"]["kernel"].shape == kernel
    out, _ = ABConnectors().apply(variables, s, t, True, mutable=["batch_stats"])
    assert out["stage1"].shape == t["stage1"].shape
    # BatchNorm in train mode: each output channel has batch mean 0 and variance ~1.
    np.testing.assert_allclose(np.mean(out["stage1"], axis=(0, 1, 2)), 0.0, atol=1e-5)
    assert np.all(np.std(out["stage1"], axis=(0, 1, 2)) > 0.9)


def test_ab_connectors_keep_an_equal_map_and_refuse_a_size_they_cannot_map():
    from kd_jax.objectives.staged_terms import ABConnectors
    same = {"stage1": jnp.ones((2, 8, 8, 6))}
    variables = ABConnectors().init(jax.random.PRNGKey(0), same, same, False)
    assert "params" not in variables
    np.testing.assert_array_equal(ABConnectors().apply(variables, same, same, False)["stage1"],
                                  same["stage1"])
    with pytest.raises(ValueError, match="no connector"):
        ABConnectors().init(jax.random.PRNGKey(0), {"stage1": jnp.ones((2, 5, 5, 4))},
                            {"stage1": jnp.ones((2, 8, 8, 6))}, False)


@pytest.mark.parametrize("method", ["ft", "kd"])
def test_objective_schedule_is_the_rate_the_optimiser_applies(method):
    """With plain SGD (no momentum, no decay) and a unit gradient, each update is -lr(step):
    the rate a record reports (objective_schedule) is the one the student trains with — for
    FT the stage's 0.2 x the peak on its paraphraser for 3 steps, then the cosine schedule
    over the remaining 5 steps on the rest. Fails if the stage's factor or its skip is
    dropped from either."""
    obj = METHODS[method]
    if obj.stage is not None:
        obj = dataclasses.replace(obj, stage=dataclasses.replace(obj.stage, epochs=0.75))
    config = train.OptimConfig(lr=0.1, lr_batch_size=8, momentum=0.0, weight_decay=0.0,
                               schedule="cosine")
    kw = dict(batch_size=8, steps_per_epoch=4, epochs=2, objective=obj)
    tx, lr = train.make_optimizer(config, **kw), train.objective_schedule(config, **kw)
    params = {"backbone": {"w": jnp.zeros(())}, "head_ft_paraphraser": {"w": jnp.zeros(())}}
    grads = jax.tree.map(jnp.ones_like, params)
    opt_state = tx.init(params)
    main = train.make_schedule(config, batch_size=8, steps_per_epoch=4, epochs=2,
                               skip_steps=3 if method == "ft" else 0)
    for step in range(8):
        updates, opt_state = tx.update(grads, opt_state, params)
        applied = max(-float(u["w"]) for u in updates.values())
        np.testing.assert_allclose(applied, float(lr(step)), rtol=1e-6)
        if method == "ft" and step < 3:
            assert float(lr(step)) == pytest.approx(0.02)  # 0.2 x 0.1
            assert float(updates["backbone"]["w"]) == 0.0
        elif method == "ft":
            assert float(lr(step)) == pytest.approx(float(main(step - 3)))
            assert float(updates["head_ft_paraphraser"]["w"]) == 0.0  # frozen after
        else:
            assert float(lr(step)) == pytest.approx(float(main(step)))
