"""Tests for the CRD, VID, CC and ReviewKD (HCL) functions of kd_jax.losses.

Each function is compared with an independent float64 NumPy reference written from
the paper and the authors' reference code (loops over examples, plain NumPy, never
calling kd_jax), with and without jit; properties users rely on are tested separately.
float64 runs inside ``jax.enable_x64(True)`` so x64 never leaks into other test files.
"""

import math
from functools import partial

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

NCE_EPS = 1e-7  # RepDistiller's ContrastLoss eps


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_crd_scores(anchor, memory, idx, temperature):
    """exp(<memory[j], anchor_b> / T) for every j in row b of idx: [B, K + 1]."""
    out = np.zeros(idx.shape)
    for b in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            out[b, k] = np.exp(np.dot(memory[idx[b, k]], anchor[b]) / temperature)
    return out


def ref_crd_normalizers(s, t, m_s, m_t, idx, temperature):
    n = m_s.shape[0]
    return (ref_crd_scores(s, m_t, idx, temperature).mean() * n,
            ref_crd_scores(t, m_s, idx, temperature).mean() * n)


def ref_contrast_loss(p, n):
    """Per-example NCE loss of eq. 18 for P = exp-scores / Z, noise P_n = 1 / n."""
    k = p.shape[1] - 1
    pn = 1.0 / n
    out = np.zeros(p.shape[0])
    for b in range(p.shape[0]):
        loss = -np.log(p[b, 0] / (p[b, 0] + k * pn + NCE_EPS))
        for j in range(1, k + 1):
            loss -= np.log(k * pn / (p[b, j] + k * pn + NCE_EPS))
        out[b] = loss
    return out


def ref_crd_nce(s, t, m_s, m_t, idx, temperature, normalizers=None):
    n = m_s.shape[0]
    if normalizers is None:
        normalizers = ref_crd_normalizers(s, t, m_s, m_t, idx, temperature)
    z_s, z_t = normalizers
    out_s = ref_crd_scores(s, m_t, idx, temperature) / z_s  # student anchor, teacher memory
    out_t = ref_crd_scores(t, m_s, idx, temperature) / z_t
    return ref_contrast_loss(out_s, n) + ref_contrast_loss(out_t, n)


def ref_memory_update(memory, embedding, idx, momentum):
    """Rows computed from the old memory, written in batch order (the last write wins)."""
    old = memory.copy()
    new = memory.copy()
    for b, i in enumerate(idx):
        row = momentum * old[i] + (1 - momentum) * embedding[b]
        new[i] = row / np.linalg.norm(row)
    return new


def ref_vid(mu, t, alpha, eps):
    var = np.log(1.0 + np.exp(alpha)) + eps  # broadcasts over the last (channel) axis
    nll = 0.5 * ((mu - t) ** 2 / var + np.log(var))
    return np.array([nll[b].mean() for b in range(mu.shape[0])])


def ref_cc_matrix(x, gamma, order):
    x = np_unit(x.reshape(x.shape[0], -1))
    bsz = x.shape[0]
    c = np.zeros((bsz, bsz))
    for i in range(bsz):
        for j in range(bsz):
            sim = np.dot(x[i], x[j])
            c[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim**p
                          for p in range(order + 1))
    return c


def ref_cc(s, t, gamma, order):
    c_s, c_t = ref_cc_matrix(s, gamma, order), ref_cc_matrix(t, gamma, order)
    return np.float64(np.sum((c_s - c_t) ** 2) / s.shape[0] ** 2)


def ref_adaptive_avg_pool(x, size):
    """PyTorch adaptive_avg_pool2d on NHWC: bin i spans [floor(i H / l), ceil((i + 1) H / l))."""
    bsz, h, w, c = x.shape
    out = np.zeros((bsz, size, size, c))
    for i in range(size):
        h0, h1 = math.floor(i * h / size), math.ceil((i + 1) * h / size)
        for j in range(size):
            w0, w1 = math.floor(j * w / size), math.ceil((j + 1) * w / size)
            out[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
    return out


def ref_hcl(student_maps, teacher_maps):
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps):
        h = fs.shape[1]
        loss = ((fs - ft) ** 2).mean(axis=(1, 2, 3))
        weight, weight_sum = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2.0
            ps, pt = ref_adaptive_avg_pool(fs, size), ref_adaptive_avg_pool(ft, size)
            loss = loss + weight * ((ps - pt) ** 2).mean(axis=(1, 2, 3))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------

B, D, N, K = 4, 6, 30, 7
TEMPERATURE = 0.25  # not the default 0.07, so exp(score / T) stays O(1) to O(100)


def crd_inputs(seed=0):
    rng = np.random.default_rng(seed)
    s, t = np_unit(rng.normal(size=(B, D))), np_unit(rng.normal(size=(B, D)))
    m_s, m_t = np_unit(rng.normal(size=(N, D))), np_unit(rng.normal(size=(N, D)))
    idx = rng.integers(0, N, size=(B, K + 1))
    idx[:, 0] = [3, 17, 8, 25]
    return s, t, m_s, m_t, idx


def hcl_inputs(seed=0):
    rng = np.random.default_rng(seed)
    # Levels: 4x4 pools to 2, 1 (not 4); 7x7 to 4, 2, 1 with overlapping bins; 2x3 (not
    # square) to 1; 1x1 to none.
    shapes = [(3, 4, 4, 2), (3, 7, 7, 3), (3, 2, 3, 2), (3, 1, 1, 4)]
    return ([rng.normal(size=shape) for shape in shapes],
            [rng.normal(size=shape) for shape in shapes])


def _f32(tree):
    """Floating arrays cast to float32; integer ones kept."""
    return jax.tree.map(
        lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
        else x, tree)


# ----------------------------------------------------------------------------
# Reference comparisons, with and without jit.
# ----------------------------------------------------------------------------


class ReferenceTest(chex.TestCase):

    def _check(self, fn, args, expected, rtol=1e-6):
        with jax.enable_x64(True):
            out = self.variant(fn)(*args)
            chex.assert_trees_all_equal_dtypes(out, jnp.zeros((), jnp.float64))
        chex.assert_shape(out, np.shape(expected))
        chex.assert_trees_all_close(np.asarray(out), expected, rtol=rtol, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(fixed=(False, True), method=("auto", "dense", "gather"))
    def test_crd_nce_loss(self, fixed, method):
        args = crd_inputs()
        z = (700.0, 900.0) if fixed else None
        expected = ref_crd_nce(*args, TEMPERATURE, z)
        self._check(lambda *a: losses.crd_nce_loss(*a, temperature=TEMPERATURE, normalizers=z,
                                                   method=method),
                    args, expected)
        assert np.all(expected > 0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("auto", "dense", "gather")
    def test_crd_normalizers(self, method):
        args = crd_inputs(1)
        with jax.enable_x64(True):
            out = self.variant(lambda *a: losses.crd_normalizers(
                *a, temperature=TEMPERATURE, method=method))(*args)
        chex.assert_trees_all_close(tuple(np.asarray(z) for z in out),
                                    ref_crd_normalizers(*args, TEMPERATURE), rtol=1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    def test_crd_memory_update_with_duplicate_indices(self):
        rng = np.random.default_rng(2)
        memory, emb = np_unit(rng.normal(size=(N, D))), rng.normal(size=(5, D))
        idx = np.array([4, 9, 4, 0, 4])  # row 4 three times: the last (b = 4) wins
        expected = ref_memory_update(memory, emb, idx, 0.3)
        self._check(lambda m, e, i: losses.crd_memory_update(m, e, i, momentum=0.3),
                    (memory, emb, idx), expected, rtol=1e-12)
        # Not accumulated: row 4 is computed from the old row and emb[4] only.
        row = 0.3 * memory[4] + 0.7 * emb[4]
        np.testing.assert_allclose(expected[4], row / np.linalg.norm(row))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("nhwc", (3, 4, 5, 6)), ("vector", (3, 6)))
    def test_vid_loss(self, shape):
        rng = np.random.default_rng(3)
        mu, t = rng.normal(size=shape), rng.normal(size=shape)
        alpha = rng.normal(size=shape[-1:])
        self._check(lambda m, x, a: losses.vid_loss(m, x, a, eps=1e-3),
                    (mu, t, alpha), ref_vid(mu, t, alpha, 1e-3))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("default", 0.4, 2), ("order5", 1.3, 5))
    def test_cc_loss(self, gamma, order):
        rng = np.random.default_rng(4)
        s, t = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 9))  # sizes may differ
        self._check(lambda a, b: losses.cc_loss(a, b, gamma=gamma, order=order),
                    (s, t), ref_cc(s, t, gamma, order))

    @chex.variants(with_jit=True, without_jit=True)
    def test_hcl_loss(self):
        fs, ft = hcl_inputs()
        self._check(losses.hcl_loss, (fs, ft), ref_hcl(fs, ft))

    def test_float32_inputs_match_float64_reference_at_1e_5(self):
        crd = crd_inputs(5)
        fs, ft = hcl_inputs(5)
        rng = np.random.default_rng(5)
        mu, t, alpha = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 5)), rng.normal(
            size=5)
        cases = [
            (lambda *a: losses.crd_nce_loss(*a, temperature=TEMPERATURE), crd,
             ref_crd_nce(*crd, TEMPERATURE)),
            (losses.crd_memory_update, (crd[2], crd[0], crd[4][:, 0]),
             ref_memory_update(crd[2], crd[0], crd[4][:, 0], 0.5)),
            (losses.vid_loss, (mu, t, alpha), ref_vid(mu, t, alpha, 1e-5)),
            (losses.cc_loss, (crd[0], crd[1]), ref_cc(crd[0], crd[1], 0.4, 2)),
            (losses.hcl_loss, (fs, ft), ref_hcl(fs, ft)),
        ]
        for fn, args, expected in cases:
            out = jax.jit(fn)(*_f32(args))
            assert out.dtype == jnp.float32
            chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=1e-5,
                                        atol=1e-6)


# ----------------------------------------------------------------------------
# CRD negative sampling.
# ----------------------------------------------------------------------------

LABELS = np.arange(N) % 3  # 3 classes of 10


class SamplingTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_class_exclusive_sampling(self):
        idx = np.array([0, 4, 29, 4])
        fn = self.variant(lambda key, i, y: losses.crd_sample_negatives(
            key, i, num_examples=N, num_negatives=20, dataset_labels=y))
        out = np.asarray(fn(jax.random.PRNGKey(0), idx, LABELS))
        assert out.dtype == np.int32 and out.shape == (4, 21)
        np.testing.assert_array_equal(out[:, 0], idx)
        for row in out:
            negatives = row[1:]
            # All 20 examples of the two other classes, each once: no repeats, no same class.
            assert np.all(LABELS[negatives] != LABELS[row[0]])
            assert len(set(negatives)) == 20
        # Same key, same rows; another key, other rows (the order differs, at least).
        np.testing.assert_array_equal(fn(jax.random.PRNGKey(0), idx, LABELS), out)
        assert not np.array_equal(fn(jax.random.PRNGKey(1), idx, LABELS), out)

    @chex.variants(with_jit=True, without_jit=True)
    def test_uniform_sampling_with_replacement(self):
        idx = np.arange(B)
        out = np.asarray(self.variant(lambda key, i: losses.crd_sample_negatives(
            key, i, num_examples=N, num_negatives=200))(jax.random.PRNGKey(2), idx))
        assert out.dtype == np.int32 and out.shape == (B, 201)
        np.testing.assert_array_equal(out[:, 0], idx)
        assert out.min() >= 0 and out.max() < N
        # With replacement over all examples: rows repeat values and may hold the positive.
        assert all(len(set(row[1:])) < 200 for row in out)
        assert any(row[0] in row[1:] for row in out)

    @parameterized.named_parameters(("exclusive", True), ("uniform", False))
    def test_negatives_are_uniform(self, exclusive):
        # 4000 rows for example 0 (class 0): each allowed example is drawn equally often.
        rows, k = 4000, 4
        y = LABELS if exclusive else None
        out = np.asarray(jax.jit(lambda key: losses.crd_sample_negatives(
            key, jnp.zeros(rows, jnp.int32), num_examples=N, num_negatives=k,
            dataset_labels=y))(jax.random.PRNGKey(3)))
        allowed = np.flatnonzero(LABELS != 0) if exclusive else np.arange(N)
        counts = np.bincount(out[:, 1:].ravel(), minlength=N)
        assert counts[np.setdiff1d(np.arange(N), allowed)].sum() == 0
        expected = rows * k / len(allowed)
        chi2 = np.sum((counts[allowed] - expected) ** 2 / expected)
        # chi-square with len(allowed) - 1 dof: mean ~20-29; 80 is far in the tail.
        assert chi2 < 80, chi2

    def test_exclusive_negatives_are_exact_uniform_samples_without_replacement(self):
        # Imbalanced classes (30, 70 and 200 of 300 examples) and K = 90: for a class-2 anchor
        # K is 90% of the 100 allowed examples, so rows need several blocks of draws.
        rng = np.random.default_rng(0)
        labels = rng.permutation(np.repeat([0, 1, 2], [30, 70, 200])).astype(np.int32)
        rows, k = 3000, 90
        anchors = np.repeat([np.flatnonzero(labels == c)[0] for c in (0, 1, 2)], rows)
        out = np.asarray(jax.jit(lambda key, i, y: losses.crd_sample_negatives(
            key, i, num_examples=300, num_negatives=k, dataset_labels=y))(
                jax.random.PRNGKey(4), anchors.astype(np.int32), labels))
        np.testing.assert_array_equal(out[:, 0], anchors)
        negatives = out[:, 1:]
        assert np.all(labels[negatives] != labels[anchors][:, None])  # never the anchor's class
        assert all(len(np.unique(row)) == k for row in negatives)  # no repeats within a row
        for c in (0, 1, 2):
            allowed = np.flatnonzero(labels != c)
            counts = np.bincount(negatives[labels[anchors] == c].ravel(), minlength=300)[allowed]
            # Each allowed example is in a row with probability p = K / M; the statistic is
            # chi-square with M - 1 degrees of freedom (rows sum to K): mean M - 1, sd
            # sqrt(2 (M - 1)); the bound is 7 sd above the mean.
            p = k / len(allowed)
            stat = np.sum((counts - rows * p) ** 2 / (rows * p * (1 - p)))
            dof = len(allowed) - 1
            assert stat < dof + 7 * math.sqrt(2 * dof), (c, stat)

    def test_every_subset_and_order_of_negatives_is_equally_likely(self):
        # 3 examples of class 0, 5 of class 1: an anchor of class 0 draws 2 of the 5, so 10
        # subsets (20 ordered pairs) should each come up 1/10 (1/20) of the time.
        labels = np.array([1, 0, 1, 1, 0, 1, 0, 1], np.int32)
        rows = 20000
        out = np.asarray(jax.jit(lambda key: losses.crd_sample_negatives(
            key, jnp.full(rows, 1, jnp.int32), num_examples=8, num_negatives=2,
            dataset_labels=labels))(jax.random.PRNGKey(5)))[:, 1:]
        allowed = np.flatnonzero(labels == 1)
        position = np.searchsorted(allowed, out)
        assert np.all(allowed[position] == out)
        ordered = np.bincount(position[:, 0] * 5 + position[:, 1], minlength=25)
        assert np.all(ordered[np.arange(5) * 6] == 0)  # never the same example twice
        ordered = np.delete(ordered, np.arange(5) * 6)
        subsets = ordered.reshape(5, 4)  # pair (a, b) and (b, a) summed below
        pairs = {}
        for a in range(5):
            for j, b in enumerate(x for x in range(5) if x != a):
                pairs[frozenset((a, b))] = pairs.get(frozenset((a, b)), 0) + subsets[a, j]
        for counts, cells in ((np.array(list(pairs.values())), 10), (ordered, 20)):
            expected = rows / cells
            stat = np.sum((counts - expected) ** 2 / expected)
            assert stat < (cells - 1) + 7 * math.sqrt(2 * (cells - 1)), (cells, stat)

    def test_exclusive_sampler_traced_labels_and_class_order_give_the_same_rows(self):
        idx = np.array([0, 4, 29, 4], np.int32)
        key = jax.random.PRNGKey(6)
        concrete = losses.crd_sample_negatives(key, idx, num_examples=N, num_negatives=12,
                                               dataset_labels=LABELS)
        traced = jax.jit(lambda y: losses.crd_sample_negatives(
            key, idx, num_examples=N, num_negatives=12, dataset_labels=y))(LABELS)
        order = np.argsort(LABELS, kind="stable")
        given = jax.jit(lambda y, o: losses.crd_sample_negatives(
            key, idx, num_examples=N, num_negatives=12, dataset_labels=y, class_order=o))(
                LABELS, order)
        np.testing.assert_array_equal(traced, concrete)
        np.testing.assert_array_equal(given, concrete)
        # Traced labels with more negatives than other-class examples: repeats, same class
        # never.
        over = np.asarray(jax.jit(lambda y: losses.crd_sample_negatives(
            key, idx, num_examples=N, num_negatives=25, dataset_labels=y))(LABELS))
        assert np.all(LABELS[over[:, 1:]] != LABELS[idx][:, None])
        assert all(len(set(row[1:])) == 20 for row in over)

    def test_exclusive_draws_are_lemires_exact_multiply_and_reject(self):
        # The sampler's uniform draws on [0, limit): the high word of bits * limit, rejected
        # when the low word is below 2^32 mod limit, against exact 64-bit integer arithmetic.
        from kd_jax.losses import _crd_sampler
        key = jax.random.PRNGKey(7)
        limit = np.array([1, 2, 3, 7, 49_500, 65_536, 1_281_167, 2**31 - 1], np.int32)
        draws, accepted = (np.asarray(a) for a in _crd_sampler._uniform_below(
            key, jnp.asarray(limit), 5000))
        bits = np.asarray(jax.random.bits(key, (len(limit), 5000), jnp.uint32), np.uint64)
        product = bits * limit.astype(np.uint64)[:, None]
        np.testing.assert_array_equal(draws, product >> np.uint64(32))
        cut = (np.uint64(2**32) % limit.astype(np.uint64))[:, None]
        np.testing.assert_array_equal(accepted, (product & np.uint64(2**32 - 1)) >= cut)
        assert np.all((draws >= 0) & (draws < limit[:, None]))

    def test_too_many_negatives_for_class_exclusive_sampling_raises(self):
        with pytest.raises(ValueError, match="num_negatives.*exceeds the 20 examples"):
            losses.crd_sample_negatives(jax.random.PRNGKey(0), np.array([0]), num_examples=N,
                                        num_negatives=21, dataset_labels=LABELS)


# ----------------------------------------------------------------------------
# CRD loss and memory properties.
# ----------------------------------------------------------------------------

jit_nce = jax.jit(losses.crd_nce_loss)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_crd_batch_normalizer_equals_crd_normalizers(x64):
    args = crd_inputs(6)
    z = losses.crd_normalizers(*args, temperature=TEMPERATURE)
    chex.assert_trees_all_close(jit_nce(*args, temperature=TEMPERATURE),
                                jit_nce(*args, temperature=TEMPERATURE, normalizers=z),
                                rtol=1e-12)


@pytest.mark.parametrize("given", [(0.0, 0.0), (0.0, 700.0), (300.0, 0.0), (300.0, 700.0)])
def test_crd_loss_and_normalizers_fixes_the_missing_ones_from_the_batch(x64, given):
    # A 0 normaliser is this batch's estimate (the reference's), a given one is kept; the
    # loss and its gradients are crd_nce_loss's with the normalisers so chosen.
    args = crd_inputs(8)
    ref = ref_crd_normalizers(*args, TEMPERATURE)
    want_z = tuple(r if g == 0 else g for g, r in zip(given, ref))
    fn = jax.jit(losses.crd_nce_loss_and_normalizers, static_argnames=("temperature",))
    loss, z = fn(*args, temperature=TEMPERATURE, normalizers=given)
    np.testing.assert_allclose(np.asarray(z), want_z, rtol=1e-12)
    np.testing.assert_allclose(loss, ref_crd_nce(*args, TEMPERATURE, normalizers=want_z),
                               rtol=1e-10)
    grad = lambda f: jax.grad(lambda s, t: jnp.sum(f(s, t)), argnums=(0, 1))(*args[:2])  # noqa
    chex.assert_trees_all_close(
        grad(lambda s, t: fn(s, t, *args[2:], temperature=TEMPERATURE, normalizers=given)[0]),
        grad(lambda s, t: jit_nce(s, t, *args[2:], temperature=TEMPERATURE,
                                  normalizers=want_z)), rtol=1e-10)
    with pytest.raises(ValueError, match=r"normalizers\[1\]` must be a finite number >= 0"):
        losses.crd_nce_loss_and_normalizers(*args, normalizers=(1.0, -1.0))


def test_crd_loss_decreases_as_positive_score_increases(x64):
    s, t, m_s, m_t, idx = crd_inputs(7)
    z = (500.0, 500.0)
    previous = None
    for alpha in (0.0, 0.3, 0.6, 0.9):
        m = m_t.copy()
        m[idx[:, 0]] = np_unit((1 - alpha) * m_t[idx[:, 0]] + alpha * s)  # the positives
        loss = np.asarray(jit_nce(s, t, m_s, m, idx, temperature=TEMPERATURE, normalizers=z))
        if previous is not None:
            assert np.all(loss < previous), (alpha, loss, previous)
        previous = loss


def test_crd_loss_increases_as_a_negative_score_increases(x64):
    s, t, m_s, m_t, idx = crd_inputs(8)
    idx[:, 1] = [0, 1, 2, 5]  # distinct from every other index in the batch
    idx[:, 2:] = 10
    idx[:, 0] = [20, 21, 22, 23]
    z = (500.0, 500.0)
    m = m_t.copy()
    m[idx[:, 1]] = s
    base = jit_nce(s, t, m_s, m_t, idx, temperature=TEMPERATURE, normalizers=z)
    assert np.all(jit_nce(s, t, m_s, m, idx, temperature=TEMPERATURE, normalizers=z) > base)


def test_crd_gradients_flow_to_embeddings_not_memories(x64):
    s, t, m_s, m_t, idx = crd_inputs(9)
    z = (300.0, 800.0)
    f = jax.jit(lambda a, b: jnp.sum(losses.crd_nce_loss(
        a, b, m_s, m_t, idx, temperature=TEMPERATURE, normalizers=z)))
    jax.test_util.check_grads(f, (s, t), order=1, modes=["rev"])
    grads = jax.jit(jax.grad(lambda ms, mt: jnp.sum(losses.crd_nce_loss(
        s, t, ms, mt, idx, temperature=TEMPERATURE)), argnums=(0, 1)))(m_s, m_t)
    chex.assert_trees_all_equal(grads, (np.zeros_like(m_s), np.zeros_like(m_t)))


def test_crd_dense_and_gather_scores_give_the_same_loss_and_gradients(x64):
    s, t, m_s, m_t, idx = crd_inputs(13)
    idx[1, 3] = idx[1, 5]  # a repeated negative (the uniform sampler's) counts twice
    for z in (None, (600.0, 800.0)):
        def total(a, b, method):
            return jnp.sum(jnp.arange(1.0, 5.0) * losses.crd_nce_loss(
                a, b, m_s, m_t, idx, temperature=TEMPERATURE, normalizers=z, method=method))
        grads = {m: jax.jit(jax.value_and_grad(partial(total, method=m), argnums=(0, 1)))(s, t)
                 for m in ("dense", "gather")}
        chex.assert_trees_all_close(grads["dense"], grads["gather"], rtol=1e-12)
        # Against the plain autodiff of the gathered scores (the implementation before
        # the gradients were computed in the forward pass).
        def plain(a, b):
            sc_s = jnp.einsum("bkd,bd->bk", m_t[idx], a) / TEMPERATURE
            sc_t = jnp.einsum("bkd,bd->bk", m_s[idx], b) / TEMPERATURE
            n, k = m_s.shape[0], idx.shape[1] - 1
            zz = z or (jnp.exp(sc_s).mean() * n, jnp.exp(sc_t).mean() * n)
            log_c = math.log(k / n + NCE_EPS)

            def nce(sc, log_z):
                log_p = sc - jax.lax.stop_gradient(log_z)
                return -(log_p[:, 0] - jnp.logaddexp(log_p[:, 0], log_c) + jnp.sum(
                    math.log(k / n) - jnp.logaddexp(log_p[:, 1:], log_c), axis=1))
            return jnp.sum(jnp.arange(1.0, 5.0) * (nce(sc_s, jnp.log(zz[0]))
                                                   + nce(sc_t, jnp.log(zz[1]))))
        chex.assert_trees_all_close(grads["dense"][1], jax.grad(plain, argnums=(0, 1))(s, t),
                                    rtol=1e-10)
    with pytest.raises(ValueError, match="`method` must be"):
        losses.crd_nce_loss(s, t, m_s, m_t, idx, method="fast")


def test_crd_loss_is_finite_and_exact_for_large_scores(x64):
    # Unnormalised embeddings at T = 0.07: exp(score / T) overflows float32, but the loss
    # works in log space and still matches the float64 reference.
    s, t, m_s, m_t, idx = crd_inputs(10)
    s32 = np.float32(s * 3.0)
    ref = ref_crd_nce(s32.astype(np.float64), t, m_s, m_t, idx, 0.07)
    out = jax.jit(lambda *a: losses.crd_nce_loss(*a, temperature=0.07))(
        *_f32((s32, t, m_s, m_t)), idx)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, rtol=1e-5)


def test_crd_non_finite_and_out_of_range_inputs():
    s, t, m_s, m_t, idx = _f32(crd_inputs(11)[:4]) + (crd_inputs(11)[4],)
    z = (500.0, 500.0)
    clean = np.asarray(jit_nce(s, t, m_s, m_t, idx, normalizers=z))
    bad_s = s.copy()
    bad_s[1, 0] = np.nan
    out = np.asarray(jit_nce(bad_s, t, m_s, m_t, idx, normalizers=z))
    assert np.isnan(out[1])
    np.testing.assert_array_equal(np.delete(out, 1), np.delete(clean, 1))
    # The batch normaliser couples the examples: then every example is NaN.
    assert np.all(np.isnan(np.asarray(jit_nce(bad_s, t, m_s, m_t, idx))))
    # A traced out-of-range index gives NaN for its example only.
    bad_idx = idx.copy()
    bad_idx[2, 3] = N
    out = np.asarray(jit_nce(s, t, m_s, m_t, bad_idx, normalizers=z))
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2)))
    with pytest.raises(ValueError, match=r"`sample_idx` must lie in \[0, 30\)"):
        losses.crd_nce_loss(s, t, m_s, m_t, bad_idx)


def test_crd_memory_update_properties():
    rng = np.random.default_rng(12)
    memory = rng.normal(size=(N, D)).astype(np.float32)  # rows not unit-norm, as at init
    emb = rng.normal(size=(3, D)).astype(np.float32)
    idx = np.array([2, 11, 2])
    update = jax.jit(losses.crd_memory_update)
    new = np.asarray(update(memory, emb, idx, momentum=0.5))
    others = np.setdiff1d(np.arange(N), idx)
    np.testing.assert_array_equal(new[others], memory[others])  # bit for bit
    np.testing.assert_allclose(np.linalg.norm(new[[2, 11]], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        update(memory, emb, idx, momentum=0.0)[np.array([2, 11])],
        np_unit(emb[[2, 1]]), rtol=1e-6)
    np.testing.assert_allclose(
        update(memory, emb, idx, momentum=1.0)[np.array([2, 11])],
        np_unit(memory[[2, 11]]), rtol=1e-6)
    # The memory keeps its dtype (a bfloat16 memory stays bfloat16).
    assert update(memory.astype(jnp.bfloat16), emb, idx).dtype == jnp.bfloat16
    # A traced out-of-range index is skipped; a concrete one raises.
    np.testing.assert_array_equal(update(memory, emb, np.array([N, 5, -1]))[np.arange(N) != 5],
                                  memory[np.arange(N) != 5])
    with pytest.raises(ValueError, match="`indices` must lie in"):
        losses.crd_memory_update(memory, emb, np.array([N, 5, 1]))


# ----------------------------------------------------------------------------
# VID, CC and HCL properties.
# ----------------------------------------------------------------------------


def test_vid_repdistiller_init_gives_variance_five(x64):
    eps = 1e-5
    alpha = np.full(4, np.log(np.exp(5.0 - eps) - 1.0))  # RepDistiller's init_pred_var = 5
    f = np.random.default_rng(13).normal(size=(2, 3, 3, 4))
    chex.assert_trees_all_close(jax.jit(losses.vid_loss)(f, f, alpha),
                                np.full(2, 0.5 * np.log(5.0)), rtol=1e-12)


def test_vid_optimal_variance_is_per_channel_mean_squared_error(x64):
    # The Gaussian NLL is minimised over sigma_c^2 at the channel's mean squared error,
    # so the batch loss has zero gradient in the variance parameter there.
    rng = np.random.default_rng(14)
    mu, t = rng.normal(size=(3, 4, 4, 5)), 2.0 * rng.normal(size=(3, 4, 4, 5))
    eps = 1e-5
    mse = ((mu - t) ** 2).mean(axis=(0, 1, 2))
    alpha = np.log(np.expm1(mse - eps))
    grad = jax.jit(jax.grad(lambda a: jnp.mean(losses.vid_loss(mu, t, a, eps=eps))))(alpha)
    chex.assert_trees_all_close(grad, np.zeros(5), atol=1e-12)
    grad_off = jax.jit(jax.grad(lambda a: jnp.mean(losses.vid_loss(mu, t, a, eps=eps))))(
        alpha + 0.5)
    assert np.all(np.asarray(grad_off) > 1e-3)


def test_vid_gradients(x64):
    rng = np.random.default_rng(15)
    args = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4)), rng.normal(size=4)
    jax.test_util.check_grads(jax.jit(lambda *a: jnp.sum(losses.vid_loss(*a))), args,
                              order=1, modes=["rev"])


def test_cc_zero_for_identical_and_rescaled_embeddings_positive_otherwise(x64):
    rng = np.random.default_rng(16)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    cc = jax.jit(losses.cc_loss)
    assert cc(s, t) > 1e-4
    chex.assert_trees_all_close(cc(t, t), 0.0, atol=1e-15)
    # Rows are normalised: a per-example positive scale changes nothing.
    chex.assert_trees_all_close(cc(t * rng.uniform(0.1, 10, size=(6, 1)), t), 0.0, atol=1e-15)
    # Order 0 keeps only the constant term exp(-2 gamma): nothing to match.
    chex.assert_trees_all_close(losses.cc_loss(s, t, order=0), 0.0, atol=1e-15)


def test_cc_tends_to_exact_gaussian_rbf_with_order(x64):
    rng = np.random.default_rng(17)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 7))
    gamma = 0.4

    def rbf(x):
        x = np_unit(x)
        sq = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
        return np.exp(-gamma * sq)

    exact = np.sum((rbf(s) - rbf(t)) ** 2) / 25
    cc = jax.jit(losses.cc_loss, static_argnames="order")
    errors = [abs(float(cc(s, t, gamma=gamma, order=p)) - exact) / exact
              for p in (1, 2, 4, 12)]
    assert errors[0] > 1e-2
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-8


def test_cc_gradients(x64):
    rng = np.random.default_rng(18)
    jax.test_util.check_grads(jax.jit(losses.cc_loss), (rng.normal(size=(4, 3)),
                                                         rng.normal(size=(4, 5))),
                              order=1, modes=["rev"])


def test_hcl_zero_for_identical_maps_and_weights_sum_to_one(x64):
    fs, ft = hcl_inputs(19)
    hcl = jax.jit(losses.hcl_loss)
    chex.assert_trees_all_close(hcl(ft, ft), np.zeros(3), atol=1e-15)
    assert np.all(np.asarray(hcl(fs, ft)) > 0.1)
    # A constant difference c has the same MSE c^2 at every level: the normalised
    # weights then give c^2 per pair, whatever the number of levels.
    offsets = [t + c for t, c in zip(ft, (0.5, -1.0, 2.0, 0.25))]
    chex.assert_trees_all_close(hcl(offsets, ft), np.full(3, 0.25 + 1 + 4 + 0.0625),
                                rtol=1e-12)
    # A 1x1 map has no pooled levels: the loss is its plain MSE (FitNets' hint loss).
    chex.assert_trees_all_close(hcl(fs[3:], ft[3:]), losses.hint_loss(fs[3], ft[3]),
                                rtol=1e-12)


def test_hcl_gradients(x64):
    fs, ft = hcl_inputs(20)
    jax.test_util.check_grads(
        jax.jit(lambda a, b: jnp.sum(losses.hcl_loss(a, b))), (fs[1:2], ft[1:2]), order=1,
        modes=["rev"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_per_example_losses_non_finite_in_non_finite_out(bad):
    rng = np.random.default_rng(21)
    maps = [rng.normal(size=(3, 4, 4, 2)).astype(np.float32) for _ in range(4)]
    broken = maps[0].copy()
    broken[1, 2, 2, 0] = bad
    alpha = np.zeros(2, np.float32)
    for fn, clean_args, bad_args in [
        (losses.vid_loss, (maps[0], maps[1], alpha), (broken, maps[1], alpha)),
        (losses.hcl_loss, ([maps[0], maps[2]], [maps[1], maps[3]]),
         ([broken, maps[2]], [maps[1], maps[3]])),
    ]:
        clean = np.asarray(jax.jit(fn)(*clean_args))
        out = np.asarray(jax.jit(fn)(*bad_args))
        assert not np.isfinite(out[1])
        np.testing.assert_array_equal(np.delete(out, 1), np.delete(clean, 1))
    emb = maps[0].reshape(3, -1)
    bad_emb = broken.reshape(3, -1)
    cc = jax.jit(losses.cc_loss)
    assert np.isfinite(cc(emb, maps[1].reshape(3, -1)))
    assert not np.isfinite(cc(bad_emb, maps[1].reshape(3, -1)))


# ----------------------------------------------------------------------------
# Input validation.
# ----------------------------------------------------------------------------

_E = np.zeros((4, 6), np.float32)
_M = np.zeros((30, 6), np.float32)
_I = np.zeros((4, 8), np.int32)
_MAP = np.zeros((2, 4, 4, 3), np.float32)
_KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.crd_sample_negatives(_KEY, np.array([0, 30]), num_examples=30),
         r"`indices` must lie in \[0, 30\)"),
        (lambda: losses.crd_sample_negatives(_KEY, np.zeros((2, 1), np.int32),
                                             num_examples=30), "`indices` must have rank 1"),
        (lambda: losses.crd_sample_negatives(_KEY, np.zeros(2), num_examples=30),
         "`indices` must hold integer"),
        (lambda: losses.crd_sample_negatives(_KEY, np.zeros(2, np.int32), num_examples=30,
                                             num_negatives=0), "`num_negatives`"),
        (lambda: losses.crd_sample_negatives(_KEY, np.zeros(2, np.int32), num_examples=30,
                                             dataset_labels=np.zeros(29, np.int32)),
         "`dataset_labels` must have one class per training example"),
        (lambda: losses.crd_nce_loss(_E, np.zeros((4, 5), np.float32), _M, _M, _I),
         "`student_embedding` and `teacher_embedding` must have the same shape"),
        (lambda: losses.crd_nce_loss(_E, _E, np.zeros((30, 5), np.float32),
                                     np.zeros((30, 5), np.float32), _I), "`student_memory` rows"),
        (lambda: losses.crd_nce_loss(_E, _E, _M, np.zeros((31, 6), np.float32), _I),
         "`student_memory` and `teacher_memory`"),
        (lambda: losses.crd_nce_loss(_E, _E, _M, _M, np.zeros((4, 1), np.int32)),
         r"`sample_idx` must have shape \[B, K \+ 1\]"),
        (lambda: losses.crd_nce_loss(_E, _E, _M, _M, np.zeros((3, 8), np.int32)),
         "`sample_idx` must have shape"),
        (lambda: losses.crd_nce_loss(_E, _E, _M, _M, _I, temperature=0.0), "`temperature`"),
        (lambda: losses.crd_nce_loss(_E, _E, _M, _M, _I, normalizers=(1.0, -2.0)),
         r"`normalizers\[1\]`"),
        (lambda: losses.crd_memory_update(_M, np.zeros((4, 5), np.float32), _I[:, 0]),
         "same D"),
        (lambda: losses.crd_memory_update(_M, _E, _I[:3, 0]), "`indices` must have one entry"),
        (lambda: losses.crd_memory_update(_M, _E, _I[:, 0], momentum=1.5), "`momentum`"),
        (lambda: losses.vid_loss(_MAP, _MAP, np.zeros(4, np.float32)),
         r"`log_scale` must have shape \[C\]"),
        (lambda: losses.vid_loss(_MAP, _MAP[:, :2], np.zeros(3, np.float32)), "same shape"),
        (lambda: losses.vid_loss(_MAP, _MAP, np.zeros(3, np.float32), eps=0.0), "`eps`"),
        (lambda: losses.cc_loss(_E, np.zeros((3, 6), np.float32)), "batch size"),
        (lambda: losses.cc_loss(_E, _E, order=-1), "`order`"),
        (lambda: losses.cc_loss(_E, _E, order=2.0), "`order`"),
        (lambda: losses.cc_loss(_E, _E, gamma=0.0), "`gamma`"),
        (lambda: losses.hcl_loss(_MAP, _MAP), "`student_features` must be a non-empty list"),
        (lambda: losses.hcl_loss([_MAP], [_MAP, _MAP]), "same number of maps"),
        (lambda: losses.hcl_loss([_MAP, _MAP], [_MAP, _MAP[:, :2]]),
         r"`student_features\[1\]` and `teacher_features\[1\]` must have the same shape"),
        (lambda: losses.hcl_loss([_MAP, _MAP[:1]], [_MAP, _MAP[:1]]),
         r"`student_features\[1\]` must have the batch size 2"),
        (lambda: losses.hcl_loss([_MAP[0]], [_MAP[0]]), "rank 4"),
    ],
)
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
