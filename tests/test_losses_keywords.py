"""Every public loss takes its arguments as its signature says: by keyword, positionally,
and through ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

The arguments come from ``inspect.signature``; `_example` maps each required parameter's
name to an input. A loss with a parameter name it does not know fails here, so a new loss
cannot skip these tests.
"""

from __future__ import annotations

import functools
import inspect
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd_jax
from kd_jax import losses

B, C, N, K = 4, 10, 16, 3  # batch, classes, training-set size (CRD memories), negatives
MAP = (B, 4, 4, 3)  # NHWC
PUBLIC = sorted(losses.__all__)


def _rng(name: str, seed: int) -> np.random.Generator:
    # crc32, unlike hash(), is stable across runs. NumPy, not jax.random: eager jax.random
    # compiles per shape and would dominate this file's run time.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(name: str, seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(_rng(name, seed).standard_normal(shape), jnp.float32)


def _example(name: str, seed: int = 0):
    """An input for the required parameter `name`; `seed` gives a different one."""
    rng = _rng(name, seed)
    if name in ("student_logits", "teacher_logits", "logits"):
        return _normal(name, seed, (B, C))
    if name == "labels":
        return jnp.asarray(rng.integers(0, C, B), jnp.int32)
    if name in ("student_feature", "teacher_feature", "student_mean"):
        return _normal(name, seed, MAP)
    if name in ("log_scale", "margin", "bn_scale", "bn_bias"):  # one value per channel
        return _normal(name, seed, MAP[-1:])
    if name in ("student_factor", "teacher_factor"):  # factor transfer's factors
        return _normal(name, seed, MAP)
    if name == "temperature_logit":  # CTKD's learned scalar
        return _normal(name, seed, ())
    if name == "x":  # gradient_reversal's input
        return _normal(name, seed, (B, C))
    if name == "epoch":  # CTKD's curriculum
        return jnp.asarray(rng.uniform(0.0, 12.0), jnp.float32)
    if name in ("student_features", "teacher_features"):  # ReviewKD's stages
        return [_normal(name, seed, MAP), _normal(name, seed + 10, (B, 2, 2, 5))]
    if name in ("student_embedding", "teacher_embedding", "embedding"):
        return _normal(name, seed, (B, 8))
    if name in ("student_memory", "teacher_memory", "memory"):
        m = _normal(name, seed, (N, 8))
        return m / jnp.linalg.norm(m, axis=1, keepdims=True)
    if name == "sample_idx":
        return jnp.asarray(rng.integers(0, N, (B, K + 1)), jnp.int32)
    if name == "indices":
        return jnp.asarray(rng.permutation(N)[:B], jnp.int32)
    if name == "key":
        return jax.random.PRNGKey(seed)
    if name == "temperature":
        return 2.0
    if name == "num_examples":
        return N
    pytest.fail(f"no example input for the parameter {name!r}; add one to `_example`")


def _arguments(fn, seed: int = 0, defaults: bool = True) -> dict:
    """Every parameter of `fn` by name: examples for the required ones, then (if
    `defaults`) the optional ones at their defaults."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), (fn, p)
        if p.default is p.empty:
            out[p.name] = _example(p.name, seed)
        elif defaults:
            out[p.name] = p.default
    return out


def _positional(fn, kwargs: dict) -> tuple[list, dict]:
    """`kwargs` as a call passes them today: positionally up to the ``*``, then by keyword."""
    params = inspect.signature(fn).parameters
    args = [v for k, v in kwargs.items() if params[k].kind is params[k].POSITIONAL_OR_KEYWORD]
    rest = {k: v for k, v in kwargs.items() if params[k].kind is params[k].KEYWORD_ONLY}
    return args, rest


def _split(kwargs: dict) -> tuple[dict, dict]:
    """(arrays, hyperparameters): the arguments a transform traces, and those it closes over."""
    is_array = lambda v: isinstance(v, (jax.Array, list))  # noqa: E731
    return ({k: v for k, v in kwargs.items() if is_array(v)},
            {k: v for k, v in kwargs.items() if not is_array(v)})


@functools.cache
def _jitted(name: str, static: tuple[str, ...]):
    """The public loss itself under ``jax.jit``, hyperparameters static by name (which needs
    the signature kept by ``functools.wraps``); cached so tests share its compilations."""
    return jax.jit(getattr(losses, name), static_argnames=static)


def _by_keyword_jitted(name: str, seed: int = 0):
    arrays, hyper = _split(_arguments(getattr(losses, name), seed))
    return _jitted(name, tuple(hyper))(**arrays, **hyper)


def _assert_trees_close(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree))


def _sum(tree) -> jax.Array:
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def test_missing_example_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match="no example input for the parameter 'foo'"):
        _example("foo")


@pytest.mark.parametrize("name", PUBLIC)
def test_every_argument_by_keyword_under_jit_gives_the_positional_result(name):
    # Eager calls run the same Python (checked below for two losses); jit keeps this fast.
    fn = getattr(losses, name)
    by_keyword = _by_keyword_jitted(name)
    args, rest = _positional(fn, _arguments(fn, defaults=False))  # defaults left implicit
    positional = _jitted(name, tuple(rest))(*args, **rest)
    _assert_trees_close(by_keyword, positional)
    assert _all_finite(by_keyword)


@pytest.mark.parametrize("name", [n for n in PUBLIC if n != "crd_sample_negatives"])
def test_grad_wrt_the_student_by_keyword(name):
    # crd_sample_negatives is left out: its first argument is a PRNG key.
    fn = getattr(losses, name)
    kwargs = _arguments(fn)
    student = next(iter(kwargs))

    def by_keyword(x):
        return _sum(fn(**{**kwargs, student: x}))

    def positional(x):
        args, rest = _positional(fn, {**kwargs, student: x})
        return _sum(fn(*args, **rest))

    # One jit for both, as a training step runs it; eager grads dispatch op by op (slow).
    grads = jax.jit(lambda x: (jax.grad(by_keyword)(x), jax.grad(positional)(x)))
    grad_kw, grad_pos = grads(kwargs[student])
    _assert_trees_close(grad_kw, grad_pos)
    assert _all_finite(grad_kw)


@pytest.mark.parametrize("name", PUBLIC)
def test_vmap_over_keyword_arrays_matches_each_call(name):
    fn = getattr(losses, name)
    (arrays0, hyper), (arrays1, _) = (_split(_arguments(fn, seed)) for seed in (0, 1))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), arrays0, arrays1)
    out = jax.jit(jax.vmap(functools.partial(fn, **hyper)))(**stacked)
    for i in (0, 1):
        _assert_trees_close(jax.tree_util.tree_map(lambda x: x[i], out),
                            _by_keyword_jitted(name, seed=i))


def test_distillation_loss_all_by_keyword_is_hinton_kd():
    s, t = _normal("s", 0, (B, C)), _normal("t", 0, (B, C))
    y = jnp.array([0, 3, 9, 4])
    out = kd_jax.distillation_loss(student_logits=s, teacher_logits=t, labels=y,
                                   temperature=4.0, alpha=0.9)

    def log_softmax(z):
        z = np.asarray(z, np.float64)
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(B), np.asarray(y)]
    log_ps, log_pt = log_softmax(s / 4.0), log_softmax(t / 4.0)
    kl = 16.0 * np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)
    np.testing.assert_allclose(np.asarray(out), 0.1 * ce + 0.9 * kl, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        kd_jax.distillation_loss(s, t, y, temperature=4.0, alpha=0.9)))


def test_non_finite_teacher_by_keyword_gives_nan_for_its_example():
    s, t = _normal("s", 0, (B, C)), _normal("t", 0, (B, C))
    out = kd_jax.soft_target_kl(teacher_logits=t.at[2, 0].set(jnp.nan), student_logits=s,
                                temperature=2.0)
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(np.asarray(out), 2)))


def test_a_call_that_does_not_fit_the_signature_still_raises_type_error():
    s = t = jnp.zeros((B, C))
    with pytest.raises(TypeError, match="labels"):
        kd_jax.distillation_loss(student_logits=s, teacher_logits=t)
    with pytest.raises(TypeError, match="student_logits"):
        kd_jax.soft_target_kl(t, student_logits=s, temperature=2.0)
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        kd_jax.soft_target_kl(s, t, 2.0)
