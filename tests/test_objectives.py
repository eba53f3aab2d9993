"""Objectives as registered weighted terms: equivalence with the earlier flat objectives, parts,
overrides, adding a method (the README's example), heads, VID, ReviewKD and CRD's state."""

import math
import pathlib
import re
import warnings

import chex
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


def _logits(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (3 * jax.random.normal(k1, (B, C)), 3 * jax.random.normal(k2, (B, C)),
            jax.random.randint(k3, (B,), 0, C))


def _features(seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"stage1": jax.random.normal(ks[0], (B, 8, 8, 4)),
            "stage2": jax.random.normal(ks[1], (B, 4, 4, 8)),
            "pooled": jax.nn.relu(jax.random.normal(ks[2], (B, 8)))}


def _ce(s, y):
    return optax.softmax_cross_entropy_with_integer_labels(s, y).mean()


def _loss(method, s, t, y, epoch=0.7, sf=None, tf=None):
    return objectives.objective_loss(METHODS[method], student_logits=s, teacher_logits=t,
                                     labels=y, epoch=epoch, student_features=sf,
                                     teacher_features=tf)


# ------------------------------------------------------- the earlier objectives, unchanged

def test_logit_presets_compute_what_the_flat_objectives_computed():
    s, t, y = _logits()
    np.testing.assert_allclose(_loss("none", s, t, y), _ce(s, y), rtol=1e-6)
    np.testing.assert_allclose(
        _loss("kd", s, t, y),
        losses.distillation_loss(s, t, y, temperature=4.0, alpha=0.9).mean(), rtol=1e-5)
    for epoch in (0.7, 25.0):
        expected = _ce(s, y) + min(epoch / 20, 1.0) * losses.dkd_loss(
            s, t, y, alpha=1.0, beta=8.0, temperature=4.0).mean()
        np.testing.assert_allclose(_loss("dkd", s, t, y, epoch), expected, rtol=1e-5)
    np.testing.assert_allclose(
        _loss("dist", s, t, y),
        _ce(s, y) + losses.dist_loss(s, t, beta=1.0, gamma=1.0, temperature=4.0), rtol=1e-5)


def test_feature_presets_use_post_relu_maps_with_the_benchmark_weights():
    s, t, y = _logits()
    sf, tf = _features(1), _features(2)
    relu = jax.nn.relu
    at = sum(losses.attention_transfer_loss(relu(sf[k]), relu(tf[k]), p=2).mean()
             for k in ("stage1", "stage2"))
    np.testing.assert_allclose(_loss("at", s, t, y, sf=sf, tf=tf), _ce(s, y) + 1000 * at,
                               rtol=1e-5)
    for method, fn, weight in [("sp", losses.similarity_preserving_loss, 3000.0),
                               ("rkd", losses.rkd_loss, 1.0), ("pkt", losses.pkt_loss, 30000.0)]:
        expected = _ce(s, y) + weight * fn(sf["pooled"], tf["pooled"])
        np.testing.assert_allclose(_loss(method, s, t, y, sf=sf, tf=tf), expected, rtol=1e-5,
                                   err_msg=method)
    # pre_relu takes the maps as they are: a different number here.
    pre = Objective(METHODS["at"].terms, features="pre_relu")
    raw = objectives.objective_loss(pre, student_logits=s, teacher_logits=t, labels=y,
                                    epoch=0.0, student_features=sf, teacher_features=tf)
    assert abs(float(raw) - float(_loss("at", s, t, y, sf=sf, tf=tf))) > 1e-3


def test_parts_are_weighted_warmed_up_and_sum_to_the_loss():
    s, t, y = _logits()
    loss, parts, state = objectives.evaluate_objective(
        METHODS["dkd"], student_logits=s, teacher_logits=t, labels=y, epoch=5.0)
    assert set(parts) == {"ce", "dkd"} and state is None
    dkd = losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0).mean()
    np.testing.assert_allclose(parts["dkd"], 5.0 / 20.0 * dkd, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"] + parts["dkd"], loss, rtol=1e-6)


# ------------------------------------------------------------- overrides and validation

def test_overrides_change_exactly_what_they_name():
    obj = objectives.from_method("kd", "kd.temperature=5", "ce.weight=0.2")
    assert obj.term("kd").arguments == {"temperature": 5.0} and obj.term("kd").weight == 0.9
    assert obj.term("ce").weight == 0.2
    assert Objective.override(METHODS["none"], "ce.weight=1").term("ce").weight == 1.0
    assert isinstance(METHODS["none"].override("ce.weight=1").term("ce").weight, float)
    assert Term.of("kd", temperature=5) == Term.of("kd", temperature=5.0)
    assert hash(objectives.from_method("crd")) == hash(objectives.from_method("crd"))


@pytest.mark.parametrize("build, message", [
    (lambda: Term.of("kd", nonsense=1), "has no argument nonsense"),
    (lambda: Term.of("nope"), "unknown term 'nope'"),
    (lambda: Term.of("kd", -1.0), "weight must be finite and >= 0"),
    (lambda: Term.of("kd", temperature=0.0), "temperature must be > 0"),
    (lambda: Term.of("crd", momentum=1.5), "momentum must be in \\[0, 1\\]"),
    (lambda: Term.of("fitnet", stage=2), "must be a str"),
    (lambda: Term.of("crd", num_negatives=10.5), "must be an integer"),
    (lambda: Objective((Term.of("ce"), Term.of("ce"))), "once in an objective"),
    (lambda: objectives.parse_override("kd.temperature"), "TERM.KEY=VALUE"),
    (lambda: objectives.from_method("kd", "dkd.beta=2"), "no term 'dkd'"),
    (lambda: objectives.from_method("bogus"), "unknown method"),
])
def test_mistakes_raise_naming_what_to_change(build, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build()


def test_every_preset_builds_and_every_registered_term_is_reachable():
    used = {t.name for obj in METHODS.values() for t in obj.terms}
    assert used == set(objectives.registered_terms())
    assert all(obj.features == "post_relu" for obj in METHODS.values())


# ------------------------------------------------------------------ adding a method

def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Add a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_add_a_method_example_works():
    namespace = {}
    try:
        exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102
        s, t, y = _logits(3)
        obj = objectives.from_method("logit_mse", "logit_mse.scale=2")
        loss, parts, _ = objectives.evaluate_objective(obj, student_logits=s, teacher_logits=t,
                                                       labels=y, epoch=0.0)
        s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
        log_p = s64 - np.log(np.exp(s64 - s64.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - s64.max(1, keepdims=True)
        ce = -log_p[np.arange(B), np.asarray(y)].mean()
        mse = 2.0 * np.mean((s64 - t64) ** 2)
        np.testing.assert_allclose(parts["logit_mse"], 0.5 * mse, rtol=1e-5)
        np.testing.assert_allclose(loss, ce + 0.5 * mse, rtol=1e-5)
        assert objectives.registered_terms()["logit_mse"].uses == {"teacher"}
    finally:
        objectives._REGISTRY.pop("logit_mse", None)
        objectives.METHODS.pop("logit_mse", None)


# ---------------------------------------------------------------------------- heads

@pytest.mark.parametrize("method", ["fitnet", "vid", "crd", "reviewkd"])
def test_heads_train_beside_the_backbone_and_stay_out_of_predictions(method):
    teacher, backbone = TinyNet(width=8), TinyNet(width=4)
    model = objectives.prepare_student(backbone, METHODS[method], teacher)
    assert isinstance(model, objectives.Student)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), x, train=False, return_features=True)
    assert set(variables["params"]) == {"backbone", f"head_{method}"}
    plain = {"params": variables["params"]["backbone"],
             "batch_stats": variables["batch_stats"]["backbone"]}
    np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                  backbone.apply(plain, x, train=False))
    _, _, heads = model.apply(variables, x, train=False, return_features=True)
    assert set(heads) == {method}


def test_methods_without_heads_keep_the_backbone():
    backbone = TinyNet(width=4)
    for method in ("kd", "at", "cc"):
        assert objectives.prepare_student(backbone, METHODS[method], TinyNet()) is backbone


def test_vid_starts_from_repdistillers_variance_of_5():
    model = objectives.prepare_student(TinyNet(width=4), METHODS["vid"], TinyNet(width=8))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False,
                        return_features=True)["params"]["head_vid"]
    scales = {k: v for k, v in params.items() if k.endswith("log_scale")}
    assert set(scales) == {"stage1_log_scale", "stage2_log_scale"}
    assert scales["stage2_log_scale"].shape == (16,)  # the teacher's channels
    for v in scales.values():
        np.testing.assert_allclose(jax.nn.softplus(v) + 1e-5, 5.0, rtol=1e-5)


@pytest.mark.parametrize("size_in, size_out", [(1, 4), (4, 8), (8, 4), (6, 4)])
def test_reviewkd_resizes_like_pytorch_nearest(size_in, size_out):
    x = np.arange(2 * size_in * size_in * 3, dtype=np.float32).reshape(2, size_in, size_in, 3)
    src = [math.floor(i * size_in / size_out) for i in range(size_out)]
    np.testing.assert_array_equal(objectives._nearest(jnp.asarray(x), size_out),
                                  x[:, src][:, :, src])


def test_reviewkd_fusion_maps_have_the_teachers_shapes_shallow_to_deep():
    model = objectives.prepare_student(TinyNet(width=4), METHODS["reviewkd"], TinyNet(width=8))
    x = jnp.zeros((3, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False, return_features=True)
    _, t_features = TinyNet(width=8).init_with_output(jax.random.PRNGKey(1), x, train=False,
                                                      return_features=True)[0]
    _, _, heads = model.apply(variables, x, train=False, return_features=True,
                              teacher_features=t_features)
    shapes = [m.shape for m in heads["reviewkd"]["maps"]]
    assert shapes == [t_features["stage1"].shape, t_features["stage2"].shape, (3, 1, 1, 16)]


# ------------------------------------------------------------------------------ CRD

def test_crd_state_is_repdistillers_memory_and_clamps_negatives_with_a_warning():
    labels = np.arange(200) % 4
    obj = objectives.from_method("crd", "crd.num_negatives=100")
    state = objectives.init_state(obj, num_examples=200, train_labels=labels, seed=0)["crd"]
    bound = 1 / math.sqrt(128 / 3)
    for name in ("memory_student", "memory_teacher"):
        assert state[name].shape == (200, 128)
        assert float(jnp.abs(state[name]).max()) <= bound
    np.testing.assert_array_equal(state["z"], 0.0)
    assert state["negatives"].shape == (100,)
    with pytest.warns(UserWarning, match="only 150 examples"):
        clamped = objectives.init_state(METHODS["crd"], num_examples=200, train_labels=labels)
    assert clamped["crd"]["negatives"].shape == (150,)
    assert objectives.init_state(METHODS["kd"]) is None
    with pytest.raises(ValueError, match="sampler"):
        objectives.init_state(objectives.from_method("crd", "crd.sampler='nope'"),
                              num_examples=200, train_labels=labels)


def _unit(key, shape):
    x = jax.random.normal(key, shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_crd_term_is_the_nce_loss_then_the_memory_update_with_fixed_normalisers():
    n, labels = 40, np.arange(40) % 4
    obj = objectives.from_method("crd", "crd.num_negatives=8")
    state = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=1)
    s_logits, t_logits, y = _logits(4)
    keys = jax.random.split(jax.random.PRNGKey(5), 6)
    zs = []
    for step, (index, key) in enumerate([(jnp.arange(6), keys[0]),
                                         (jnp.arange(6, 12), keys[1])]):
        s, t = _unit(keys[2 + 2 * step], (6, 128)), _unit(keys[3 + 2 * step], (6, 128))
        old = state["crd"]
        loss, parts, state = objectives.evaluate_objective(
            obj, student_logits=s_logits[:6], teacher_logits=t_logits[:6], labels=y[:6],
            epoch=0.0, student_features={}, teacher_features={},
            heads={"crd": {"student": s, "teacher": t}}, state={"crd": old}, index=index,
            key=key)
        idx = losses.crd_sample_negatives(key, index, num_examples=n, num_negatives=8,
                                          dataset_labels=labels)
        estimate = jnp.stack(losses.crd_normalizers(s, t, old["memory_student"],
                                                    old["memory_teacher"], idx))
        z = estimate if step == 0 else zs[0]
        zs.append(z)
        np.testing.assert_allclose(state["crd"]["z"], z, rtol=1e-6)
        nce = losses.crd_nce_loss(s, t, old["memory_student"], old["memory_teacher"], idx,
                                  normalizers=(z[0], z[1])).mean()
        np.testing.assert_allclose(parts["crd"], 0.8 * nce, rtol=1e-5)
        np.testing.assert_allclose(loss, parts["ce"] + parts["crd"], rtol=1e-6)
        for name, emb in (("memory_student", s), ("memory_teacher", t)):
            np.testing.assert_allclose(
                state["crd"][name], losses.crd_memory_update(old[name], emb, index,
                                                             momentum=0.5), rtol=1e-6)
    assert not np.allclose(zs[0], 0.0)
    with pytest.raises(ValueError, match="index"):
        objectives.evaluate_objective(obj, student_logits=s_logits, teacher_logits=t_logits,
                                      labels=y, epoch=0.0, student_features={},
                                      teacher_features={}, state=state)


def test_crd_heads_learn_to_contrast():
    """Linear heads over fixed features of 64 distinct examples, trained on CRD alone with the
    memory updated every step: the contrastive loss falls."""
    n, d_in, dim = 64, 32, 16
    obj = Objective((Term.of("crd", 1.0, dim=dim, num_negatives=16),))
    labels = np.arange(n) % 4
    state = objectives.init_state(obj, num_examples=n, train_labels=labels, seed=0)
    kx, ky, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    feats_s, feats_t = jax.random.normal(kx, (n, d_in)), jax.random.normal(ky, (n, d_in))
    params = {"s": 0.1 * jax.random.normal(kw, (d_in, dim)),
              "t": 0.1 * jax.random.normal(jax.random.fold_in(kw, 1), (d_in, dim))}
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

    @jax.jit
    def step(params, opt, state, index, key):
        def loss_fn(p):
            heads = {"crd": {"student": unit(feats_s[index] @ p["s"]),
                             "teacher": unit(feats_t[index] @ p["t"])}}
            loss, _, new = objectives.evaluate_objective(
                obj, student_logits=jnp.zeros((16, 4)), labels=jnp.zeros(16, jnp.int32),
                epoch=0.0, student_features={}, teacher_features={}, heads=heads, state=state,
                index=index, key=key)
            return loss, new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, new, loss

    order = np.random.default_rng(0).permutation(n)
    history = []
    for i in range(80):
        index = jnp.asarray(order[(i % 4) * 16:(i % 4 + 1) * 16])
        params, opt, state, loss = step(params, opt, state, index, jax.random.PRNGKey(100 + i))
        history.append(float(loss))
    assert np.all(np.isfinite(history))
    assert np.mean(history[-10:]) < 0.9 * np.mean(history[8:18]), history
