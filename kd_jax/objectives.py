"""Distillation objectives as weighted terms, with the trainable parts and state they need.

An :class:`Objective` is a tuple of :class:`Term` s: each names a *registered* term (a loss
with its keyword arguments), a weight and an optional linear warm-up. The registry maps a
name to the function that evaluates it and says what it uses: the teacher, the features,
the examples' positions in the training set, trainable *heads* (regressors, embeddings,
fusion modules) and non-trainable *state* (memory banks). :func:`prepare_student` wraps a
backbone with the heads its objective needs (they train, checkpoint and resume with it and
are left out of its predictions and exported weights), :func:`init_state` builds the
state, and :func:`evaluate_objective` returns the loss, each term's part of it and the new
state. Adding a method is one loss in :mod:`kd_jax.losses`, one :func:`register_term` and
one test; see the README's "Add a method".

:data:`METHODS`, the experiment's ``--method`` presets, follow the CRD benchmark
(Tian et al. 2020, RepDistiller ``scripts/run_cifar_distill.sh``), mdistiller's CIFAR
configs (DKD, ReviewKD) and each paper's CIFAR setting; every one adds its term to the
cross-entropy with the labels:

============  ==================================================================
``none``      CE (the baseline student)
``kd``        0.1·CE + 0.9·T²·KL, T=4 (Hinton et al. 2015)
``dkd``       CE + min(epoch/20, 1)·(α·TCKD + β·NCKD), α=1, β=8, T=4 (Zhao et al. 2022)
``dist``      CE + DIST(β=1, γ=1, T=4) (Huang et al. 2022)
``lskd``      0.1·CE + 9·KD on standardised logits, T=2 (Sun et al. 2024)
``fitnet``    CE + 100·hint at ``stage2`` through ConvReg (Romero et al. 2015)
``at``        CE + 1000·Σ_stages AT, p=2 (Zagoruyko & Komodakis 2017)
``nst``       CE + 50·Σ_stages NST (Huang & Wang 2017)
``sp``        CE + 3000·SP on the pooled embedding (Tung & Mori 2019)
``rkd``       CE + RKD (distance 25, angle 50) on the pooled embedding (Park et al. 2019)
``pkt``       CE + 30000·PKT on the pooled embedding (Passalis & Tefas 2018)
``vid``       CE + Σ_stages VID, regressors and per-channel variances (Ahn et al. 2019)
``cc``        CE + 100·CC, RBF kernel (γ=0.4, order 2) on the pooled embedding (Peng et al. 2019)
``crd``       CE + 0.8·CRD, 128-d heads, 16,384 negatives, T=0.07 (Tian et al. 2020)
``reviewkd``  CE + min(epoch/20, 1)·HCL through ABF fusion (Chen et al. 2021)
============  ==================================================================

Feature convention: RepDistiller's weights are calibrated on stage maps taken after the
stage's final ReLU (``preact=False``); ``Objective(features="post_relu")`` (the default,
used by every preset) does that, ``"pre_relu"`` passes the models' ``stageN`` outputs as
they are. ``stem`` and ``pooled`` are post-ReLU in both.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses

__all__ = ["METHODS", "Objective", "Term", "TermInputs", "TermSpec", "backbone_variables",
           "cross_entropy",
           "evaluate_objective", "from_method", "init_state", "objective_loss",
           "prepare_student", "register_method", "register_term", "registered_terms"]

FEATURE_CONVENTIONS = ("post_relu", "pre_relu")


# ----------------------------------------------------------------------------- terms

def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# Arguments that must be > 0, and in [0, 1], whichever term has them; every numeric argument
# must be a finite number of its default's kind, every other one of its default's type.
_POSITIVE = frozenset({"temperature", "gamma", "eps", "init_var", "dim", "num_negatives", "p",
                       "max_mid_channels"})
_UNIT = frozenset({"momentum"})


def _check_argument(term: str, key: str, value, default) -> None:
    where = f"term {term!r}: {key}"
    if isinstance(default, bool) or not isinstance(default, int | float):
        if not isinstance(value, type(default)):
            raise ValueError(f"{where} must be a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    if isinstance(default, int) and not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}.")
    if key in _POSITIVE and value <= 0:
        raise ValueError(f"{where} must be > 0, got {value}.")
    if key in _UNIT and not 0 <= value <= 1:
        raise ValueError(f"{where} must be in [0, 1], got {value}.")
    if value < 0:
        raise ValueError(f"{where} must be >= 0, got {value}.")


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted part of an objective: ``weight · warm(epoch) · name(**kwargs)``.

    ``name`` is a registered term (:func:`registered_terms`); ``kwargs`` its keyword
    arguments as ``((key, value), ...)`` (unset ones take the registration's defaults);
    ``warmup_epochs > 0`` ramps the weight linearly from 0 over that many epochs, counted
    continuously from the step (DKD's and ReviewKD's warm-up). Build one with
    ``Term.of("kd", 0.9, temperature=4.0)``.
    """

    name: str
    weight: float = 1.0
    kwargs: tuple[tuple[str, Any], ...] = ()
    warmup_epochs: float = 0.0

    @classmethod
    def of(cls, name: str, weight: float = 1.0, *, warmup_epochs: float = 0.0,
           **kwargs) -> Term:
        return cls(name, float(weight), _hashable(kwargs), float(warmup_epochs))

    def __post_init__(self):
        spec = _REGISTRY.get(self.name)
        if spec is None:
            raise ValueError(f"unknown term {self.name!r}; registered terms: "
                             f"{', '.join(sorted(_REGISTRY))}.")
        kwargs = dict(self.kwargs)
        unknown = sorted(set(kwargs) - set(spec.defaults))
        if unknown:
            raise ValueError(f"term {self.name!r} has no argument {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(spec.defaults)) or 'none'} (and weight, "
                             "warmup_epochs).")
        for k, v in kwargs.items():  # 5 for a float argument is 5.0: one spelling, one hash
            if isinstance(spec.defaults[k], float) and isinstance(v, int) and \
                    not isinstance(v, bool):
                kwargs[k] = float(v)
            _check_argument(self.name, k, kwargs[k], spec.defaults[k])
        object.__setattr__(self, "kwargs", tuple(sorted(_hashable(kwargs))))
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "warmup_epochs", float(self.warmup_epochs))
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"term {self.name!r}: weight must be finite and >= 0, got "
                             f"{self.weight}.")
        if not math.isfinite(self.warmup_epochs) or self.warmup_epochs < 0:
            raise ValueError(f"term {self.name!r}: warmup_epochs must be finite and >= 0, got "
                             f"{self.warmup_epochs}.")

    @property
    def spec(self) -> TermSpec:
        return _REGISTRY[self.name]

    @property
    def arguments(self) -> dict[str, Any]:
        """The term's keyword arguments: the registration's defaults, then ``kwargs``."""
        return {**self.spec.defaults, **dict(self.kwargs)}

    def replace(self, **changes) -> Term:
        """A copy with ``weight``/``warmup_epochs`` and keyword arguments changed."""
        weight = changes.pop("weight", self.weight)
        warmup = changes.pop("warmup_epochs", self.warmup_epochs)
        return Term(self.name, float(weight), tuple({**dict(self.kwargs), **changes}.items()),
                    float(warmup))


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a student minimises: the sum of its terms (each name at most once).

    ``features`` picks the stage-map convention of the feature terms, see the module
    docstring.
    """

    terms: tuple[Term, ...] = dataclasses.field(default_factory=lambda: (Term("ce"),))
    features: str = "post_relu"

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        if self.features not in FEATURE_CONVENTIONS:
            raise ValueError(f"features must be one of {FEATURE_CONVENTIONS}, got "
                             f"{self.features!r}.")
        if not self.terms:
            raise ValueError("an objective needs at least one term.")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"each term may appear once in an objective, got {names}.")

    def _uses(self, what: str) -> bool:
        return any(what in t.spec.uses for t in self.terms if t.weight > 0)

    @property
    def needs_teacher(self) -> bool:
        return self._uses("teacher")

    @property
    def needs_features(self) -> bool:
        return self._uses("features") or self.has_heads

    @property
    def needs_index(self) -> bool:
        """Whether the batch must carry ``"index"``, the examples' training-set positions."""
        return self._uses("index")

    @property
    def has_heads(self) -> bool:
        return any(t.spec.head is not None for t in self.terms)

    @property
    def has_state(self) -> bool:
        return any(t.spec.state is not None for t in self.terms)

    def as_dict(self) -> dict[str, Any]:
        """A JSON record: the convention and each term with every argument in effect."""
        return {"features": self.features,
                "terms": [{"name": t.name, "weight": t.weight, "warmup_epochs": t.warmup_epochs,
                           **t.arguments} for t in self.terms]}

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"the objective has no term {name!r}; it has "
                       f"{', '.join(t.name for t in self.terms)}.")

    def replace_term(self, name: str, **changes) -> Objective:
        """A copy with term ``name``'s weight, warm-up or keyword arguments changed."""
        self.term(name)
        return dataclasses.replace(self, terms=tuple(
            t.replace(**changes) if t.name == name else t for t in self.terms))

    def override(self, *assignments: str) -> Objective:
        """Applies ``"term.key=value"`` strings, e.g. ``"kd.temperature=5"``,
        ``"ce.weight=0.2"``, ``"dkd.warmup_epochs=1"``; values are Python literals."""
        objective = self
        for assignment in assignments:
            name, key, value = parse_override(assignment)
            objective = objective.replace_term(name, **{key: value})
        return objective


def parse_override(assignment: str) -> tuple[str, str, Any]:
    """``"term.key=value"`` as ``(term, key, value)``; ``value`` a Python literal or string."""
    target, sep, text = assignment.partition("=")
    name, dot, key = target.strip().partition(".")
    if not sep or not dot or not name or not key:
        raise ValueError(f"a term override is TERM.KEY=VALUE (e.g. kd.temperature=5), got "
                         f"{assignment!r}.")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = text.strip()
    return name, key.strip(), value


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a term's function sees (one student, one batch).

    ``student_features``/``teacher_features`` follow the objective's convention;
    ``raw_*`` are the models' outputs as they are. ``head`` is the output of the term's
    own head (a dict), ``state`` its state, ``index`` the examples' positions in the
    training set, ``key`` a PRNG key of this step (for sampling), ``epoch`` the (float)
    epoch count that warm-ups use.
    """

    student_logits: jax.Array
    labels: jax.Array
    epoch: jax.Array | float
    teacher_logits: jax.Array | None = None
    student_features: Mapping[str, jax.Array] | None = None
    teacher_features: Mapping[str, jax.Array] | None = None
    raw_student_features: Mapping[str, jax.Array] | None = None
    raw_teacher_features: Mapping[str, jax.Array] | None = None
    head: Mapping[str, jax.Array] | None = None
    state: Any = None
    index: jax.Array | None = None
    key: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A registered term.

    ``fn(inputs: TermInputs, **kwargs) -> scalar`` (the batch mean); ``uses`` a subset of
    ``{"teacher", "features", "index"}``; ``defaults`` every keyword argument with its
    default. Optional: ``head(**kwargs) -> flax Module`` whose ``__call__(student_features,
    teacher_features, train)`` returns a dict (its parameters train with the student);
    ``state(*, num_examples, train_labels, key, **kwargs) -> pytree``, the non-trainable
    state: a term with state returns ``(value, new_state)`` from ``fn`` (``inputs.state``
    is the old one; no gradient flows into it).
    """

    name: str
    fn: Callable[..., jax.Array]
    uses: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    head: Callable[..., nn.Module] | None = None
    state: Callable[..., Any] | None = None


_REGISTRY: dict[str, TermSpec] = {}
_USES = frozenset({"teacher", "features", "index"})


def register_term(name: str, fn: Callable | None = None, *, uses: Sequence[str] = ("teacher",),
                  defaults: Mapping[str, Any] | None = None, head: Callable | None = None,
                  state: Callable | None = None, replace: bool = False):
    """Registers term ``name`` (usable as a decorator on ``fn``). See :class:`TermSpec`."""
    unknown = set(uses) - _USES
    if unknown:
        raise ValueError(f"uses must be a subset of {sorted(_USES)}, got {sorted(unknown)}.")

    def register(fn):
        if name in _REGISTRY and not replace:
            raise ValueError(f"term {name!r} is already registered; pass replace=True.")
        _REGISTRY[name] = TermSpec(name, fn, frozenset(uses), dict(defaults or {}), head,
                                   state)
        return fn

    return register if fn is None else register(fn)


def registered_terms() -> dict[str, TermSpec]:
    """Every registered term by name."""
    return dict(_REGISTRY)


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


# ------------------------------------------------------------------ feature helpers

def _post_relu(features):
    """Stage maps after their final ReLU (exact for the post-activation ResNet families,
    whose ``stageN`` is the last block's sum before that ReLU)."""
    return {k: nn.relu(v) if k.startswith("stage") else v for k, v in features.items()}


def _stage_keys(student_features, teacher_features):
    return [k for k in sorted(student_features)
            if k.startswith("stage") and k in teacher_features]


def _pool_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Average-pools an NHWC map to ``size`` (PyTorch's adaptive bins)."""
    if x.shape[1:3] == tuple(size):
        return x
    rows = jnp.asarray(losses._adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
    cols = jnp.asarray(losses._adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x)


def _nearest(x: jax.Array, size: int) -> jax.Array:
    """PyTorch's ``F.interpolate(mode="nearest")`` of an NHWC map to ``size × size``:
    output row ``i`` reads input row ``floor(i · H / size)``."""
    rows = (np.arange(size) * x.shape[1]) // size
    cols = (np.arange(size) * x.shape[2]) // size
    return x[:, rows][:, :, cols]


# PyTorch's default Conv2d/Linear initialisation (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); RepDistiller's heads keep it.
_torch_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# kaiming_uniform_(a=1): U(-sqrt(3/fan_in), sqrt(3/fan_in)), ReviewKD's ABF convolutions.
_kaiming_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


# ------------------------------------------------------------------ heads

class ConvReg(nn.Module):
    """FitNets regressor, RepDistiller's ``ConvReg`` for maps of equal size: a 1×1
    convolution (with bias) from the student's ``stage`` map to the teacher's channels,
    BatchNorm, ReLU. The BatchNorm and ReLU bound its output to the scale of the post-ReLU
    teacher map; without them a weight of 100 drove a linear regressor to a non-finite loss
    within a few steps at lr 0.1."""

    stage: str

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        target = teacher_features[self.stage]
        source = student_features[self.stage].astype(jnp.float32)
        if source.shape[1:3] != target.shape[1:3]:
            raise ValueError(f"FitNets hint at {self.stage!r}: the teacher's map is "
                             f"{target.shape[1:3]} and the student's {source.shape[1:3]}; pick "
                             "a stage where the spatial sizes agree (fitnet.stage=...).")
        hint = nn.Conv(target.shape[-1], (1, 1), name="conv")(source)
        return {"hint": nn.relu(_batch_norm(train, "bn")(hint))}


class EmbedPair(nn.Module):
    """RepDistiller's ``Embed`` on both sides: a linear map of the pooled features to ``dim``,
    then L2 normalisation; one for the student, one for the teacher (both trained)."""

    dim: int = 128

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        def embed(x, name):
            x = x.reshape(x.shape[0], -1).astype(jnp.float32)
            y = nn.Dense(self.dim, kernel_init=_torch_default, name=name)(x)
            return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)

        return {"student": embed(student_features["pooled"], "embed_student"),
                "teacher": embed(jax.lax.stop_gradient(teacher_features["pooled"]),
                                 "embed_teacher")}


class VIDRegressors(nn.Module):
    """VID's regressor per stage (RepDistiller's ``VIDLoss``): 1×1 conv → ReLU → 1×1 conv →
    ReLU → 1×1 conv to the teacher's channels (no biases, PyTorch's default initialisation),
    and one unconstrained variance parameter per teacher channel, initialised so that
    ``softplus(alpha) + eps`` is ``init_var``. A larger student map is average-pooled to the
    teacher's size before the regressor (a larger teacher map is pooled in the loss)."""

    init_var: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        out = {}
        alpha0 = math.log(math.expm1(self.init_var - self.eps))
        for k in _stage_keys(student_features, teacher_features):
            s, t = student_features[k].astype(jnp.float32), teacher_features[k]
            if s.shape[1] > t.shape[1]:
                s = _pool_to(s, t.shape[1:3])
            c = t.shape[-1]
            conv = lambda n, name: nn.Conv(n, (1, 1), use_bias=False,  # noqa: E731
                                           kernel_init=_torch_default, name=name)
            mean = conv(c, f"{k}_conv3")(nn.relu(conv(c, f"{k}_conv2")(
                nn.relu(conv(c, f"{k}_conv1")(s)))))
            out[k] = mean
            out[f"{k}_log_scale"] = self.param(f"{k}_log_scale",
                                               nn.initializers.constant(alpha0), (c,))
        return out


class ABF(nn.Module):
    """ReviewKD's attention-based fusion block (mdistiller's ``ABF``, NHWC)."""

    mid: int
    out: int
    fuse: bool

    @nn.compact
    def __call__(self, x, residual, shape: int, out_shape: int, train: bool):
        x = nn.Conv(self.mid, (1, 1), use_bias=False, kernel_init=_kaiming_a1, name="conv1")(x)
        x = _batch_norm(train, "bn1")(x)
        if self.fuse:
            residual = _nearest(residual, shape)
            z = nn.sigmoid(nn.Conv(2, (1, 1), kernel_init=_torch_default, name="att_conv")(
                jnp.concatenate([x, residual], axis=-1)))
            x = x * z[..., 0:1] + residual * z[..., 1:2]
        if x.shape[1] != out_shape:
            x = _nearest(x, out_shape)
        y = nn.Conv(self.out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=_kaiming_a1, name="conv2")(x)
        return _batch_norm(train, "bn2")(y), x


class ReviewFusion(nn.Module):
    """ReviewKD's review path: the student's stage maps and pooled vector, deepest first,
    each fused with the deeper level's residual by an :class:`ABF` and mapped to the
    teacher's channels and size. Returns the fused maps shallow to deep (``"maps"``)."""

    max_mid_channels: int = 512

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        keys = _stage_keys(student_features, teacher_features)
        xs = [student_features[k].astype(jnp.float32) for k in keys]
        xs.append(student_features["pooled"].reshape(xs[0].shape[0], 1, 1, -1)
                  .astype(jnp.float32))
        targets = [teacher_features[k] for k in keys]
        targets.append(teacher_features["pooled"].reshape(xs[0].shape[0], 1, 1, -1))
        mid = min(self.max_mid_channels, xs[-1].shape[-1])
        maps, residual = [], None
        for level, (x, t) in enumerate(zip(xs[::-1], targets[::-1])):
            out, residual = ABF(mid, t.shape[-1], fuse=level > 0, name=f"abf{level}")(
                x, residual, x.shape[1], t.shape[1], train)
            maps.insert(0, out)
        return {"maps": tuple(maps)}


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
    idx = losses.crd_sample_negatives(
        x.key, x.index, num_examples=n, num_negatives=st["negatives"].shape[0],
        dataset_labels=st["labels"] if sampler == "class_exclusive" else None)
    s, t = x.head["student"], x.head["teacher"]
    # RepDistiller fixes each partition function at its first batch's estimate (0: not yet).
    estimate = jnp.stack(losses.crd_normalizers(s, t, st["memory_student"],
                                                st["memory_teacher"], idx,
                                                temperature=temperature))
    z = jnp.where(st["z"] > 0, st["z"], estimate)
    loss = losses.crd_nce_loss(s, t, st["memory_student"], st["memory_teacher"], idx,
                               temperature=temperature, normalizers=(z[0], z[1])).mean()
    # After the loss, the memories take the batch's embeddings (momentum, renormalised).
    s, t = jax.lax.stop_gradient(s), jax.lax.stop_gradient(t)
    new = {**st, "z": jax.lax.stop_gradient(z),
           "memory_student": losses.crd_memory_update(st["memory_student"], s, x.index,
                                                      momentum=momentum),
           "memory_teacher": losses.crd_memory_update(st["memory_teacher"], t, x.index,
                                                      momentum=momentum)}
    return loss, new


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
            # The number of negatives per anchor, carried as a shape: a static size.
            "negatives": jnp.zeros((k,), jnp.uint8)}


register_term("ce", _ce, uses=())
register_term("kd", _kd, defaults={"temperature": 4.0})
register_term("dkd", _dkd, defaults={"alpha": 1.0, "beta": 8.0, "temperature": 4.0})
register_term("dist", _dist, defaults={"beta": 1.0, "gamma": 1.0, "temperature": 4.0})
register_term("lskd", _lskd, defaults={"temperature": 2.0})
register_term("fitnet", _fitnet, uses=("teacher", "features"), defaults={"stage": "stage2"},
              head=lambda *, stage: ConvReg(stage))
register_term("at", _at, uses=("teacher", "features"), defaults={"p": 2.0})
register_term("nst", _nst, uses=("teacher", "features"))
register_term("sp", _sp, uses=("teacher", "features"))
register_term("rkd", _rkd, uses=("teacher", "features"),
              defaults={"distance_weight": 25.0, "angle_weight": 50.0})
register_term("pkt", _pkt, uses=("teacher", "features"))
register_term("vid", _vid, uses=("teacher", "features"),
              defaults={"init_var": 5.0, "eps": 1e-5},
              head=lambda *, init_var, eps: VIDRegressors(init_var, eps))
register_term("cc", _cc, uses=("teacher", "features"), defaults={"gamma": 0.4, "order": 2})
register_term("crd", _crd, uses=("teacher", "features", "index"),
              defaults={"dim": 128, "num_negatives": 16384, "temperature": 0.07,
                        "momentum": 0.5, "sampler": "class_exclusive"},
              head=lambda *, dim, **_: EmbedPair(dim), state=_crd_state)
register_term("reviewkd", _reviewkd, uses=("teacher", "features"),
              defaults={"max_mid_channels": 512},
              head=lambda *, max_mid_channels: ReviewFusion(max_mid_channels))


# ------------------------------------------------------------------ presets

def _preset(*terms: Term) -> Objective:
    return Objective(terms=terms)


T = Term.of
METHODS: dict[str, Objective] = {
    "none": _preset(T("ce")),
    "kd": _preset(T("ce", 0.1), T("kd", 0.9, temperature=4.0)),
    "dkd": _preset(T("ce"), T("dkd", warmup_epochs=20.0, alpha=1.0, beta=8.0, temperature=4.0)),
    "dist": _preset(T("ce"), T("dist", beta=1.0, gamma=1.0, temperature=4.0)),
    "lskd": _preset(T("ce", 0.1), T("lskd", 9.0, temperature=2.0)),
    "fitnet": _preset(T("ce"), T("fitnet", 100.0)),
    "at": _preset(T("ce"), T("at", 1000.0)),
    "nst": _preset(T("ce"), T("nst", 50.0)),
    "sp": _preset(T("ce"), T("sp", 3000.0)),
    "rkd": _preset(T("ce"), T("rkd", 1.0)),
    "pkt": _preset(T("ce"), T("pkt", 30000.0)),
    "vid": _preset(T("ce"), T("vid", 1.0)),
    "cc": _preset(T("ce"), T("cc", 100.0)),
    "crd": _preset(T("ce"), T("crd", 0.8)),
    "reviewkd": _preset(T("ce"), T("reviewkd", 1.0, warmup_epochs=20.0)),
}
del T


def register_method(name: str, objective: Objective, *, replace: bool = False) -> None:
    """Adds ``objective`` to :data:`METHODS` as ``name`` (the experiment's ``--method``)."""
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} exists; pass replace=True.")
    METHODS[name] = objective


def from_method(method: str, *overrides: str) -> Objective:
    """The preset ``method`` of :data:`METHODS` with ``"term.key=value"`` overrides."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    return METHODS[method].override(*overrides)


# ------------------------------------------------------------------ the student with heads

class Student(nn.Module):
    """A backbone plus the heads of its objective's terms (parameters ``backbone`` and
    ``head_<term>``).

    ``model(x, train)`` is the backbone's prediction alone (evaluation and export use
    it); ``model(x, train, return_features=True, teacher_features=...)`` returns
    ``(logits, features, heads)``, ``heads[term]`` the term's head output. At
    initialisation (no teacher features) zeros of ``teacher_shapes`` stand in.
    """

    backbone: nn.Module
    objective: Objective
    teacher_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False,
                 teacher_features=None):
        if not return_features:
            return self.backbone(x, train=train)
        logits, features = self.backbone(x, train=train, return_features=True)
        if teacher_features is None:
            teacher_features = {k: jnp.zeros((x.shape[0], *shape[1:]), jnp.float32)
                                for k, shape in self.teacher_shapes}
        s, t = dict(features), dict(teacher_features)
        if self.objective.features == "post_relu":
            s, t = _post_relu(s), _post_relu(t)
        heads = {}
        for term in self.objective.terms:
            if term.spec.head is not None:
                module = term.spec.head(**term.arguments).clone(parent=self, name=f"head_{term.name}")
                heads[term.name] = module(s, t, train=train)
        return logits, features, heads


def _feature_shapes(model: nn.Module, image_shape) -> dict[str, tuple[int, ...]]:
    x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    _, features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False,
                                         return_features=True)[0], x)
    return {k: tuple(v.shape) for k, v in features.items()}


def prepare_student(student: nn.Module, objective: Objective, teacher: nn.Module,
                    image_shape=(32, 32, 3)) -> nn.Module:
    """``student`` wrapped as a :class:`Student` with the heads ``objective`` trains, or
    ``student`` itself when it needs none."""
    if not objective.has_heads:
        return student
    shapes = _feature_shapes(teacher, image_shape)
    s_shapes = _feature_shapes(student, image_shape)
    for term in objective.terms:
        stage = term.arguments.get("stage")
        if term.name == "fitnet" and (stage not in shapes or stage not in s_shapes):
            raise ValueError(f"fitnet.stage {stage!r} is not a feature of both models; the "
                             f"teacher has {sorted(shapes)}, the student {sorted(s_shapes)}.")
        if term.name == "fitnet" and shapes[stage][1:3] != s_shapes[stage][1:3]:
            raise ValueError(f"FitNets hint at {stage!r}: the teacher's map is "
                             f"{shapes[stage][1:3]} and the student's {s_shapes[stage][1:3]}; "
                             "pick a stage where the spatial sizes agree (fitnet.stage=...).")
    return Student(student, objective, tuple(sorted(shapes.items())))


def backbone_variables(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of ``model``'s backbone alone: for a :class:`Student` the heads are
    dropped (what the student predicts with, and what to export); others are returned as
    they are."""
    if not isinstance(model, Student):
        return dict(variables)
    return {collection: tree["backbone"] for collection, tree in variables.items()
            if isinstance(tree, Mapping) and "backbone" in tree}


def init_state(objective: Objective, *, num_examples: int | None = None,
               train_labels=None, seed: int = 0) -> dict[str, Any] | None:
    """The non-trainable state of ``objective``'s terms (``{term: pytree}``), or ``None``."""
    if not objective.has_state:
        return None
    state = {}
    for i, term in enumerate(objective.terms):
        if term.spec.state is not None:
            state[term.name] = term.spec.state(
                num_examples=num_examples, train_labels=train_labels,
                key=jax.random.fold_in(jax.random.PRNGKey(seed), i), **term.arguments)
    return state


# ------------------------------------------------------------------ evaluation

def evaluate_objective(objective: Objective, *, student_logits, labels, epoch,
                       teacher_logits=None, student_features=None, teacher_features=None,
                       heads=None, state=None, index=None, key=None
                       ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """``(loss, parts, new_state)``: the batch-mean loss, each term's weighted part of it
    (``parts[name]``, after the warm-up; they sum to ``loss``) and the updated state."""
    raw_s, raw_t = student_features, teacher_features
    if objective.needs_features and objective.features == "post_relu":
        student_features = _post_relu(student_features)
        teacher_features = _post_relu(teacher_features)
    if objective.needs_index and index is None:
        raise ValueError("this objective (CRD) needs the batch's 'index' (each example's "
                         "position in the training set); TrainLoader batches carry it.")
    heads, state = heads or {}, state or {}
    total, parts, new_state = 0.0, {}, dict(state)
    for term in objective.terms:
        if term.weight == 0:
            continue
        inputs = TermInputs(student_logits=student_logits, labels=labels, epoch=epoch,
                            teacher_logits=teacher_logits, student_features=student_features,
                            teacher_features=teacher_features, raw_student_features=raw_s,
                            raw_teacher_features=raw_t, head=heads.get(term.name),
                            state=state.get(term.name), index=index, key=key)
        value = term.spec.fn(inputs, **term.arguments)
        if term.spec.state is not None:
            value, new_state[term.name] = value
        weight = term.weight
        if term.warmup_epochs > 0:
            weight = weight * jnp.minimum(epoch / term.warmup_epochs, 1.0)
        part = weight * jnp.asarray(value, jnp.float32)
        parts[term.name] = part
        total = total + part
    return total, parts, (new_state or None)


def objective_loss(objective: Objective, *, student_logits, student_features,
                   teacher_logits, teacher_features, labels, epoch, **extra) -> jax.Array:
    """The batch-mean loss of ``objective`` (see :func:`evaluate_objective`)."""
    loss, _, _ = evaluate_objective(objective, student_logits=student_logits, labels=labels,
                                    epoch=epoch, teacher_logits=teacher_logits,
                                    student_features=student_features,
                                    teacher_features=teacher_features, **extra)
    return loss
