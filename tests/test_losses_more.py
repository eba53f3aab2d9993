"""Tests for the losses of AB, OFD, FSP, KDSVD, FT, SimKD, MLKD and CTKD (kd_jax.losses), DOT's
optimiser (kd_jax.dot) and the KDSVD and CTKD presets (kd_jax.objectives.more_terms).

Each loss is compared with an independent float64 NumPy reference written from the paper and
the authors' code (loops over examples and entries, plain NumPy, never calling kd_jax); KDSVD's
uses NumPy's SVD where the library uses an eigendecomposition of the Gram matrix. Properties
users rely on (zero at the teacher, the margins' sides, sign invariance) are tested apart.
float64 runs inside ``jax.enable_x64(True)`` so x64 never leaks into other test files.
"""

import math

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

from kd_jax import dot as dot_lib
from kd_jax import losses, objectives
from kd_jax.objectives import METHODS
from tiny import TinyNet


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _maps(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in shapes]


# ----------------------------------------------------------------------------
# NumPy float64 references.
# ----------------------------------------------------------------------------

def ref_ab(s, t, margin):
    """RepDistiller's criterion_alternative_l2 per example: both indicator terms."""
    out = np.zeros(s.shape[0])
    for b in range(s.shape[0]):
        for x, y in zip(s[b].ravel(), t[b].ravel()):
            if x > -margin and y <= 0:
                out[b] += (x + margin) ** 2
            if x <= margin and y > 0:
                out[b] += (x - margin) ** 2
    return out


def _phi(z):
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def ref_ofd_margin(gamma, beta):
    out = []
    for g, m in zip(gamma, beta):
        s = abs(g)
        if _cdf(-m / s) > 0.001:
            out.append(-s * _phi(-m / s) / _cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def ref_ofd(s, t, margin):
    """mdistiller's feat_loss per example: three indicator terms, summed."""
    out = np.zeros(s.shape[0])
    for b in range(s.shape[0]):
        for idx in np.ndindex(s.shape[1:]):
            x, y, m = s[b][idx], t[b][idx], margin[idx[-1]]
            if x > m and y <= m:
                out[b] += (x - m) ** 2
            if x > y and m < y <= 0:
                out[b] += (x - y) ** 2
            if y > 0:
                out[b] += (x - y) ** 2
    return out


def ref_pool(x, size):
    """Adaptive average pooling of one HWC map (PyTorch's bins), by loops."""
    h, w, c = x.shape
    out = np.zeros((size[0], size[1], c))
    for i in range(size[0]):
        r0, r1 = (i * h) // size[0], -((-(i + 1) * h) // size[0])
        for j in range(size[1]):
            c0, c1 = (j * w) // size[1], -((-(j + 1) * w) // size[1])
            out[i, j] = x[r0:r1, c0:c1].mean(axis=(0, 1))
    return out


def ref_fsp_matrix(bottom, top):
    size = min(bottom.shape[:2], top.shape[:2])
    bottom, top = ref_pool(bottom, size), ref_pool(top, size)
    g = np.zeros((top.shape[-1], bottom.shape[-1]))
    for j in range(top.shape[-1]):
        for i in range(bottom.shape[-1]):
            g[j, i] = np.mean(top[..., j] * bottom[..., i])
    return g


def ref_fsp(fs, ft):
    out = np.zeros(fs[0].shape[0])
    for b in range(len(out)):
        for l in range(len(fs) - 1):
            gs = ref_fsp_matrix(fs[l][b], fs[l + 1][b])
            gt = ref_fsp_matrix(ft[l][b], ft[l + 1][b])
            out[b] += np.mean((gs - gt) ** 2)
    return out


def ref_kdsvd(fs, ft, k):
    """RepDistiller's KDSVD per example, from NumPy's SVD of each [HW, C] matrix, with each
    teacher vector oriented to a non-negative entry sum (RepDistiller leaves the sign to the
    SVD routine)."""
    out = np.zeros(fs[0].shape[0])
    for b in range(len(out)):
        previous = None
        for s_map, t_map in zip(fs, ft):
            xs = s_map[b].reshape(-1, s_map.shape[-1])
            xt = t_map[b].reshape(-1, t_map.shape[-1])
            _, sigma_t, vh_t = np.linalg.svd(xt, full_matrices=False)
            _, _, vh_s = np.linalg.svd(xs, full_matrices=False)
            v_t, v_s = vh_t[:k].T, vh_s[:k + 3].T
            for j in range(v_t.shape[1]):  # the library's sign convention
                if v_t[:, j].sum() < 0:
                    v_t[:, j] = -v_t[:, j]
            sigma = sigma_t[:k] / np.linalg.norm(sigma_t[:k])
            aligned = np.zeros_like(v_t)
            for j in range(v_t.shape[1]):
                cosines = [v_s[:, i] @ v_t[:, j] for i in range(v_s.shape[1])]
                i = int(np.argmax(np.abs(cosines)))
                aligned[:, j] = np.sign(cosines[i]) * v_s[:, i]
            current = (aligned * sigma, v_t * sigma)
            if previous is not None:
                for c in range(current[0].shape[0]):
                    for c2 in range(previous[0].shape[0]):
                        for j in range(v_t.shape[1]):
                            rs = math.exp(-(current[0][c, j] - previous[0][c2, j]) ** 2 / 8)
                            rt = math.exp(-(current[1][c, j] - previous[1][c2, j]) ** 2 / 8)
                            out[b] += (rs - rt) ** 2
            previous = current
    return out


def ref_factor_transfer(s, t, p, channel_power=None):
    out = np.zeros(s.shape[0])
    for b in range(s.shape[0]):
        if channel_power is None:
            a, c = s[b].ravel(), t[b].ravel()
        else:
            a = (np.abs(s[b]) ** channel_power).mean(-1).ravel()
            c = (np.abs(t[b]) ** channel_power).mean(-1).ravel()
        a, c = a / np.linalg.norm(a), c / np.linalg.norm(c)
        out[b] = np.mean([abs(x - y) ** p for x, y in zip(a, c)])
    return out


def ref_softmax(z, temperature):
    out = np.zeros_like(z, dtype=np.float64)
    for b in range(z.shape[0]):
        e = np.exp((z[b] - z[b].max()) / temperature)
        out[b] = e / e.sum()
    return out


def ref_kd(s, t, temperature):
    ps, pt = ref_softmax(s, temperature), ref_softmax(t, temperature)
    return np.array([temperature**2 * sum(pt[b, c] * math.log(pt[b, c] / ps[b, c])
                                          for c in range(s.shape[1])) for b in range(len(s))])


def ref_mlkd(s, t, temperatures, wi=1.0, wb=1.0, wc=1.0):
    batch, classes = s.shape
    total = 0.0
    for temperature in temperatures:
        ps, pt = ref_softmax(s, temperature), ref_softmax(t, temperature)
        total += wi * ref_kd(s, t, temperature).mean()
        for i in range(batch):
            for j in range(batch):
                gt = sum(pt[i, c] * pt[j, c] for c in range(classes))
                gs = sum(ps[i, c] * ps[j, c] for c in range(classes))
                total += wb * (gt - gs) ** 2 / batch
        for c in range(classes):
            for d in range(classes):
                mt = sum(pt[b, c] * pt[b, d] for b in range(batch))
                ms = sum(ps[b, c] * ps[b, d] for b in range(batch))
                total += wc * (mt - ms) ** 2 / classes
    return total


def ref_ctkd_temperature(theta, t_min=1.0, t_range=20.0):
    return t_min + t_range / (1 + math.exp(-theta))


def ref_ctkd_lambda(epoch, loops=10):
    """The authors' CosineDecay(max 0, min -1, loops).get_value, negated: the factor their
    gradient reversal multiplies by is -lambda."""
    i = min(max(epoch, 0), loops)
    value = (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (0 - (-1)) + (-1)
    return -value


# ----------------------------------------------------------------------------
# The losses against their references.
# ----------------------------------------------------------------------------

def _close(actual, expected, rtol=1e-9, atol=1e-12):
    chex.assert_trees_all_close(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_ab_loss_matches_repdistiller_form(x64, margin):
    s, t = _maps(0, [(3, 4, 4, 5), (3, 4, 4, 5)])
    _close(jax.jit(lambda a, b: losses.ab_loss(a, b, margin=margin))(s, t),
           ref_ab(s, t, margin))
    _close(losses.ab_loss(s, t, margin=margin), ref_ab(s, t, margin))  # eager


def test_ofd_margin_matches_the_truncated_gaussian_mean(x64):
    gamma = np.array([1.0, -0.5, 2.0, 0.1, 3.0])
    beta = np.array([0.0, -1.0, 30.0, 0.05, -2.0])  # beta / |gamma| = 15: Phi(-15) < 0.001
    margin = jax.jit(losses.ofd_margin)
    _close(margin(gamma, beta), ref_ofd_margin(gamma, beta))
    # E[x | x < 0] for x ~ N(0, 1): -sqrt(2 / pi).
    assert abs(float(margin(gamma, beta)[0]) + math.sqrt(2 / math.pi)) < 1e-12
    # gamma = 0: a constant channel, its value (if negative) or 0.
    _close(margin(np.zeros(2), np.array([-0.7, 0.4])), np.array([-0.7, 0.0]))


def test_ofd_loss_matches_mdistiller_form(x64):
    s, t = _maps(1, [(3, 4, 4, 5), (3, 4, 4, 5)])
    margin = ref_ofd_margin(np.linspace(0.5, 2.0, 5), np.linspace(-1.0, 1.0, 5))
    _close(jax.jit(losses.ofd_loss)(s, t, margin), ref_ofd(s, t, margin))


def test_fsp_loss(x64):
    # Stem, stage1 (same size), stage2 (half): pooling in the second pair; the student's
    # spatial sizes differ from the teacher's (only the channels must agree).
    fs = _maps(2, [(2, 8, 8, 3), (2, 8, 8, 3), (2, 4, 4, 5)])
    ft = _maps(3, [(2, 4, 4, 3), (2, 4, 4, 3), (2, 2, 2, 5)])
    _close(jax.jit(losses.fsp_loss)(fs, ft), ref_fsp(fs, ft))
    fs7 = _maps(4, [(2, 7, 7, 2), (2, 3, 3, 4)])  # overlapping adaptive bins
    ft7 = _maps(5, [(2, 7, 7, 2), (2, 3, 3, 4)])
    _close(losses.fsp_loss(fs7, ft7), ref_fsp(fs7, ft7))


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_loss(x64, k):
    # HW > C, HW < C (the student keeps all 4 of its 4 vectors) and a size change.
    fs = _maps(6, [(3, 4, 4, 3), (3, 2, 2, 6), (3, 3, 3, 4)])
    ft = _maps(7, [(3, 4, 4, 3), (3, 4, 4, 6), (3, 2, 2, 4)])
    _close(jax.jit(lambda a, b: losses.kdsvd_loss(a, b, k=k))(fs, ft), ref_kdsvd(fs, ft, k),
           rtol=1e-8)


@pytest.mark.parametrize("p, channel_power", [(1.0, None), (2.0, None), (1.0, 2.0)])
def test_factor_transfer_loss(x64, p, channel_power):
    s, t = _maps(8, [(3, 4, 4, 6), (3, 4, 4, 6)])
    if channel_power is not None:
        t = t[..., :4]  # RepDistiller's variant: channel counts may differ
    out = jax.jit(lambda a, b: losses.factor_transfer_loss(a, b, p=p,
                                                           channel_power=channel_power))(s, t)
    _close(out, ref_factor_transfer(s, t, p, channel_power))


def test_simkd_loss_is_the_mean_squared_error(x64):
    s, t = _maps(9, [(3, 2, 2, 5), (3, 2, 2, 5)])
    expected = np.array([np.mean([(x - y) ** 2 for x, y in zip(s[b].ravel(), t[b].ravel())])
                         for b in range(3)])
    _close(losses.simkd_loss(s, t), expected)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.45, 0.2, 0.0)])
def test_mlkd_loss(x64, weights):
    s, t = (3 * x for x in _maps(10, [(4, 5), (4, 5)]))
    wi, wb, wc = weights
    out = jax.jit(lambda a, b: losses.mlkd_loss(a, b, instance_weight=wi, batch_weight=wb,
                                                class_weight=wc))(s, t)
    _close(out, ref_mlkd(s, t, (2.0, 3.0, 4.0, 5.0, 6.0), wi, wb, wc))
    _close(losses.mlkd_loss(s, t, temperatures=(4.0,)), ref_mlkd(s, t, (4.0,)))


def test_ctkd_loss_value_and_reversed_temperature_gradient(x64):
    s, t = (3 * x for x in _maps(11, [(4, 6), (4, 6)]))
    theta, lam = 0.3, 0.7
    temperature = ref_ctkd_temperature(theta)
    _close(losses.ctkd_loss(s, t, theta, reversal=lam), ref_kd(s, t, temperature))

    def mean_loss(th):
        return jnp.mean(losses.ctkd_loss(s, t, th, reversal=lam))

    grad = float(jax.jit(jax.grad(mean_loss))(jnp.float64(theta)))
    # The true derivative of the batch-mean KD w.r.t. theta (central differences), reversed.
    h = 1e-5
    numeric = (ref_kd(s, t, ref_ctkd_temperature(theta + h)).mean()
               - ref_kd(s, t, ref_ctkd_temperature(theta - h)).mean()) / (2 * h)
    assert abs(numeric) > 1e-3
    np.testing.assert_allclose(grad, -lam * numeric, rtol=1e-6)
    # The student's gradient is KD's at that temperature, not reversed.
    g_s = jax.grad(lambda a: jnp.sum(losses.ctkd_loss(a, t, theta, reversal=lam)))(s)
    g_kd = jax.grad(lambda a: jnp.sum(losses.soft_target_kl(a, t, temperature=temperature)))(s)
    _close(g_s, np.asarray(g_kd))


def test_ctkd_lambda_is_the_authors_cosine_curriculum(x64):
    got = jax.jit(losses.ctkd_lambda)
    for epoch in range(0, 14):
        np.testing.assert_allclose(float(got(jnp.float64(epoch))), ref_ctkd_lambda(epoch),
                                   atol=1e-12)
    assert float(got(jnp.float64(0.0))) == 0.0 and float(got(jnp.float64(25.0))) == 1.0
    values = [float(got(jnp.float64(e))) for e in np.linspace(0, 10, 41)]
    assert all(b > a for a, b in zip(values, values[1:]))  # rising over the E epochs
    np.testing.assert_allclose(float(losses.ctkd_lambda(5.0, lambda_min=0.2, lambda_max=0.6,
                                                        num_epochs=10.0)), 0.4, rtol=1e-12)


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(losses.gradient_reversal(x, scale=0.5), x)

    @jax.jit
    def grads(x, scale):  # a traced scale
        return jax.grad(lambda x, s: jnp.sum(jnp.sin(losses.gradient_reversal(x, scale=s))),
                        argnums=(0, 1))(x, scale)

    gx, gs = grads(x, 0.5)
    np.testing.assert_allclose(gx, -0.5 * jnp.cos(x), rtol=1e-6)
    assert float(gs) == 0.0  # no gradient into the scale
    bf16 = losses.gradient_reversal(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="`x` must be a floating-point"):
        losses.gradient_reversal(jnp.arange(3))


def test_float32_inputs_match_float64_reference():
    fs = _maps(12, [(2, 4, 4, 3), (2, 2, 2, 6)])
    ft = _maps(13, [(2, 4, 4, 3), (2, 2, 2, 6)])
    s, t = _maps(14, [(2, 4, 4, 6), (2, 4, 4, 6)])
    margin = -np.abs(_maps(15, [(6,)])[0])
    logits = [3 * x for x in _maps(16, [(4, 5), (4, 5)])]
    cases = [
        (losses.ab_loss, (s, t), ref_ab(s, t, 1.0)),
        (losses.ofd_loss, (s, t, margin), ref_ofd(s, t, margin)),
        (losses.fsp_loss, (fs, ft), ref_fsp(fs, ft)),
        (losses.kdsvd_loss, (fs, ft), ref_kdsvd(fs, ft, 1)),
        (losses.factor_transfer_loss, (s, t), ref_factor_transfer(s, t, 1.0)),
        (losses.mlkd_loss, tuple(logits), ref_mlkd(*logits, (2.0, 3.0, 4.0, 5.0, 6.0))),
    ]
    for fn, args, expected in cases:
        args32 = jax.tree.map(lambda a: np.asarray(a, np.float32), args)
        out = jax.jit(fn)(*args32)
        assert out.dtype == jnp.float32, fn
        # KDSVD's singular vectors come from a float32 Gram matrix: a looser tolerance.
        rtol = 1e-3 if fn is losses.kdsvd_loss else 1e-5
        chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=rtol,
                                    atol=1e-6)


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------


def test_ab_zero_beyond_the_margin_on_the_teachers_side(x64):
    rng = np.random.default_rng(20)
    t = rng.normal(size=(3, 2, 2, 4))
    s = np.where(t > 0, 1.0 + rng.uniform(size=t.shape), -1.0 - rng.uniform(size=t.shape))
    ab = jax.jit(losses.ab_loss)
    _close(ab(s, t), np.zeros(3))
    _close(ab(s, 7.0 * t), np.zeros(3))  # only the teacher's signs matter
    # One entry on the wrong side of the boundary costs (margin + |s|)^2, that example only.
    wrong = s.copy()
    index = tuple(np.argwhere(t[1] > 0)[0])
    wrong[(1, *index)] = -0.5
    _close(ab(wrong, t), np.array([0.0, 1.5**2, 0.0]))
    # Inside the margin on the right side also costs: the hinge is at +-margin, not at 0.
    inside = s.copy()
    inside[(1, *index)] = 0.25
    _close(ab(inside, t), np.array([0.0, 0.75**2, 0.0]))


def test_ofd_partial_l2_sides(x64):
    margin = np.array([-0.4, -0.2])
    t = np.array([[[[1.0, 0.5]]], [[[-0.1, -0.3]]], [[[-1.0, -2.0]]]])  # [3, 1, 1, 2]
    ofd = jax.jit(losses.ofd_loss)
    _close(ofd(t, t, margin), np.zeros(3))  # zero at the teacher, whatever the margin
    # Below the target on the negative side costs nothing; above it, the squared distance to
    # max(t, m); on the positive side, the plain squared error either way.
    below = t - 1.0
    _close(ofd(below, t, margin), np.array([2.0, 0.0, 0.0]))
    target = np.maximum(t, margin)
    _close(ofd(target + 0.3, t, margin), np.full(3, 2 * 0.3**2))
    # Between the teacher's value and its margin is free: only the margin is the target.
    between = (t + margin) / 2
    _close(ofd(between, t, margin)[2], 0.0)
    assert float(losses.hint_loss(between, t)[2]) > 0


@pytest.mark.parametrize("name", ["fsp_loss", "kdsvd_loss"])
def test_layer_pair_losses_zero_at_the_teacher(x64, name):
    fs = _maps(21, [(2, 4, 4, 3), (2, 2, 2, 5)])
    _close(getattr(losses, name)(fs, fs), np.zeros(2), atol=1e-10)
    assert np.all(np.asarray(getattr(losses, name)(fs, _maps(22, [(2, 4, 4, 3),
                                                                 (2, 2, 2, 5)]))) > 0)


def test_kdsvd_ignores_singular_vector_signs_and_scale(x64):
    fs = _maps(23, [(2, 4, 4, 3), (2, 2, 2, 5), (2, 2, 2, 4)])
    ft = _maps(24, [(2, 4, 4, 3), (2, 2, 2, 5), (2, 2, 2, 4)])
    kdsvd = jax.jit(losses.kdsvd_loss)
    base = kdsvd(fs, ft)
    flipped_t = [ft[0], -ft[1], ft[2]]  # negating a map flips its singular vectors
    flipped_s = [-fs[0], fs[1], -fs[2]]
    _close(kdsvd(fs, flipped_t), np.asarray(base), rtol=1e-10)
    _close(kdsvd(flipped_s, ft), np.asarray(base), rtol=1e-10)
    _close(kdsvd(fs, [3.0 * f for f in ft]), np.asarray(base), rtol=1e-10)


def test_kdsvd_gradient_is_finite_for_rank_deficient_maps(x64):
    # Dead channels (all zero) give repeated zero singular values: the leading pairs'
    # derivative stays finite and matches finite differences.
    fs = _maps(25, [(2, 3, 3, 5), (2, 2, 2, 6)])
    ft = _maps(26, [(2, 3, 3, 5), (2, 2, 2, 6)])
    fs[0][..., 3:] = 0.0
    fs[1][..., 4:] = 0.0  # rank <= 4 of 6; HW = 4 also limits it

    def loss(a, b):
        return jnp.sum(losses.kdsvd_loss([a, b], ft))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*fs)
    assert all(np.all(np.isfinite(g)) for g in grads)
    direction = [np.random.default_rng(27).normal(size=f.shape) for f in fs]
    h = 1e-6
    numeric = (loss(fs[0] + h * direction[0], fs[1] + h * direction[1])
               - loss(fs[0] - h * direction[0], fs[1] - h * direction[1])) / (2 * h)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(grads, direction))
    np.testing.assert_allclose(analytic, float(numeric), rtol=1e-5)


@pytest.mark.parametrize("name", ["factor_transfer_loss", "simkd_loss"])
def test_factor_and_simkd_zero_at_the_teacher(x64, name):
    s, t = _maps(28, [(2, 3, 3, 4), (2, 3, 3, 4)])
    fn = getattr(losses, name)
    _close(fn(t, t), np.zeros(2))
    assert np.all(np.asarray(fn(s, t)) > 0)
    if name == "factor_transfer_loss":  # factors are compared after L2 normalisation
        _close(fn(2.5 * t, t), np.zeros(2), atol=1e-12)


def test_mlkd_and_ctkd_zero_at_the_teacher(x64):
    s, t = (3 * x for x in _maps(29, [(4, 5), (4, 5)]))
    _close(losses.mlkd_loss(t, t), 0.0, atol=1e-12)
    assert float(losses.mlkd_loss(s, t)) > 0
    _close(losses.ctkd_loss(t, t, 0.5), np.zeros(4), atol=1e-12)


def test_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(30)
    maps = _maps(31, [(2, 3, 3, 3), (2, 3, 3, 3)])
    pair_s = _maps(32, [(2, 4, 4, 3), (2, 2, 2, 4)])
    pair_t = _maps(33, [(2, 4, 4, 3), (2, 2, 2, 4)])
    logits = [3 * x for x in _maps(34, [(3, 4), (3, 4)])]
    margin = -np.abs(rng.normal(size=3))
    rev, both = ["rev"], ["fwd", "rev"]
    cases = [
        (lambda s, t: losses.ab_loss(s, t, margin=0.5), maps, rev),
        (lambda s, t: losses.ofd_loss(s, t, margin), maps, rev),
        (lambda s, t: losses.factor_transfer_loss(s, t, p=2.0), maps, rev),
        (losses.factor_transfer_loss, maps, rev),
        (losses.simkd_loss, maps, rev),
        (losses.fsp_loss, (pair_s, pair_t), rev),
        (losses.kdsvd_loss, (pair_s, pair_t), both),  # the custom derivative, both modes
        (losses.mlkd_loss, logits, rev),
        (lambda s, t: losses.ctkd_loss(s, t, 0.3, reversal=0.0), logits, rev),
        (losses.ofd_margin, (rng.uniform(0.5, 2, 3), rng.normal(size=3)), rev),
    ]
    for fn, args, modes in cases:
        # Jitted: check_grads evaluates the function many times (eager dispatch is slow).
        jax.test_util.check_grads(jax.jit(fn), tuple(args), order=1, modes=modes, atol=1e-6,
                                  rtol=1e-6)
    jax.test_util.check_grads(jax.jit(losses.ctkd_lambda), (jnp.float64(3.3),), order=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_in_non_finite_out(bad):
    maps = [np.asarray(x, np.float32) for x in _maps(35, [(3, 4, 4, 2)] * 4)]
    broken = maps[0].copy()
    broken[1, 2, 2, 0] = bad
    broken_t = maps[1].copy()
    broken_t[1, 0, 3, 1] = bad
    margin = np.full(2, -0.5, np.float32)
    cases = [
        (losses.ab_loss, (maps[0], maps[1]), (broken, maps[1])),
        (losses.ofd_loss, (maps[0], maps[1], margin), (maps[0], broken_t, margin)),
        (losses.factor_transfer_loss, (maps[0], maps[1]), (broken, maps[1])),
        (losses.simkd_loss, (maps[0], maps[1]), (maps[0], broken_t)),
        (losses.fsp_loss, ([maps[0], maps[2]], [maps[1], maps[3]]),
         ([maps[0], maps[2]], [broken_t, maps[3]])),
        (losses.kdsvd_loss, ([maps[0], maps[2]], [maps[1], maps[3]]),
         ([broken, maps[2]], [maps[1], maps[3]])),
    ]
    for fn, clean_args, bad_args in cases:
        clean = np.asarray(jax.jit(fn)(*clean_args))
        out = np.asarray(jax.jit(fn)(*bad_args))
        assert not np.isfinite(out[1]), fn
        np.testing.assert_array_equal(np.delete(out, 1), np.delete(clean, 1))
    logits = maps[0].reshape(3, -1)
    bad_logits = broken.reshape(3, -1)
    assert not np.isfinite(jax.jit(losses.mlkd_loss)(bad_logits, logits))
    out = np.asarray(jax.jit(losses.ctkd_loss)(logits, bad_logits, 0.0))
    assert not np.isfinite(out[1]) and np.all(np.isfinite(np.delete(out, 1)))
    margin = np.asarray(jax.jit(losses.ofd_margin)(np.array([bad, 1.0]), np.zeros(2)))
    assert np.isnan(margin[0]) and np.isfinite(margin[1])


_MAP = np.zeros((2, 4, 4, 3), np.float32)
_L = np.zeros((4, 5), np.float32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.ab_loss(_MAP, _MAP[:, :2]), "same shape"),
        (lambda: losses.ab_loss(_MAP, _MAP, margin=0.0), "`margin`"),
        (lambda: losses.ofd_loss(_MAP, _MAP, np.zeros(4, np.float32)),
         r"`margin` must have shape \[C\]"),
        (lambda: losses.ofd_margin(np.zeros(3), np.zeros(4)), "same shape"),
        (lambda: losses.fsp_loss([_MAP], [_MAP]), "at least 2 NHWC maps"),
        (lambda: losses.fsp_loss(_MAP, _MAP), "must be a list"),
        (lambda: losses.fsp_loss([_MAP, _MAP], [_MAP, _MAP[..., :2]]),
         r"`student_features\[1\]` and `teacher_features\[1\]` must have the same number of "
         "channels"),
        (lambda: losses.kdsvd_loss([_MAP, _MAP], [_MAP] * 3), "same number of maps"),
        (lambda: losses.kdsvd_loss([_MAP, _MAP[:1]], [_MAP, _MAP[:1]]), "batch size 2"),
        (lambda: losses.kdsvd_loss([_MAP, _MAP], [_MAP, _MAP], k=0), "`k`"),
        (lambda: losses.factor_transfer_loss(_MAP, _MAP[..., :2]), "same shape"),
        (lambda: losses.factor_transfer_loss(_MAP, _MAP[:, :2], channel_power=2.0),
         "same spatial size"),
        (lambda: losses.factor_transfer_loss(_MAP, _MAP, p=0.5), "`p` must be"),
        (lambda: losses.mlkd_loss(_L, _L, temperatures=()), "`temperatures`"),
        (lambda: losses.mlkd_loss(_L, _L, temperatures=(2.0, 0.0)), r"`temperatures\[1\]`"),
        (lambda: losses.mlkd_loss(_MAP, _MAP), "rank 2"),
        (lambda: losses.ctkd_loss(_L, _L, np.zeros(2, np.float32)), "`temperature_logit`"),
        (lambda: losses.ctkd_loss(_L, _L, 0.0, temperature_range=0.0), "`temperature_range`"),
        (lambda: losses.ctkd_lambda(np.zeros(2)), "`epoch` must be a scalar"),
        (lambda: losses.ctkd_lambda(1.0, num_epochs=0.0), "`num_epochs`"),
    ],
)
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------
# DOT's optimiser.
# ----------------------------------------------------------------------------

def ref_dot(params, steps, *, lr, momentum, delta, weight_decay, parts,
            first_step_weight_decay=False):
    """mdistiller's DistillationOrientedTrainer step by step (buffers start as None; the
    first step copies the gradient), over dicts of NumPy arrays. `steps` is a list of
    (task_grads, distill_grads); `lr` one rate per step."""
    m_task, m_kd = momentum - delta, momentum + delta
    w = {k: v.copy() for k, v in params.items()}
    task_buf, kd_buf = {}, {}
    history = []
    for step, (g_task, g_kd) in enumerate(steps):
        new = {}
        for k in w:
            new[k] = w[k].copy()
            if parts[k] in ("both", "task"):
                d = g_task[k] + weight_decay * w[k]
                if k not in task_buf:
                    task_buf[k] = d.copy()
                elif parts[k] == "both":
                    task_buf[k] = m_task * task_buf[k] + d
                else:
                    task_buf[k] = (m_kd + m_task) / 2 * task_buf[k] + d
                new[k] = new[k] - lr[step] * task_buf[k]
        for k in w:
            if parts[k] in ("both", "distill"):
                d = g_kd[k]
                if k not in kd_buf:
                    if parts[k] == "distill" and first_step_weight_decay:
                        d = d + weight_decay * w[k]
                    kd_buf[k] = d.copy()
                elif parts[k] == "both":
                    kd_buf[k] = m_kd * kd_buf[k] + d
                else:
                    kd_buf[k] = (m_kd + m_task) / 2 * kd_buf[k] + d + weight_decay * w[k]
                new[k] = new[k] - lr[step] * kd_buf[k]
        w = new
        history.append({k: v.copy() for k, v in w.items()})
    return history


def _dot_problem(seed=40, steps=4):
    rng = np.random.default_rng(seed)
    params = {"both": rng.normal(size=(3, 2)), "task": rng.normal(size=4),
              "distill": rng.normal(size=(2,))}
    grads = [tuple({k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2))
             for _ in range(steps)]
    return params, grads


def _run_dot(tx, params, grads):
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def test_dot_matches_mdistillers_trainer(x64):
    params, grads = _dot_problem()
    parts = {k: k for k in params}
    rates = [0.1, 0.1, 0.05, 0.02]
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5, 3: 0.4})
    tx = dot_lib.dot(schedule, momentum=0.9, delta=0.075, weight_decay=5e-4, parts=parts)
    got = _run_dot(tx, params, grads)
    expected = ref_dot(params, grads, lr=rates, momentum=0.9, delta=0.075, weight_decay=5e-4,
                       parts=parts, first_step_weight_decay=True)
    for a, e in zip(got, expected):
        chex.assert_trees_all_close(jax.tree.map(np.asarray, a), e, rtol=1e-12, atol=1e-14)
    # The one documented difference: mdistiller skips the weight decay in the first step of
    # a distillation-only parameter.
    quirk = ref_dot(params, grads[:1], lr=rates, momentum=0.9, delta=0.075,
                    weight_decay=5e-4, parts=parts)[0]
    np.testing.assert_allclose(np.asarray(got[0]["distill"]) - quirk["distill"],
                               -0.1 * 5e-4 * params["distill"], rtol=1e-10)
    for k in ("both", "task"):
        np.testing.assert_allclose(np.asarray(got[0][k]), quirk[k], rtol=1e-12)


def test_dot_with_equal_momenta_is_sgd_on_the_summed_gradient(x64):
    params, grads = _dot_problem(41)
    got = _run_dot(dot_lib.dot(0.05, momentum=0.9, delta=0.0, weight_decay=1e-3), params,
                   grads)
    sgd = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))
    summed = [jax.tree.map(lambda a, b: a + b, g, h) for g, h in grads]
    expected = _run_dot(sgd, params, summed)
    chex.assert_trees_all_close(got, expected, rtol=1e-12)
    # With delta > 0 the parameters reached by both losses move differently.
    other = _run_dot(dot_lib.dot(0.05, momentum=0.9, delta=0.075, weight_decay=1e-3), params,
                     grads)
    assert not np.allclose(np.asarray(other[-1]["both"]), np.asarray(expected[-1]["both"]))


def test_dot_in_a_jitted_train_state_step():
    from flax.training import train_state

    params = {"w": jnp.ones(3)}
    state = train_state.TrainState.create(apply_fn=None, params=params,
                                          tx=dot_lib.dot(0.1, delta=0.05))

    @jax.jit
    def step(state):
        task = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(state.params)
        distill = jax.grad(lambda p: jnp.sum(p["w"]))(state.params)
        return state.apply_gradients(grads=(task, distill))

    state = step(step(state))
    assert int(state.step) == 2 and isinstance(state.opt_state, dot_lib.DotState)
    assert np.all(np.asarray(state.params["w"]) < 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"delta": 0.2}, "must lie in"),
    ({"momentum": -0.1}, "`momentum`"),
    ({"parts": {"w": "student"}}, "'both', 'task' or 'distill'"),
])
def test_dot_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tx = dot_lib.dot(0.1, **kwargs)
        tx.update((({"w": jnp.ones(1)}), {"w": jnp.ones(1)}), tx.init({"w": jnp.ones(1)}),
                  {"w": jnp.ones(1)})


def test_dot_needs_the_gradient_pair_and_params():
    tx = dot_lib.dot(0.1)
    state = tx.init({"w": jnp.ones(1)})
    with pytest.raises(ValueError, match="the pair"):
        tx.update({"w": jnp.ones(1)}, state, {"w": jnp.ones(1)})
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(({"w": jnp.ones(1)}, {"w": jnp.ones(1)}), state)


# ----------------------------------------------------------------------------
# The presets: KDSVD and CTKD.
# ----------------------------------------------------------------------------

X = np.random.default_rng(50).normal(size=(4, 8, 8, 3)).astype(np.float32)
LABELS = jnp.asarray([0, 3, 9, 4], jnp.int32)


def test_kdsvd_preset_is_ce_plus_kdsvd_over_the_post_relu_stages():
    student, teacher = TinyNet(width=4), TinyNet(width=4)  # KDSVD needs equal widths

    @jax.jit
    def parts_and_expected(s_vars, t_vars):
        s_logits, s_feat = student.apply(s_vars, X, return_features=True)
        t_logits, t_feat = teacher.apply(t_vars, X, return_features=True)
        loss, parts, _ = objectives.evaluate_objective(
            METHODS["kdsvd"], student_logits=s_logits, labels=LABELS, epoch=1.0,
            teacher_logits=t_logits, student_features=s_feat, teacher_features=t_feat)
        relu = jax.nn.relu
        expected = losses.kdsvd_loss([relu(s_feat["stage1"]), relu(s_feat["stage2"])],
                                     [relu(t_feat["stage1"]), relu(t_feat["stage2"])]).mean()
        return loss, parts, expected

    init = jax.jit(lambda key: student.init(key, X, return_features=True))
    loss, parts, expected = parts_and_expected(init(jax.random.PRNGKey(1)),
                                               init(jax.random.PRNGKey(2)))
    np.testing.assert_allclose(parts["kdsvd"], expected, rtol=1e-6)
    np.testing.assert_allclose(loss, parts["ce"] + expected, rtol=1e-6)
    assert float(parts["kdsvd"]) > 0


def test_ctkd_preset_learns_a_reversed_temperature_head():
    objective = METHODS["ctkd"]
    model = objectives.prepare_student(TinyNet(width=4), objective, TinyNet(width=8))
    variables = jax.jit(lambda key: model.init(key, X, return_features=True))(
        jax.random.PRNGKey(3))
    assert float(variables["params"]["head_ctkd"]["theta"]) == 1.0  # the authors' init
    exported = objectives.backbone_variables(model, variables)  # not in the deployed student
    assert "head_ctkd" not in str(jax.tree_util.tree_structure(exported))

    rng = np.random.default_rng(51)
    s, t = (jnp.asarray(3 * rng.normal(size=(4, 10)), jnp.float32) for _ in range(2))
    epoch = 2.4  # the third epoch: lambda at 3

    @jax.jit
    def grads(s, theta):
        def total(s, theta):
            loss, _, _ = objectives.evaluate_objective(
                objective, student_logits=s, labels=LABELS, epoch=epoch, teacher_logits=t,
                student_features={}, teacher_features={}, heads={"ctkd": {"theta": theta}})
            return loss
        return jax.grad(total, argnums=(0, 1))(s, theta)

    def kd(s, theta):  # the distillation part at T(theta), not reversed
        temperature = 1.0 + 20.0 * jax.nn.sigmoid(theta)
        return 0.9 * losses.soft_target_kl(s, t, temperature=temperature).mean()

    g_s, g_theta = grads(s, 1.0)
    ref_s, ref_theta = jax.jit(jax.grad(kd, argnums=(0, 1)))(s, 1.0)
    ce_s = jax.grad(lambda s: 0.1 * objectives.cross_entropy(s, LABELS).mean())(s)
    np.testing.assert_allclose(g_theta, -ref_ctkd_lambda(3) * ref_theta, rtol=1e-5)
    assert float(jnp.abs(g_theta)) > 0
    np.testing.assert_allclose(g_s, ref_s + ce_s, rtol=1e-5, atol=1e-7)  # not reversed
