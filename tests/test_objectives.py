"""Objectives as registered weighted terms (kd_jax.objectives).

Equivalence with the earlier flat objectives (recomputed here from kd_jax.losses), each term's
part, overrides and their validation, adding a method (the README's example and a term registered
here), the student's heads, VID's initial variance, ReviewKD's resizing and fusion, and CRD's
state, update and learning. References are float64 NumPy or the loss functions themselves.
"""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses, objectives
from kd_jax.objectives import METHODS, Objective, Term
from tiny import TinyNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, C = 16, 10
relu = jax.nn.relu


# Data come from NumPy (jax.random would compile a sampler for every shape, op by op).

def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _logits(seed=0, b=B):
    rng = np.random.default_rng(seed)
    return (3 * _normal(rng, b, C), 3 * _normal(rng, b, C),
            jnp.asarray(rng.integers(0, C, b), jnp.int32))


def _features(seed):
    rng = np.random.default_rng(100 + seed)
    return {"stage1": _normal(rng, B, 8, 8, 4), "stage2": _normal(rng, B, 4, 4, 8),
            "pooled": _normal(rng, B, 8)}


def _ce(s, y):
    return optax.softmax_cross_entropy_with_integer_labels(s, y).mean()


def _loss(objective, s, t, y, epoch=0.7, sf=None, tf=None):
    if isinstance(objective, str):
        objective = METHODS[objective]
    return objectives.objective_loss(objective, student_logits=s, teacher_logits=t, labels=y,
                                     epoch=epoch, student_features=sf, teacher_features=tf)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(s, y):
    return -_np_log_softmax(s)[np.arange(len(y)), np.asarray(y)].mean()


# ------------------------------------------------------- the earlier flat objectives

def test_logit_presets_equal_the_flat_objectives():
    s, t, y = _logits()
    np.testing.assert_allclose(_loss("none", s, t, y), _ce(s, y), rtol=1e-5)
    np.testing.assert_allclose(
        _loss("kd", s, t, y),
        losses.distillation_loss(s, t, y, temperature=4.0, alpha=0.9).mean(), rtol=1e-5)
    dkd = losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0).mean()
    for epoch in (0.7, 13.0, 25.0):  # during and after the 20-epoch warm-up
        np.testing.assert_allclose(_loss("dkd", s, t, y, epoch),
                                   _ce(s, y) + min(epoch / 20, 1.0) * dkd, rtol=1e-5,
                                   err_msg=f"epoch {epoch}")
    np.testing.assert_allclose(
        _loss("dist", s, t, y),
        _ce(s, y) + losses.dist_loss(s, t, beta=1.0, gamma=1.0, temperature=4.0), rtol=1e-5)


def test_feature_presets_equal_the_flat_objectives_on_post_relu_maps():
    s, t, y = _logits()
    sf, tf = _features(1), _features(2)
    at = sum(losses.attention_transfer_loss(relu(sf[k]), relu(tf[k]), p=2).mean()
             for k in ("stage1", "stage2"))
    np.testing.assert_allclose(_loss("at", s, t, y, sf=sf, tf=tf), _ce(s, y) + 1000 * at,
                               rtol=1e-5)
    # "pooled" is used as it is (not passed through a ReLU again).
    cases = [("sp", losses.similarity_preserving_loss(sf["pooled"], tf["pooled"]), 3000.0),
             ("rkd", losses.rkd_loss(sf["pooled"], tf["pooled"], distance_weight=25.0,
                                     angle_weight=50.0), 1.0),
             ("pkt", losses.pkt_loss(sf["pooled"], tf["pooled"]), 30000.0)]
    for method, value, weight in cases:
        np.testing.assert_allclose(_loss(method, s, t, y, sf=sf, tf=tf),
                                   _ce(s, y) + weight * value, rtol=1e-5, err_msg=method)
    # features="pre_relu" takes the stage maps as they are.
    raw_at = sum(losses.attention_transfer_loss(sf[k], tf[k], p=2).mean()
                 for k in ("stage1", "stage2"))
    pre = Objective(METHODS["at"].terms, features="pre_relu")
    np.testing.assert_allclose(_loss(pre, s, t, y, sf=sf, tf=tf), _ce(s, y) + 1000 * raw_at,
                               rtol=1e-5)
    assert abs(float(raw_at - at)) > 1e-4  # the two conventions differ on these maps


# ------------------------------------------------------------------------------ parts

def test_parts_are_keyed_by_term_warmed_up_and_sum_to_the_loss():
    s, t, y = _logits(1)
    dkd = losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0).mean()
    for epoch in (5.0, 30.0):
        loss, parts, state = objectives.evaluate_objective(
            METHODS["dkd"], student_logits=s, teacher_logits=t, labels=y, epoch=epoch)
        assert set(parts) == {"ce", "dkd"} and state is None
        np.testing.assert_allclose(parts["ce"], _ce(s, y), rtol=1e-5)
        np.testing.assert_allclose(parts["dkd"], 1.0 * min(epoch / 20.0, 1.0) * dkd, rtol=1e-5)
        np.testing.assert_allclose(parts["ce"] + parts["dkd"], loss, rtol=1e-6)
    loss, parts, _ = objectives.evaluate_objective(
        METHODS["kd"], student_logits=s, teacher_logits=t, labels=y, epoch=0.0)
    np.testing.assert_allclose(parts["ce"], 0.1 * _ce(s, y), rtol=1e-5)
    np.testing.assert_allclose(parts["kd"], 0.9 * losses.soft_target_kl(s, t, temperature=4.0)
                               .mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["ce"] + parts["kd"], loss, rtol=1e-6)


# ------------------------------------------------------------- overrides and validation

def test_overrides_change_exactly_what_they_name():
    base = METHODS["kd"]
    obj = objectives.from_method("kd", "kd.temperature=5", "ce.weight=0.2")
    assert obj.term("kd").arguments == {"temperature": 5.0}
    assert obj.term("kd").weight == base.term("kd").weight == 0.9
    assert obj.term("kd").warmup_epochs == base.term("kd").warmup_epochs
    assert obj.term("ce").weight == 0.2 and obj.term("ce").arguments == {}
    assert obj.features == base.features and [t.name for t in obj.terms] == ["ce", "kd"]
    assert METHODS["kd"].term("kd").arguments == {"temperature": 4.0}  # the preset is unchanged
    s, t, y = _logits(2)
    np.testing.assert_allclose(
        _loss(obj, s, t, y),
        0.2 * _ce(s, y) + 0.9 * losses.soft_target_kl(s, t, temperature=5.0).mean(), rtol=1e-5)
    weight = METHODS["none"].override("ce.weight=0.5").term("ce").weight
    assert weight == 0.5 and type(weight) is float
    assert type(METHODS["none"].override("ce.weight=1").term("ce").weight) is float
    warm = objectives.from_method("dkd", "dkd.warmup_epochs=1")
    assert warm.term("dkd").warmup_epochs == 1.0 and warm.term("dkd").weight == 1.0


def test_objectives_are_hashable_and_equal_when_built_the_same_way():
    a, b = Term.of("kd", temperature=5), Term.of("kd", temperature=5.0)
    assert a == b and hash(a) == hash(b)
    assert type(dict(a.kwargs)["temperature"]) is float  # coerced, not merely 5 == 5.0
    assert Term.of("kd", 0.9, temperature=4.0) != Term.of("kd", 0.9, temperature=5.0)
    assert Term.of("kd", 0.9) != Term.of("kd", 0.8)
    x = Objective((Term.of("ce", 0.1), Term.of("kd", 0.9, temperature=4)))
    assert x == METHODS["kd"] and hash(x) == hash(METHODS["kd"])
    assert objectives.from_method("crd") == objectives.from_method("crd")
    assert len({x, METHODS["kd"], METHODS["dkd"]}) == 2
    assert objectives.from_method("kd", "kd.temperature=4") == METHODS["kd"]


@pytest.mark.parametrize("build, error, message", [
    (lambda: Term.of("kd", nonsense=1), ValueError, "nonsense"),
    (lambda: Term.of("no_such_term"), ValueError, "unknown term 'no_such_term'"),
    (lambda: Term.of("kd", -1.0), ValueError, "weight must be finite and >= 0"),
    (lambda: Term.of("kd", warmup_epochs=-1.0), ValueError, "warmup_epochs"),
    (lambda: Term.of("kd", temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: Term.of("crd", momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (lambda: Term.of("crd", num_negatives=10.5), ValueError, "must be an integer"),
    (lambda: Term.of("fitnet", stage=2), ValueError, "must be a str"),
    (lambda: Objective((Term.of("ce"), Term.of("kd"), Term.of("ce"))), ValueError, "once"),
    (lambda: Objective(()), ValueError, "at least one term"),
    (lambda: Objective((Term.of("ce"),), features="both"), ValueError,
     "features must be one of"),
    (lambda: objectives.parse_override("kd.temperature"), ValueError, "TERM.KEY=VALUE"),
    (lambda: objectives.parse_override("temperature=5"), ValueError, "TERM.KEY=VALUE"),
    (lambda: objectives.from_method("kd", "kd.nonsense=1"), ValueError, "nonsense"),
    (lambda: objectives.from_method("kd", "kd.weight=-2"), ValueError, "weight"),
    (lambda: objectives.from_method("kd", "dkd.beta=2"), KeyError, "no term 'dkd'"),
    (lambda: objectives.from_method("no_such_method"), ValueError, "unknown method"),
])
def test_mistakes_raise_naming_what_to_change(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_parse_override_reads_python_literals():
    assert objectives.parse_override(" kd.temperature = 5 ") == ("kd", "temperature", 5)
    assert objectives.parse_override("crd.sampler='uniform'") == ("crd", "sampler", "uniform")
    assert objectives.parse_override("crd.sampler=uniform") == ("crd", "sampler", "uniform")
    name, key, value = objectives.parse_override("ce.weight=0.5")
    assert (name, key, value) == ("ce", "weight", 0.5) and type(value) is float


def test_every_registered_term_is_in_a_preset():
    used = {t.name for obj in METHODS.values() for t in obj.all_terms}
    assert used == set(objectives.registered_terms())
    # SimKD's only loss is its feature loss (the authors' -c 0 -d 0 -b 1).
    assert all(obj.features == "post_relu" and obj.terms[0].name == "ce"
               for name, obj in METHODS.items() if name != "simkd")
    assert [t.name for t in METHODS["simkd"].terms] == ["simkd"]


# ------------------------------------------------------------------ adding a method

@pytest.fixture
def clean_registry():
    """Restores the term registry and METHODS after a test that registers its own."""
    registry, methods = dict(objectives.terms._REGISTRY), dict(objectives.METHODS)
    yield
    objectives.terms._REGISTRY.clear()
    objectives.terms._REGISTRY.update(registry)
    objectives.METHODS.clear()
    objectives.METHODS.update(methods)


def test_a_new_term_registered_here_is_evaluated_and_becomes_a_method(clean_registry):
    @objectives.register_term("test_l2_logits", uses=("teacher",), defaults={"scale": 1.0},
                              replace=True)
    def _l2_logits(x, *, scale):
        return scale * jnp.mean(jnp.square(x.student_logits - x.teacher_logits))

    assert objectives.registered_terms()["test_l2_logits"].uses == {"teacher"}
    with pytest.raises(ValueError, match="already registered"):
        objectives.register_term("test_l2_logits", _l2_logits)
    obj = Objective((Term.of("ce"), Term.of("test_l2_logits", 0.5, scale=2.0)))
    assert obj.needs_teacher and not obj.needs_features and not obj.has_heads
    assert obj.as_dict()["terms"][1] == {"name": "test_l2_logits", "weight": 0.5,
                                         "warmup_epochs": 0.0, "scale": 2.0}
    s, t, y = _logits(3)
    loss, parts, state = objectives.evaluate_objective(obj, student_logits=s, teacher_logits=t,
                                                       labels=y, epoch=0.0)
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    l2 = 0.5 * 2.0 * np.mean((s64 - t64) ** 2)
    assert set(parts) == {"ce", "test_l2_logits"} and state is None
    np.testing.assert_allclose(parts["test_l2_logits"], l2, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], _np_ce(s, y), rtol=1e-5)
    np.testing.assert_allclose(loss, _np_ce(s, y) + l2, rtol=1e-5)
    # The default scale applies when the term does not set it.
    _, parts, _ = objectives.evaluate_objective(
        Objective((Term.of("test_l2_logits", 0.5),)), student_logits=s, teacher_logits=t,
        labels=y, epoch=0.0)
    np.testing.assert_allclose(parts["test_l2_logits"], l2 / 2.0, rtol=1e-5)

    objectives.register_method("test_l2_logits", obj)
    assert objectives.from_method("test_l2_logits") is obj
    with pytest.raises(ValueError, match="exists"):
        objectives.register_method("test_l2_logits", obj)
    changed = objectives.from_method("test_l2_logits", "test_l2_logits.scale=3")
    assert changed.term("test_l2_logits").arguments == {"scale": 3.0}


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Add a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_add_a_method_example_runs(clean_registry):
    exec(compile(_readme_example(), "README.md", "exec"), {})  # noqa: S102
    s, t, y = _logits(4)
    obj = objectives.from_method("logit_mse", "logit_mse.scale=2")
    loss, parts, _ = objectives.evaluate_objective(obj, student_logits=s, teacher_logits=t,
                                                   labels=y, epoch=0.0)
    mse = 0.5 * 2.0 * np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2)
    np.testing.assert_allclose(parts["logit_mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(loss, _np_ce(s, y) + mse, rtol=1e-5)


# ---------------------------------------------------------------------------- heads

# One batch shape throughout, so that op-by-op execution reuses its compiled ops; models are
# initialised under jit with "rbg" keys, which compile in a fraction of threefry's time.
X = _normal(np.random.default_rng(7), 4, 32, 32, 3)


def _init(model, seed, **kwargs):
    return jax.jit(lambda key: model.init(key, X, train=False, **kwargs))(
        jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def teacher_features():
    teacher = TinyNet(width=8)
    return teacher.apply(_init(teacher, 2), X, train=False, return_features=True)[1]


def _student(method):
    model = objectives.prepare_student(TinyNet(width=4), METHODS[method], TinyNet(width=8))
    return model, _init(model, 1, return_features=True)


@pytest.mark.parametrize("method", ["fitnet", "vid", "crd", "reviewkd"])
def test_heads_train_beside_the_backbone_and_stay_out_of_predictions(method, teacher_features):
    model, variables = _student(method)
    assert isinstance(model, objectives.Student)
    assert set(variables["params"]) == {"backbone", f"head_{method}"}
    assert "backbone" in variables["batch_stats"]
    plain = {"params": variables["params"]["backbone"],
             "batch_stats": variables["batch_stats"]["backbone"]}
    np.testing.assert_array_equal(model.apply(variables, X, train=False),
                                  TinyNet(width=4).apply(plain, X, train=False))
    # The head's output depends on the head's parameters: they receive a gradient.

    def head_sum(head_params):
        params = {**variables["params"], f"head_{method}": head_params}
        _, _, heads = model.apply({**variables, "params": params}, X, train=False,
                                  return_features=True, teacher_features=teacher_features)
        assert set(heads) == {method}
        return sum(jnp.sum(jnp.sin(v)) for v in jax.tree_util.tree_leaves(heads[method]))

    grads = jax.jit(jax.grad(head_sum))(variables["params"][f"head_{method}"])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_methods_without_heads_return_the_backbone_itself():
    # CC is computed on the pooled embeddings themselves (objectives.library._cc): it has no head.
    backbone = TinyNet(width=4)
    for method in ("none", "kd", "at", "sp", "cc"):
        assert not METHODS[method].has_heads
        assert objectives.prepare_student(backbone, METHODS[method], TinyNet()) is backbone


def test_vid_starts_from_repdistillers_variance_of_5():
    params = _student("vid")[1]["params"]["head_vid"]
    scales = {k: v for k, v in params.items() if k.endswith("log_scale")}
    # One per teacher channel per shared stage (TinyNet(width=8): 8 and 16 channels).
    assert {k: v.shape for k, v in scales.items()} == {"stage1_log_scale": (8,),
                                                       "stage2_log_scale": (16,)}
    for v in scales.values():
        np.testing.assert_allclose(jax.nn.softplus(v) + 1e-5, 5.0, rtol=1e-6)


@pytest.mark.parametrize("shape_in, size", [((1, 1), 4), ((4, 4), 8), ((8, 8), 4),
                                            ((6, 6), 4), ((6, 8), 4)])
def test_reviewkd_resizes_like_pytorch_nearest(shape_in, size):
    h, w = shape_in
    x = np.arange(2 * h * w * 3, dtype=np.float32).reshape(2, h, w, 3)
    rows = [math.floor(i * h / size) for i in range(size)]  # F.interpolate(mode="nearest")
    cols = [math.floor(j * w / size) for j in range(size)]
    expected = np.empty((2, size, size, 3), np.float32)
    for i in range(size):
        for j in range(size):
            expected[:, i, j] = x[:, rows[i], cols[j]]
    np.testing.assert_array_equal(objectives.heads._nearest(jnp.asarray(x), size), expected)


def test_reviewkd_fusion_maps_have_the_teachers_shapes_shallow_to_deep(teacher_features):
    model, variables = _student("reviewkd")
    _, _, heads = model.apply(variables, X, train=False, return_features=True,
                              teacher_features=teacher_features)
    maps = heads["reviewkd"]["maps"]
    t = teacher_features
    assert [m.shape for m in maps] == [t["stage1"].shape, t["stage2"].shape,
                                       (4, 1, 1, t["pooled"].shape[-1])]
    assert [m.shape for m in maps] == [(4, 32, 32, 8), (4, 16, 16, 16), (4, 1, 1, 16)]


# ------------------------------------------------------------------------------ CRD

def test_crd_state_is_repdistillers_memory_and_clamps_negatives_with_a_warning():
    n, labels = 200, np.arange(200) % 4  # 150 examples outside each class
    obj = objectives.from_method("crd", "crd.num_negatives=100")
    state = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=0)
    assert set(state) == {"crd"}
    state = state["crd"]
    bound = 1 / math.sqrt(128 / 3)
    for name in ("memory_student", "memory_teacher"):
        m = np.asarray(state[name])
        assert m.shape == (n, 128) and m.dtype == np.float32
        assert m.min() >= -bound and m.max() <= bound
        assert m.min() < -0.95 * bound and m.max() > 0.95 * bound  # spans the range
        assert abs(m.mean()) < 0.01 * bound
    assert not np.allclose(state["memory_student"], state["memory_teacher"])
    np.testing.assert_array_equal(state["z"], np.zeros(2))
    np.testing.assert_array_equal(state["labels"], labels)
    assert state["negatives"].shape == (100,)
    again = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=0)["crd"]
    np.testing.assert_array_equal(again["memory_student"], state["memory_student"])

    with pytest.warns(UserWarning, match="16384 negatives requested but only 150"):
        clamped = objectives.init_state(METHODS["crd"], num_examples=n, train_labels=labels,
                                        seed=0)
    assert clamped["crd"]["memory_student"].shape == (n, 128)
    assert clamped["crd"]["negatives"].shape == (150,)

    assert objectives.init_state(METHODS["kd"]) is None
    assert objectives.init_state(METHODS["vid"], num_examples=n, train_labels=labels) is None
    with pytest.raises(ValueError, match="sampler"):
        objectives.init_state(objectives.from_method("crd", "crd.sampler='nope'"),
                              num_examples=n, train_labels=labels)
    with pytest.raises(ValueError, match="training labels"):
        objectives.init_state(obj, num_examples=n, train_labels=labels[:10])


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)


def test_crd_term_is_the_nce_loss_then_the_memory_update_with_a_fixed_normaliser():
    n, labels = 40, np.arange(40) % 4
    obj = objectives.from_method("crd", "crd.num_negatives=8")
    state = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=1)
    s_logits, t_logits, y = _logits(5, b=6)
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    rng = np.random.default_rng(5)
    batches = [(jnp.array([3, 17, 0, 22, 9, 31]), keys[0]), (jnp.arange(10, 16), keys[1])]
    z_first = None
    for step, (index, key) in enumerate(batches):
        s, t = _unit(rng, 6, 128), _unit(rng, 6, 128)
        old = state["crd"]
        loss, parts, state = objectives.evaluate_objective(
            obj, student_logits=s_logits, teacher_logits=t_logits, labels=y, epoch=0.0,
            student_features={}, teacher_features={},
            heads={"crd": {"student": s, "teacher": t}}, state={"crd": old}, index=index,
            key=key)
        idx = losses.crd_sample_negatives(key, index, num_examples=n, num_negatives=8,
                                          dataset_labels=labels)
        estimate = np.asarray(jnp.stack(losses.crd_normalizers(
            s, t, old["memory_student"], old["memory_teacher"], idx)))
        if step == 0:
            z_first = estimate
            assert np.all(estimate > 0)
        else:  # the second batch's own estimate differs; the first one is kept
            assert not np.allclose(estimate, z_first, rtol=1e-3)
        np.testing.assert_allclose(state["crd"]["z"], z_first, rtol=1e-6)
        nce = losses.crd_nce_loss(s, t, old["memory_student"], old["memory_teacher"], idx,
                                  temperature=0.07,
                                  normalizers=(z_first[0], z_first[1])).mean()
        np.testing.assert_allclose(parts["crd"], 0.8 * nce, rtol=1e-5)
        np.testing.assert_allclose(parts["ce"], _ce(s_logits, y), rtol=1e-5)
        np.testing.assert_allclose(loss, parts["ce"] + 0.8 * nce, rtol=1e-5)
        for name, emb in (("memory_student", s), ("memory_teacher", t)):
            expected = losses.crd_memory_update(old[name], emb, index, momentum=0.5)
            np.testing.assert_allclose(state["crd"][name], expected, rtol=1e-6, atol=1e-7)
            assert not np.allclose(state["crd"][name][index], old[name][index])
        np.testing.assert_array_equal(state["crd"]["labels"], labels)
        assert state["crd"]["negatives"].shape == (8,)

    with pytest.raises(ValueError, match="index"):
        objectives.evaluate_objective(obj, student_logits=s_logits, teacher_logits=t_logits,
                                      labels=y, epoch=0.0, student_features={},
                                      teacher_features={},
                                      heads={"crd": {"student": s, "teacher": t}},
                                      state=state, key=keys[0])


def test_crd_heads_learn_to_contrast():
    """Linear heads over fixed features of 64 distinct examples, trained on CRD alone with the
    memory updated every step: the contrastive loss falls."""
    n, d_in, dim, batch = 64, 32, 16, 16
    obj = Objective((Term.of("crd", 1.0, dim=dim, num_negatives=16),))
    labels = np.arange(n) % 4
    state = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=0)
    rng = np.random.default_rng(0)
    feats_s, feats_t = _normal(rng, n, d_in), _normal(rng, n, d_in)
    bound = 1 / math.sqrt(d_in)  # PyTorch's Linear initialisation
    params = {k: jnp.asarray(rng.uniform(-bound, bound, (d_in, dim)), jnp.float32)
              for k in ("s", "t")}
    tx = optax.adam(1e-2)

    def unit(v):
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    @jax.jit
    def step(params, opt, state, index, key, learn):
        def loss_fn(p):
            heads = {"crd": {"student": unit(feats_s[index] @ p["s"]),
                             "teacher": unit(feats_t[index] @ p["t"])}}
            loss, _, new = objectives.evaluate_objective(
                obj, student_logits=jnp.zeros((batch, 4)), labels=jnp.zeros(batch, jnp.int32),
                epoch=0.0, student_features={}, teacher_features={}, heads=heads, state=state,
                index=index, key=key)
            return loss, new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt)
        updates = jax.tree.map(lambda u: learn * u, updates)
        return optax.apply_updates(params, updates), opt, new, loss

    def train(learn):
        p, opt, st = params, tx.init(params), state
        order = np.random.default_rng(0).permutation(n)
        history = []
        for i in range(60):
            j = i % (n // batch)
            index = jnp.asarray(order[j * batch:(j + 1) * batch])
            p, opt, st, loss = step(p, opt, st, index,
                                    jax.random.fold_in(jax.random.PRNGKey(1), i), learn)
            history.append(float(loss))
        assert np.all(np.isfinite(history))
        return np.mean(history[:10]), np.mean(history[-10:]), np.round(history, 2)

    first, last, history = train(1.0)
    assert last < 0.9 * first, history
    # Not the memory bank alone: with the heads frozen the loss does not fall.
    frozen_first, frozen_last, frozen = train(0.0)
    assert frozen_last > 0.95 * frozen_first, frozen
    assert last < 0.5 * frozen_last, (history, frozen)


def test_backbone_variables_drop_the_heads():
    backbone = TinyNet(width=4)
    model = objectives.prepare_student(backbone, METHODS["fitnet"], TinyNet(width=8))
    variables = _init(model, 0, return_features=True)
    exported = objectives.backbone_variables(model, variables)
    reference = _init(backbone, 0)
    assert jax.tree.structure(exported) == jax.tree.structure(reference)
    plain = {"params": 1, "batch_stats": 2}
    assert objectives.backbone_variables(backbone, plain) == plain
