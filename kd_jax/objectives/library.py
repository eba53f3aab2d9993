"""The library's terms: each method's loss from :mod:`kd_jax.losses` on a step's inputs,
registered with its defaults, its arguments' constraints, its head and its state.

Adding a method is one loss in :mod:`kd_jax.losses`, one :func:`~kd_jax.objectives.register_term`
and one test; see the README's "Add a method".
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses
from kd_jax.objectives.heads import (ConvReg, EmbedPair, ReviewFusion, VIDRegressors, _pool_to,
                                     _stage_keys)
from kd_jax.objectives.terms import TermInputs, register_term


# ------------------------------------------------------------------ cross-entropy

def cross_entropy(logits, labels) -> jax.Array:
    """Per-example cross-entropy with integer ``labels``, float32; NaN where a label is outside
    ``[0, C)``.

    The library's one behaviour for out-of-range labels (as :func:`kd_jax.losses.
    distillation_loss`): the example's loss is NaN, so a training run stops at once on its
    non-finite-loss check instead of learning from a silently wrapped class (optax's
    cross-entropy alone would treat -1 as class C-1).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    return jnp.where(valid, ce, jnp.nan)


# ------------------------------------------------------------------ the registered terms

def _ce(x: TermInputs) -> jax.Array:
    return cross_entropy(x.student_logits, x.labels).mean()


def _kd(x: TermInputs, *, temperature):
    return losses.soft_target_kl(x.student_logits, x.teacher_logits,
                                 temperature=temperature).mean()


def _dkd(x: TermInputs, *, alpha, beta, temperature):
    return losses.dkd_loss(x.student_logits, x.teacher_logits, x.labels, alpha=alpha,
                           beta=beta, temperature=temperature).mean()


def _dist(x: TermInputs, *, beta, gamma, temperature):
    return losses.dist_loss(x.student_logits, x.teacher_logits, beta=beta, gamma=gamma,
                            temperature=temperature)


def _lskd(x: TermInputs, *, temperature):
    return losses.lskd_loss(x.student_logits, x.teacher_logits,
                            temperature=temperature).mean()


def _fitnet(x: TermInputs, *, stage):
    return losses.hint_loss(x.head["hint"], x.teacher_features[stage]).mean()


def _over_stages(loss_fn, x: TermInputs):
    keys = _stage_keys(x.student_features, x.teacher_features)
    return sum(loss_fn(x.student_features[k], x.teacher_features[k]).mean() for k in keys)


def _at(x: TermInputs, *, p):
    return _over_stages(lambda s, t: losses.attention_transfer_loss(s, t, p=p), x)


def _nst(x: TermInputs):
    return _over_stages(losses.nst_loss, x)


def _sp(x: TermInputs):
    return losses.similarity_preserving_loss(x.student_features["pooled"],
                                             x.teacher_features["pooled"])


def _rkd(x: TermInputs, *, distance_weight, angle_weight):
    return losses.rkd_loss(x.student_features["pooled"], x.teacher_features["pooled"],
                           distance_weight=distance_weight, angle_weight=angle_weight)


def _pkt(x: TermInputs):
    return losses.pkt_loss(x.student_features["pooled"], x.teacher_features["pooled"])


def _vid(x: TermInputs, *, init_var, eps):
    total = 0.0
    for k in _stage_keys(x.student_features, x.teacher_features):
        mean, t = x.head[k], x.teacher_features[k]
        if t.shape[1] > mean.shape[1]:
            t = _pool_to(t, mean.shape[1:3])
        total = total + losses.vid_loss(mean, t, x.head[f"{k}_log_scale"], eps=eps).mean()
    return total


def _cc(x: TermInputs, *, gamma, order):
    # On the pooled embeddings themselves, as the Knowledge-Distillation-Zoo implementation
    # whose kernel, gamma, order and weight (100) we follow: trainable heads on both sides
    # could make the two correlation matrices equal by collapsing to one vector.
    return losses.cc_loss(x.student_features["pooled"], x.teacher_features["pooled"],
                          gamma=gamma, order=order)


def _reviewkd(x: TermInputs, *, max_mid_channels):
    # mdistiller: the student's maps after the ReLU are fused; the teacher's stage maps are
    # taken before it ("preact_feats"), plus the pooled vector as a 1x1 map.
    raw = x.raw_teacher_features
    keys = _stage_keys(x.student_features, raw)
    targets = [raw[k] for k in keys]
    targets.append(raw["pooled"].reshape(raw["pooled"].shape[0], 1, 1, -1))
    return losses.hcl_loss(list(x.head["maps"]), targets).mean()


def _crd(x: TermInputs, *, dim, num_negatives, temperature, momentum, sampler):
    st = x.state
    n = st["memory_student"].shape[0]
    exclusive = ({"dataset_labels": st["labels"], "class_order": st["class_order"]}
                 if sampler == "class_exclusive" else {})
    idx = losses.crd_sample_negatives(
        x.key, x.index, num_examples=n, num_negatives=st["negatives"].shape[0], **exclusive)
    s, t = x.head["student"], x.head["teacher"]
    # RepDistiller fixes each partition function at its first batch's estimate (0: not yet),
    # here taken from the loss's own scores.
    per_example, z = losses.crd_nce_loss_and_normalizers(
        s, t, st["memory_student"], st["memory_teacher"], idx, temperature=temperature,
        normalizers=(st["z"][0], st["z"][1]))
    z = jnp.stack(z)
    # After the loss, the memories take the batch's embeddings (momentum, renormalised). The
    # rows written depend on the loss (never true: NaN > inf is false too), so XLA orders the
    # write after every read of the banks and updates them in place; without it XLA:CPU
    # copied each bank twice per step.
    index = x.index + jnp.any(jax.lax.stop_gradient(per_example) > jnp.inf).astype(
        x.index.dtype)
    s, t = jax.lax.stop_gradient(s), jax.lax.stop_gradient(t)
    new = {**st, "z": jax.lax.stop_gradient(z),
           "memory_student": losses.crd_memory_update(st["memory_student"], s, index,
                                                      momentum=momentum),
           "memory_teacher": losses.crd_memory_update(st["memory_teacher"], t, index,
                                                      momentum=momentum)}
    return per_example.mean(), new


def _crd_state(*, num_examples, train_labels, key, dim, num_negatives, temperature, momentum,
               sampler):
    if train_labels is None or num_examples is None or len(train_labels) != num_examples:
        raise ValueError("CRD needs num_examples and the training labels (one per example) "
                         "for its memory bank and its negatives.")
    labels = np.asarray(train_labels, np.int32)
    if sampler == "class_exclusive":
        available = num_examples - int(np.bincount(labels).max())
    elif sampler == "uniform":
        available = num_examples
    else:
        raise ValueError(f"crd.sampler must be 'class_exclusive' or 'uniform', got {sampler!r}.")
    k = int(num_negatives)
    if k > available:
        warnings.warn(f"CRD: {k} negatives requested but only {available} examples are "
                      f"available per anchor in this training set of {num_examples}; using "
                      f"{available}.")
        k = available
    # RepDistiller's ContrastMemory: rows uniform in [-s, s], s = 1/sqrt(dim/3).
    bound = 1.0 / math.sqrt(dim / 3)
    ks, kt = jax.random.split(key)
    uniform = lambda k: jax.random.uniform(k, (num_examples, dim), jnp.float32,  # noqa: E731
                                           -bound, bound)
    return {"memory_student": uniform(ks), "memory_teacher": uniform(kt),
            "z": jnp.zeros((2,), jnp.float32), "labels": jnp.asarray(labels),
            # The examples sorted by class, for the class-exclusive sampler (sorted once here).
            "class_order": jnp.asarray(np.argsort(labels, kind="stable").astype(np.int32)),
            # The number of negatives per anchor, carried as a shape: a static size.
            "negatives": jnp.zeros((k,), jnp.uint8)}


# The logit terms' temperature is the one resolve(temperature=...) sets; CRD's, the
# contrastive temperature of its NCE (0.07), is not.
_LOGIT = ("temperature",)

register_term("ce", _ce, uses=())
register_term("kd", _kd, defaults={"temperature": 4.0}, checks={"temperature": "positive"},
              shorthands=_LOGIT)
register_term("dkd", _dkd, defaults={"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
              checks={"temperature": "positive"}, shorthands=_LOGIT)
register_term("dist", _dist, defaults={"beta": 1.0, "gamma": 1.0, "temperature": 4.0},
              checks={"gamma": "positive", "temperature": "positive"}, shorthands=_LOGIT)
register_term("lskd", _lskd, defaults={"temperature": 2.0}, checks={"temperature": "positive"},
              shorthands=_LOGIT)
register_term("fitnet", _fitnet, uses=("teacher", "features"), defaults={"stage": "stage2"},
              head=lambda *, stage: ConvReg(stage))
register_term("at", _at, uses=("teacher", "features"), defaults={"p": 2.0},
              checks={"p": "positive"})
register_term("nst", _nst, uses=("teacher", "features"))
register_term("sp", _sp, uses=("teacher", "features"))
register_term("rkd", _rkd, uses=("teacher", "features"),
              defaults={"distance_weight": 25.0, "angle_weight": 50.0})
register_term("pkt", _pkt, uses=("teacher", "features"))
register_term("vid", _vid, uses=("teacher", "features"),
              defaults={"init_var": 5.0, "eps": 1e-5},
              checks={"init_var": "positive", "eps": "positive"},
              head=lambda *, init_var, eps: VIDRegressors(init_var, eps))
register_term("cc", _cc, uses=("teacher", "features"), defaults={"gamma": 0.4, "order": 2},
              checks={"gamma": "positive"})
register_term("crd", _crd, uses=("teacher", "features", "index"),
              defaults={"dim": 128, "num_negatives": 16384, "temperature": 0.07,
                        "momentum": 0.5, "sampler": "class_exclusive"},
              checks={"dim": "positive", "num_negatives": "positive",
                      "temperature": "positive", "momentum": "unit"},
              head=lambda *, dim, **_: EmbedPair(dim), state=_crd_state)
register_term("reviewkd", _reviewkd, uses=("teacher", "features"),
              defaults={"max_mid_channels": 512}, checks={"max_mid_channels": "positive"},
              head=lambda *, max_mid_channels: ReviewFusion(max_mid_channels))
