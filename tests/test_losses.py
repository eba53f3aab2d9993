"""Tests for kd_jax.losses.

Every loss is compared with an independent float64 NumPy reference written from
the paper's formula (loops or plain NumPy, never calling kd_jax), with and
without jit; properties users rely on are checked separately. float64 runs
inside ``jax.enable_x64(True)`` so x64 never leaks into other test files.
"""

import functools
import types

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from absl.testing import parameterized

from kd_jax import losses

# ----------------------------------------------------------------------------
# NumPy float64 references.
# ----------------------------------------------------------------------------


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_log_softmax(z, temperature=1.0):
    return np.log(np_softmax(z, temperature))


def ref_kl(s, t, temperature):
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    return temperature**2 * np.sum(p_t * np.log(p_t / p_s), axis=-1)


def ref_ce(s, t, temperature):
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    return -(temperature**2) * np.sum(p_t * np.log(p_s), axis=-1)


def ref_distillation(s, t, labels, temperature, alpha):
    p = np_softmax(s).reshape(-1, s.shape[-1])
    ce = -np.log(p[np.arange(p.shape[0]), labels.reshape(-1)]).reshape(labels.shape)
    return (1 - alpha) * ce + alpha * ref_kl(s, t, temperature)


def _kl_vec(p, q):
    return float(np.sum(p * np.log(p / q)))


def ref_dkd_parts(s, t, labels, temperature):
    """Per-example (TCKD, NCKD) without the T^2 factor, shaped like labels."""
    c = s.shape[-1]
    s2, t2, y2 = s.reshape(-1, c), t.reshape(-1, c), labels.reshape(-1)
    tckd, nckd = [], []
    for zs, zt, y in zip(s2, t2, y2):
        p_s, p_t = np_softmax(zs, temperature), np_softmax(zt, temperature)
        b_s = np.array([p_s[y], 1 - p_s[y]])
        b_t = np.array([p_t[y], 1 - p_t[y]])
        h_s = np.delete(p_s, y) / np.delete(p_s, y).sum()
        h_t = np.delete(p_t, y) / np.delete(p_t, y).sum()
        tckd.append(_kl_vec(b_t, b_s))
        nckd.append(_kl_vec(h_t, h_s))
    return np.reshape(tckd, labels.shape), np.reshape(nckd, labels.shape)


def ref_dkd(s, t, labels, alpha, beta, temperature):
    tckd, nckd = ref_dkd_parts(s, t, labels, temperature)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _pearson_eps(u, v):
    a, b = u - u.mean(), v - v.mean()
    return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)


def ref_dist(s, t, beta, gamma, temperature):
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    inter = np.mean([1 - _pearson_eps(p_s[b], p_t[b]) for b in range(s.shape[0])])
    intra = np.mean([1 - _pearson_eps(p_s[:, c], p_t[:, c]) for c in range(s.shape[1])])
    return np.float64(temperature**2 * (beta * inter + gamma * intra))


def ref_lskd(s, t, temperature):
    def z(x):
        return (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)

    return ref_kl(z(s), z(t), temperature)


def ref_hint(s, t):
    return np.array([np.mean((s[b] - t[b]) ** 2) for b in range(s.shape[0])])


def ref_at(s, t, p):
    out = []
    for b in range(s.shape[0]):
        maps = []
        for f in (s[b], t[b]):
            q = np.mean(np.abs(f) ** p, axis=-1).ravel()
            maps.append(q / max(np.linalg.norm(q), 1e-12))
        out.append(np.mean((maps[0] - maps[1]) ** 2))
    return np.array(out)


def ref_nst(s, t):
    out = []
    for b in range(s.shape[0]):
        us = [s[b, ..., c].ravel() for c in range(s.shape[-1])]
        ut = [t[b, ..., c].ravel() for c in range(t.shape[-1])]
        us = [u / max(np.linalg.norm(u), 1e-12) for u in us]
        ut = [u / max(np.linalg.norm(u), 1e-12) for u in ut]

        def k(a_list, b_list):
            return np.mean([np.dot(a, b) ** 2 for a in a_list for b in b_list])

        out.append(k(ut, ut) + k(us, us) - 2 * k(us, ut))
    return np.array(out)


def ref_sp(s, t):
    bsz = s.shape[0]

    def g(f):
        f = f.reshape(bsz, -1)
        gram = f @ f.T
        return gram / np.maximum(np.linalg.norm(gram, axis=1, keepdims=True), 1e-12)

    return np.float64(np.sum((g(s) - g(t)) ** 2) / bsz**2)


def _huber(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def ref_rkd(s, t, distance_weight, angle_weight):
    bsz = s.shape[0]
    s, t = s.reshape(bsz, -1), t.reshape(bsz, -1)

    def dists(x):
        d = np.zeros((bsz, bsz))
        for i in range(bsz):
            for j in range(bsz):
                if i != j:
                    d[i, j] = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), 1e-12))
        return d / (d.sum() / (bsz * (bsz - 1)))

    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    def angles(x):
        a = np.zeros((bsz, bsz, bsz))
        for i in range(bsz):
            for j in range(bsz):
                for k in range(bsz):
                    a[i, j, k] = np.dot(unit(x[j] - x[i]), unit(x[k] - x[i]))
        return a

    d_s, d_t, a_s, a_t = dists(s), dists(t), angles(s), angles(t)
    dist_term = np.mean([_huber(x) for x in (d_s - d_t).ravel()])
    angle_term = np.mean([_huber(x) for x in (a_s - a_t).ravel()])
    return np.float64(distance_weight * dist_term + angle_weight * angle_term)


def ref_pkt(s, t):
    eps = 1e-7
    bsz = s.shape[0]

    def cond(x):
        x = x.reshape(bsz, -1)
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = cond(s), cond(t)
    return np.float64(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


# ----------------------------------------------------------------------------
# Inputs and the table of losses.
# ----------------------------------------------------------------------------

B, C = 5, 7


def make_inputs(kind, seed=0):
    """float64 NumPy inputs for each argument layout."""
    rng = np.random.default_rng(seed)
    if kind == "logits":
        return rng.normal(size=(B, C)) * 2, rng.normal(size=(B, C)) * 2
    if kind == "logits3d":
        return rng.normal(size=(2, 3, C)) * 2, rng.normal(size=(2, 3, C)) * 2
    if kind == "labels":
        return (rng.normal(size=(B, C)) * 2, rng.normal(size=(B, C)) * 2,
                rng.integers(0, C, size=(B,)))
    if kind == "labels3d":
        return (rng.normal(size=(2, 3, C)) * 2, rng.normal(size=(2, 3, C)) * 2,
                rng.integers(0, C, size=(2, 3)))
    if kind == "same_feature":
        return rng.normal(size=(B, 3, 4, 2)), rng.normal(size=(B, 3, 4, 2))
    if kind == "nhwc":
        return rng.normal(size=(B, 3, 4, 3)), rng.normal(size=(B, 3, 4, 5))
    if kind == "embedding":
        return rng.normal(size=(B, 6)), rng.normal(size=(B, 4, 2))
    raise AssertionError(kind)


# name, kd_jax function (hyperparameters bound), reference, input kind.
LOSSES = [
    ("tempered_softmax", lambda s, t: losses.tempered_softmax(s, 2.5),
     lambda s, t: np_softmax(s, 2.5), "logits"),
    ("tempered_log_softmax", lambda s, t: losses.tempered_log_softmax(s, 2.5),
     lambda s, t: ref_log_softmax(s, 2.5), "logits"),
    ("soft_target_kl", functools.partial(losses.soft_target_kl, temperature=3.0),
     functools.partial(ref_kl, temperature=3.0), "logits"),
    ("soft_target_kl_3d", functools.partial(losses.soft_target_kl, temperature=3.0),
     functools.partial(ref_kl, temperature=3.0), "logits3d"),
    ("soft_target_cross_entropy",
     functools.partial(losses.soft_target_cross_entropy, temperature=2.0),
     functools.partial(ref_ce, temperature=2.0), "logits"),
    ("distillation_loss",
     functools.partial(losses.distillation_loss, temperature=4.0, alpha=0.7),
     functools.partial(ref_distillation, temperature=4.0, alpha=0.7), "labels"),
    ("dkd_loss",
     functools.partial(losses.dkd_loss, alpha=1.5, beta=8.0, temperature=4.0),
     functools.partial(ref_dkd, alpha=1.5, beta=8.0, temperature=4.0), "labels"),
    ("dkd_loss_3d",
     functools.partial(losses.dkd_loss, alpha=1.0, beta=2.0, temperature=1.5),
     functools.partial(ref_dkd, alpha=1.0, beta=2.0, temperature=1.5), "labels3d"),
    ("dist_loss",
     functools.partial(losses.dist_loss, beta=1.5, gamma=0.5, temperature=2.0),
     functools.partial(ref_dist, beta=1.5, gamma=0.5, temperature=2.0), "logits"),
    ("lskd_loss", functools.partial(losses.lskd_loss, temperature=2.0),
     functools.partial(ref_lskd, temperature=2.0), "logits"),
    ("hint_loss", losses.hint_loss, ref_hint, "same_feature"),
    ("attention_transfer_loss", losses.attention_transfer_loss,
     functools.partial(ref_at, p=2), "nhwc"),
    ("attention_transfer_loss_p3",
     functools.partial(losses.attention_transfer_loss, p=3),
     functools.partial(ref_at, p=3), "nhwc"),
    ("nst_loss", losses.nst_loss, ref_nst, "nhwc"),
    ("similarity_preserving_loss", losses.similarity_preserving_loss, ref_sp, "nhwc"),
    ("rkd_loss", losses.rkd_loss,
     functools.partial(ref_rkd, distance_weight=25.0, angle_weight=50.0), "embedding"),
    ("pkt_loss", losses.pkt_loss, ref_pkt, "embedding"),
]
REFERENCE_CASES = [
    dict(testcase_name=name, fn=fn, ref=ref, kind=kind) for name, fn, ref, kind in LOSSES
]
# One case per function; the others only add shapes or hyperparameters.
BASE_CASES = [c for c in REFERENCE_CASES if not c["testcase_name"].endswith(("_3d", "_p3"))]
EXTRA_CASES = [c for c in REFERENCE_CASES if c not in BASE_CASES]
# Losses proper (two model outputs in, a loss out), for property tests.
LOSS_CASES = [c for c in BASE_CASES if "softmax" not in c["testcase_name"]]


def _floats(args, dtype):
    return tuple(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)


def _check_float64(fn, ref, kind):
    args = make_inputs(kind)
    expected = ref(*args)
    with jax.enable_x64(True):
        out = fn(*args)
        assert out.dtype == jnp.float64
    chex.assert_shape(out, expected.shape)
    chex.assert_trees_all_close(np.asarray(out), expected, rtol=1e-6, atol=1e-12)


class ReferenceTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*BASE_CASES)
    def test_matches_float64_reference(self, fn, ref, kind):
        _check_float64(self.variant(fn), ref, kind)

    @parameterized.named_parameters(*EXTRA_CASES)
    def test_matches_float64_reference_more_shapes(self, fn, ref, kind):
        _check_float64(jax.jit(fn), ref, kind)

    @parameterized.named_parameters(*BASE_CASES)
    def test_float32_and_bfloat16_inputs(self, fn, ref, kind):
        args = make_inputs(kind, seed=1)
        expected = ref(*args)
        fn = jax.jit(fn)
        out = fn(*_floats(args, np.float32))
        self.assertEqual(out.dtype, jnp.float32)
        chex.assert_shape(out, expected.shape)
        chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=2e-4, atol=1e-5)
        # bfloat16 inputs are upcast before any arithmetic: the result is float32
        # and equals the float32 result on the same (bf16-representable) values.
        low = _floats(args, jnp.bfloat16)
        out_low = fn(*low)
        self.assertEqual(out_low.dtype, jnp.float32)
        chex.assert_tree_all_finite(out_low)
        chex.assert_trees_all_close(out_low, fn(*_floats(low, np.float32)), rtol=1e-6, atol=1e-7)


class PropertyTest(parameterized.TestCase):

    @parameterized.named_parameters(*LOSS_CASES)
    def test_gradients_match_finite_differences(self, fn, ref, kind):
        del ref
        args = make_inputs(kind, seed=2)
        if kind.startswith("labels"):
            s, t, labels = args
            f = lambda s, t: fn(s, t, labels)  # noqa: E731
        else:
            s, t = args
            f = fn
        with jax.enable_x64(True):
            jax.test_util.check_grads(jax.jit(f), (s, t), order=1, modes=["rev"])

    @parameterized.named_parameters(
        *[c for c in LOSS_CASES if c["kind"] in ("logits", "labels")])
    def test_finite_for_huge_float32_logits(self, fn, ref, kind):
        del ref
        args = list(_floats(make_inputs(kind, seed=4), np.float32))
        args[0], args[1] = args[0] * 5e3, args[1] * 5e3  # |logits| up to ~1e4
        rest = args[2:]
        value, grad = jax.jit(jax.value_and_grad(lambda s: jnp.sum(fn(s, args[1], *rest))))(
            args[0])
        chex.assert_tree_all_finite((value, grad))

    @parameterized.named_parameters(
        *[c for c in LOSS_CASES if c["kind"] in ("logits", "labels")])
    def test_invariant_to_per_example_logit_shift(self, fn, ref, kind):
        del ref
        args = make_inputs(kind, seed=5)
        shift_s = np.random.default_rng(6).normal(size=(B, 1)) * 50
        shift_t = np.random.default_rng(7).normal(size=(B, 1)) * 50
        fn = jax.jit(fn)
        with jax.enable_x64(True):
            base = fn(*args)
            shifted = fn(args[0] + shift_s, args[1] + shift_t, *args[2:])
        chex.assert_trees_all_close(shifted, base, rtol=1e-9, atol=1e-12)


# Property tests call the losses through jit: op-by-op dispatch is slow on CPU.
# Hyperparameters become traced arguments, so trace-time checks are skipped.
jl = types.SimpleNamespace(**{name: jax.jit(getattr(losses, name)) for name in losses.__all__})


def _zero_mean_logits(seed, shape=(8, 10)):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=shape), rng.normal(size=shape)
    return s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize(
    "loss", [jl.soft_target_kl, jl.lskd_loss], ids=["kl", "lskd"])
def test_kl_positive_for_different_zero_for_identical(x64, loss, temperature):
    s, t = _zero_mean_logits(0)
    kl = loss(s, t, temperature=temperature)
    assert np.all(kl > 0)
    chex.assert_trees_all_close(loss(t, t, temperature=temperature), np.zeros(8), atol=1e-12)


def test_dkd_positive_for_different_zero_for_identical(x64):
    s, t = _zero_mean_logits(1)
    labels = np.arange(8) % 10
    assert np.all(jl.dkd_loss(s, t, labels) > 0)
    chex.assert_trees_all_close(jl.dkd_loss(t, t, labels), np.zeros(8), atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_cross_entropy_minus_kl_is_scaled_teacher_entropy(x64, temperature):
    s, t = _zero_mean_logits(2)
    diff = (jl.soft_target_cross_entropy(s, t, temperature=temperature)
            - jl.soft_target_kl(s, t, temperature=temperature))
    p_t = np_softmax(t, temperature)
    entropy = -np.sum(p_t * np.log(p_t), axis=-1)
    assert np.all(entropy > 0.1)
    chex.assert_trees_all_close(diff, temperature**2 * entropy, rtol=1e-10)


def test_kl_gradient_tends_to_logit_matching_at_high_temperature(x64):
    # Hinton et al. 2015, sec. 2.1: d(T^2 KL)/dz_s = T (p_s - p_t) -> (z_s - z_t) / C.
    s, t = _zero_mean_logits(3)
    target = (s - t) / s.shape[-1]
    grad_fn = jax.jit(jax.grad(
        lambda z, temperature: jnp.sum(jl.soft_target_kl(z, t, temperature=temperature))))
    errors = []
    for temperature in (1.0, 10.0, 100.0, 1000.0):
        grad = grad_fn(s, temperature)
        errors.append(np.linalg.norm(grad - target) / np.linalg.norm(target))
    assert errors[0] > 0.1  # not already logit matching at T = 1
    assert all(a > 5 * b for a, b in zip(errors, errors[1:]))  # error ~ 1/T
    assert errors[2] < 0.02


def test_distillation_loss_alpha_weights_the_kl_term(x64):
    s, t, labels = make_inputs("labels")
    kl = jl.soft_target_kl(s, t, temperature=4.0)
    chex.assert_trees_all_close(
        jl.distillation_loss(s, t, labels, temperature=4.0, alpha=1.0), kl, rtol=1e-12)
    ce = -np.log(np_softmax(s)[np.arange(B), labels])
    chex.assert_trees_all_close(
        jl.distillation_loss(s, t, labels, temperature=4.0, alpha=0.0), ce, rtol=1e-12)


def test_dkd_parts_decompose_classic_kd(x64):
    # Zhao et al. 2022, sec. 3.1: KL(p_t || p_s) = TCKD + (1 - p_t[y]) NCKD.
    s, t, labels = make_inputs("labels", seed=8)
    temperature = 2.0
    tckd = jl.dkd_loss(s, t, labels, alpha=1.0, beta=0.0, temperature=temperature)
    nckd = jl.dkd_loss(s, t, labels, alpha=0.0, beta=1.0, temperature=temperature)
    ref_tckd, ref_nckd = ref_dkd_parts(s, t, labels, temperature)
    chex.assert_trees_all_close(tckd, temperature**2 * ref_tckd, rtol=1e-9)
    chex.assert_trees_all_close(nckd, temperature**2 * ref_nckd, rtol=1e-9)
    p_target = np_softmax(t, temperature)[np.arange(B), labels]
    kd = jl.soft_target_kl(s, t, temperature=temperature)
    chex.assert_trees_all_close(kd, tckd + (1 - p_target) * nckd, rtol=1e-9)


def test_dkd_with_two_classes_is_classic_kd(x64):
    s, t = _zero_mean_logits(9, shape=(6, 2))
    labels = np.array([0, 1, 0, 1, 1, 0])
    nckd = jl.dkd_loss(s, t, labels, alpha=0.0, beta=1.0, temperature=3.0)
    chex.assert_trees_all_close(nckd, np.zeros(6), atol=1e-12)
    chex.assert_trees_all_close(
        jl.dkd_loss(s, t, labels, alpha=1.0, beta=5.0, temperature=3.0),
        jl.soft_target_kl(s, t, temperature=3.0), rtol=1e-10)


@pytest.mark.parametrize("loss", [jl.distillation_loss, jl.dkd_loss],
                         ids=["distillation", "dkd"])
def test_out_of_range_labels_give_nan(loss):
    s, t, _ = _floats(make_inputs("labels"), np.float32)
    out = loss(s, t, np.array([0, 1, C, -1, 2]))
    assert np.all(np.isfinite(np.asarray(out)[[0, 1, 4]]))
    assert np.all(np.isnan(np.asarray(out)[[2, 3]]))


def test_dist_is_scalar_and_zero_for_identical_logits(x64):
    s, t = make_inputs("logits")
    same = jl.dist_loss(t, t, temperature=2.0)
    chex.assert_shape(same, ())
    # Not exactly 0: the 1e-8 of the official Pearson correlation remains.
    assert 0.0 <= same < 1e-4
    assert jl.dist_loss(s, t, temperature=2.0) > 0.1


def test_lskd_invariant_to_logit_scale(x64):
    s, t = _zero_mean_logits(11)
    base = jl.lskd_loss(s, t, temperature=2.0)
    scaled = jl.lskd_loss(7.0 * s + 3.0, 0.25 * t, temperature=2.0)
    chex.assert_trees_all_close(scaled, base, rtol=1e-5)
    # Plain KD is not scale invariant, so the check above can fail.
    assert not np.allclose(jl.soft_target_kl(7.0 * s, 0.25 * t, temperature=2.0),
                           jl.soft_target_kl(s, t, temperature=2.0), rtol=1e-2)


def test_lskd_gradient_finite_for_constant_student_logits():
    _, t = _zero_mean_logits(12)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(jl.lskd_loss(z, t, temperature=2.0))))(
        jnp.zeros((8, 10)))
    chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("loss", [jl.attention_transfer_loss, jl.nst_loss],
                         ids=["at", "nst"])
def test_spatial_losses_allow_channel_mismatch_not_spatial_mismatch(loss):
    rng = np.random.default_rng(13)
    s = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    t = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    out = loss(s, t)
    chex.assert_shape(out, (2,))
    assert np.all(np.asarray(out) > 0)
    with pytest.raises(ValueError, match="same spatial size"):
        loss(s, rng.normal(size=(2, 8, 8, 3)).astype(np.float32))


@pytest.mark.parametrize(
    "loss",
    [jl.attention_transfer_loss, jl.nst_loss, jl.similarity_preserving_loss,
     jl.rkd_loss, jl.pkt_loss],
    ids=["at", "nst", "sp", "rkd", "pkt"])
def test_feature_losses_zero_for_identical_features(loss):
    f = np.random.default_rng(14).normal(size=(4, 3, 3, 5)).astype(np.float32)
    chex.assert_trees_all_close(jnp.sum(loss(f, f)), 0.0, atol=1e-6)
    g = np.random.default_rng(15).normal(size=(4, 3, 3, 5)).astype(np.float32)
    assert jnp.sum(loss(f, g)) > 1e-4


def test_feature_losses_finite_gradient_for_all_zero_student_features():
    zeros = jnp.zeros((4, 3, 3, 2))
    t = jnp.asarray(np.random.default_rng(16).normal(size=(4, 3, 3, 2)), jnp.float32)
    for loss in (jl.attention_transfer_loss, jl.nst_loss,
                 jl.similarity_preserving_loss, jl.pkt_loss):
        grad = jax.jit(jax.grad(lambda f: jnp.sum(loss(f, t))))(zeros)  # noqa: B023
        chex.assert_tree_all_finite(grad)


def test_rkd_gradient_finite_with_duplicate_embeddings():
    x = jnp.asarray(np.random.default_rng(17).normal(size=(4, 3)), jnp.float32)
    dup = x.at[1].set(x[0])
    t = jnp.asarray(np.random.default_rng(18).normal(size=(4, 5)), jnp.float32)
    grad = jax.jit(jax.grad(lambda e: jl.rkd_loss(e, t)))(dup)
    chex.assert_tree_all_finite(grad)


def test_traced_temperature_is_accepted():
    s, t = _floats(make_inputs("logits"), np.float32)
    f = jax.jit(lambda temp: losses.soft_target_kl(s, t, temperature=temp))
    chex.assert_trees_all_close(f(2.0), ref_kl(s, t, 2.0),
                                rtol=1e-6)


# ----------------------------------------------------------------------------
# Input validation.
# ----------------------------------------------------------------------------

_LOGITS = np.zeros((4, 10), np.float32)
_LABELS = np.zeros((4,), np.int32)
_MAP = np.zeros((4, 8, 8, 3), np.float32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.soft_target_kl(_LOGITS, np.zeros((4, 11), np.float32),
                                       temperature=1.0), "same shape"),
        (lambda: losses.dist_loss(_LOGITS, np.zeros((5, 10), np.float32)), "same shape"),
        (lambda: losses.soft_target_kl(_LOGITS, _LOGITS, temperature=0.0), "temperature"),
        (lambda: losses.soft_target_cross_entropy(_LOGITS, _LOGITS, temperature=-1),
         "temperature"),
        (lambda: losses.tempered_softmax(_LOGITS, 0.0), "temperature"),
        (lambda: losses.tempered_log_softmax(_LOGITS, -2.0), "temperature"),
        (lambda: losses.dkd_loss(_LOGITS, _LOGITS, _LABELS, temperature=0), "temperature"),
        (lambda: losses.dist_loss(_LOGITS, _LOGITS, temperature=-1.0), "temperature"),
        (lambda: losses.lskd_loss(_LOGITS, _LOGITS, temperature=0.0), "temperature"),
        (lambda: losses.distillation_loss(_LOGITS, _LOGITS, _LABELS, alpha=1.5), "alpha"),
        (lambda: losses.distillation_loss(_LOGITS, _LOGITS, _LABELS, alpha=-0.1), "alpha"),
        (lambda: losses.soft_target_kl(np.zeros((4, 10), np.int32), _LOGITS,
                                       temperature=1.0), "student_logits.*floating"),
        (lambda: losses.soft_target_kl(_LOGITS, np.zeros((4, 10), np.int32),
                                       temperature=1.0), "teacher_logits.*floating"),
        (lambda: losses.tempered_softmax(np.arange(3)), "logits.*floating"),
        (lambda: losses.hint_loss(np.zeros((4, 3), np.int32), np.zeros((4, 3), np.int32)),
         "student_feature.*floating"),
        (lambda: losses.distillation_loss(_LOGITS, _LOGITS, np.zeros((4, 1), np.int32)),
         "labels.*shape"),
        (lambda: losses.dkd_loss(_LOGITS, _LOGITS, np.zeros((5,), np.int32)),
         "labels.*shape"),
        (lambda: losses.dkd_loss(_LOGITS, _LOGITS, np.zeros((4,), np.float32)),
         "labels.*integer"),
        (lambda: losses.distillation_loss(_LOGITS, _LOGITS, np.zeros((4, 10), np.float32)),
         "labels.*integer"),
        (lambda: losses.dkd_loss(np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32),
                                 _LABELS), "at least 2 classes"),
        (lambda: losses.dist_loss(np.zeros((2, 4, 10), np.float32),
                                  np.zeros((2, 4, 10), np.float32)), "rank 2"),
        (lambda: losses.soft_target_kl(np.float32(1.0), np.float32(1.0), temperature=1.0),
         "rank"),
        (lambda: losses.attention_transfer_loss(np.zeros((4, 8, 8), np.float32),
                                                np.zeros((4, 8, 8), np.float32)), "rank 4"),
        (lambda: losses.attention_transfer_loss(_MAP, np.zeros((2, 8, 8, 3), np.float32)),
         "batch size"),
        (lambda: losses.attention_transfer_loss(_MAP, _MAP, p=0), "`p`"),
        (lambda: losses.nst_loss(_MAP, np.zeros((4, 4, 4, 3), np.float32)), "spatial"),
        (lambda: losses.hint_loss(_MAP, np.zeros((4, 8, 8, 4), np.float32)), "same shape"),
        (lambda: losses.hint_loss(np.zeros((4,), np.float32), np.zeros((4,), np.float32)),
         "rank"),
        (lambda: losses.similarity_preserving_loss(_MAP, np.zeros((3, 8, 8, 3), np.float32)),
         "batch size"),
        (lambda: losses.rkd_loss(np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32)),
         "batch size"),
        (lambda: losses.rkd_loss(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32)),
         "at least 2"),
        (lambda: losses.pkt_loss(np.zeros((4, 3), np.float32), np.zeros((2, 3), np.float32)),
         "batch size"),
    ],
)
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Non-finite inputs give non-finite outputs; hyperparameters are checked whatever their type.

def _loss_cases():
    import kd_jax.losses as L
    labels = jnp.array([0, 1, 2, 3])
    logit = lambda f: (lambda s, t: f(s, t))  # noqa: E731
    return {
        "soft_target_kl": (lambda s, t: L.soft_target_kl(s, t, temperature=4.0), "logits"),
        "soft_target_cross_entropy": (
            lambda s, t: L.soft_target_cross_entropy(s, t, temperature=4.0), "logits"),
        "distillation_loss": (lambda s, t: L.distillation_loss(s, t, labels, temperature=4.0,
                                                               alpha=0.9), "logits"),
        "dkd_loss": (lambda s, t: L.dkd_loss(s, t, labels), "logits"),
        "lskd_loss": (lambda s, t: L.lskd_loss(s, t, temperature=2.0), "logits"),
        "dist_loss": (logit(L.dist_loss), "logits"),
        "hint_loss": (logit(L.hint_loss), "maps"),
        "attention_transfer_loss": (logit(L.attention_transfer_loss), "maps"),
        "nst_loss": (logit(L.nst_loss), "maps"),
        "similarity_preserving_loss": (logit(L.similarity_preserving_loss), "embeddings"),
        "rkd_loss": (logit(L.rkd_loss), "embeddings"),
        "pkt_loss": (logit(L.pkt_loss), "embeddings"),
    }


_SHAPES = {"logits": (4, 10), "maps": (4, 4, 4, 3), "embeddings": (4, 8)}


@pytest.mark.parametrize("name", sorted(_loss_cases()))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_inputs_give_non_finite_outputs(name, bad, where):
    fn, kind = _loss_cases()[name]
    shape = _SHAPES[kind]
    s = jax.random.normal(jax.random.PRNGKey(0), shape)
    t = jax.random.normal(jax.random.PRNGKey(1), shape)
    clean = np.asarray(jax.jit(fn)(s, t))
    assert np.all(np.isfinite(clean)), name
    if where == "student":
        s = s.at[1, 0].set(bad)
    else:
        t = t.at[1, 0].set(bad)
    out = np.asarray(jax.jit(fn)(s, t))
    if out.ndim == 0:
        assert not np.isfinite(out), (name, out)
    else:  # per example: the hit example is non-finite, the others unchanged
        assert not np.isfinite(out[1]), (name, out)
        np.testing.assert_array_equal(np.delete(out, 1), np.delete(clean, 1))


@pytest.mark.parametrize("temperature", [np.float32(0.0), jnp.array(-1.0), np.array(np.nan),
                                         jnp.array(np.inf)])
def test_concrete_bad_temperature_of_any_type_is_rejected(temperature):
    from kd_jax.losses import soft_target_kl
    z = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        soft_target_kl(z, z, temperature=temperature)


@pytest.mark.parametrize("alpha", [2.0, jnp.array(2.0), np.float64(-0.1), np.array(np.nan)])
def test_concrete_bad_alpha_of_any_type_is_rejected(alpha):
    from kd_jax.losses import distillation_loss
    z = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        distillation_loss(z, z, jnp.zeros(4, jnp.int32), temperature=4.0, alpha=alpha)


def test_non_scalar_temperature_is_rejected_even_when_traced():
    from kd_jax.losses import distillation_loss, soft_target_kl
    z = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match="`temperature` must be a scalar, got shape \\(4, 1\\)"):
        soft_target_kl(z, z, temperature=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="must be a scalar"):
        jax.jit(lambda t: soft_target_kl(z, z, temperature=t))(jnp.ones((4,)))
    with pytest.raises(ValueError, match="`alpha` must be a scalar"):
        distillation_loss(z, z, jnp.zeros(4, jnp.int32), temperature=4.0, alpha=np.ones(4))
    # A traced scalar cannot be checked, and is accepted.
    out = jax.jit(lambda t: soft_target_kl(z, z, temperature=t))(jnp.float32(2.0))
    assert out.shape == (4,)
