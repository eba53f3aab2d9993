"""Distillation objectives as configuration: a logit term plus weighted feature terms.

An :class:`Objective` says what a student minimises; :func:`objective_loss` evaluates it on
the student's and the teacher's outputs. :data:`METHODS` holds the presets the experiment's
``--method`` names, with the CRD benchmark's weights (Tian et al. 2020, RepDistiller
``train_student.py`` and ``scripts/run_cifar_distill.sh``; DKD from mdistiller's CIFAR
configs; DIST from its paper's CIFAR setting):

========  ==========================================================================
``none``  cross-entropy with the labels (the baseline student)
``kd``    (1 − α)·CE + α·T²·KL, T=4, α=0.9 (Hinton et al. 2015)
``dkd``   CE + min(epoch/20, 1)·(α·TCKD + β·NCKD), α=1, β=8, T=4 (Zhao et al. 2022)
``dist``  CE + DIST(β=1, γ=1, T=4) (Huang et al. 2022)
``fitnet`` CE + 100·hint at ``stage2`` through a 1×1-conv regressor (Romero et al. 2015)
``at``    CE + 1000·Σ_stages AT, p=2 (Zagoruyko & Komodakis 2017)
``sp``    CE + 3000·SP on the pooled embedding (Tung & Mori 2019)
``rkd``   CE + 1·RKD (distance 25, angle 50) on the pooled embedding (Park et al. 2019)
``pkt``   CE + 30000·PKT on the pooled embedding (Passalis & Tefas 2018)
========  ==========================================================================
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax import losses

__all__ = ["METHODS", "Objective", "WithHintRegressor", "cross_entropy", "from_method",
           "objective_loss", "prepare_student"]

LOGIT_TERMS = ("none", "kd", "dkd", "dist")
FEATURE_CONVENTIONS = ("post_relu", "pre_relu")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a student minimises. Weights of 0 switch a term off.

    ``logit`` picks the logit term: ``"kd"`` is :func:`kd_jax.losses.distillation_loss`
    (its ``(1 − alpha)`` weights the cross-entropy, ``ce_weight`` is not used); for
    ``"dkd"``, ``"dist"`` and ``"none"`` the cross-entropy has weight ``ce_weight``.
    ``dkd_warmup_epochs`` ramps the DKD term linearly from 0 to full weight over that many
    epochs (mdistiller: 20 of 240), counted continuously from the step.
    """

    logit: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9
    ce_weight: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup_epochs: float = 20.0
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    hint_weight: float = 0.0
    hint_stage: str = "stage2"
    at_weight: float = 0.0
    at_p: float = 2.0
    sp_weight: float = 0.0
    rkd_weight: float = 0.0
    pkt_weight: float = 0.0
    # Which stage features the feature terms compare: "post_relu" (after the stage's final
    # ReLU, RepDistiller's preact=False, on which its weights were calibrated) or "pre_relu"
    # (the models' "stageN" outputs as they are). "stem" and "pooled" are post-ReLU in both.
    features: str = "post_relu"

    def __post_init__(self):
        if self.features not in FEATURE_CONVENTIONS:
            raise ValueError(f"features must be one of {FEATURE_CONVENTIONS}, got "
                             f"{self.features!r}.")
        if self.logit not in LOGIT_TERMS:
            raise ValueError(f"unknown logit term {self.logit!r}; choose one of {LOGIT_TERMS}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")

    @property
    def needs_features(self) -> bool:
        return any(w > 0 for w in (self.hint_weight, self.at_weight, self.sp_weight,
                                   self.rkd_weight, self.pkt_weight))

    @property
    def needs_teacher(self) -> bool:
        return self.logit != "none" or self.needs_features


METHODS: dict[str, Objective] = {
    "none": Objective(logit="none"),
    "kd": Objective(logit="kd", temperature=4.0, alpha=0.9),
    "dkd": Objective(logit="dkd", temperature=4.0, dkd_alpha=1.0, dkd_beta=8.0,
                     dkd_warmup_epochs=20.0),
    "dist": Objective(logit="dist", temperature=4.0, dist_beta=1.0, dist_gamma=1.0),
    "fitnet": Objective(logit="none", hint_weight=100.0),
    "at": Objective(logit="none", at_weight=1000.0),
    "sp": Objective(logit="none", sp_weight=3000.0),
    "rkd": Objective(logit="none", rkd_weight=1.0),
    "pkt": Objective(logit="none", pkt_weight=30000.0),
}


def from_method(method: str, **overrides) -> Objective:
    """The preset for ``method`` (a key of :data:`METHODS`) with fields replaced."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    return dataclasses.replace(METHODS[method], **overrides)


class WithHintRegressor(nn.Module):
    """A student backbone plus the FitNets regressor, RepDistiller's ``ConvReg`` for maps of
    equal size: a 1×1 convolution (with bias) from the student's ``stage`` map to the
    teacher's channel count, BatchNorm, ReLU; exposed as feature ``"hint"``. With
    ``post_relu`` the regressor reads the stage map after its ReLU (the benchmark's
    convention). Its parameters and BatchNorm statistics live beside the backbone's
    (``hint_regressor``, ``hint_bn``), train with the student and are checkpointed with it.

    The BatchNorm and ReLU bound the regressor's output to the scale of the (post-ReLU)
    teacher map; without them a weight of 100 on the hint drove the linear regressor to a
    non-finite loss within a few steps at lr 0.1."""

    backbone: nn.Module
    stage: str
    channels: int
    post_relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        if not return_features:
            return self.backbone(x, train=train)
        logits, features = self.backbone(x, train=train, return_features=True)
        features = dict(features)
        source = features[self.stage].astype(jnp.float32)
        if self.post_relu:
            source = nn.relu(source)
        hint = nn.Conv(self.channels, (1, 1), name="hint_regressor")(source)
        hint = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            name="hint_bn")(hint)
        features["hint"] = nn.relu(hint)
        return logits, features


def prepare_student(student: nn.Module, objective: Objective, teacher: nn.Module,
                    image_shape=(32, 32, 3)) -> nn.Module:
    """``student``, wrapped with the auxiliary modules ``objective`` trains (FitNets)."""
    if objective.hint_weight <= 0:
        return student
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    shapes = {}
    for name, model in (("teacher", teacher), ("student", student)):
        _, features = jax.eval_shape(
            lambda x, model=model: model.init_with_output(
                jax.random.PRNGKey(0), x, train=False, return_features=True)[0], x)
        if objective.hint_stage not in features:
            raise ValueError(f"hint_stage {objective.hint_stage!r} is not a feature of the "
                             f"{name}; it has {sorted(features)}.")
        shapes[name] = features[objective.hint_stage].shape
    if shapes["teacher"][1:3] != shapes["student"][1:3]:
        raise ValueError(f"FitNets hint at {objective.hint_stage!r}: the teacher's map is "
                         f"{shapes['teacher'][1:3]} and the student's {shapes['student'][1:3]}; "
                         "pick a hint_stage where the spatial sizes agree.")
    return WithHintRegressor(backbone=student, stage=objective.hint_stage,
                             channels=shapes["teacher"][-1],
                             post_relu=objective.features == "post_relu")


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


def _post_relu(features):
    """Stage maps after their final ReLU (exact for the post-activation ResNet families,
    whose ``stageN`` is the last block's sum before that ReLU)."""
    return {k: nn.relu(v) if k.startswith("stage") else v for k, v in features.items()}


def _stage_keys(student_features, teacher_features):
    return [k for k in sorted(student_features)
            if k.startswith("stage") and k in teacher_features]


def objective_loss(objective: Objective, *, student_logits, student_features,
                   teacher_logits, teacher_features, labels, epoch) -> jax.Array:
    """The batch-mean loss of ``objective``; ``epoch`` (float, traced) drives warm-ups."""
    o = objective
    if o.needs_features and o.features == "post_relu":
        student_features = _post_relu(student_features)
        teacher_features = _post_relu(teacher_features)
    if o.logit == "kd":
        loss = losses.distillation_loss(student_logits, teacher_logits, labels,
                                        temperature=o.temperature, alpha=o.alpha).mean()
    else:
        ce = cross_entropy(student_logits, labels).mean()
        loss = o.ce_weight * ce
        if o.logit == "dkd":
            warm = jnp.minimum(epoch / o.dkd_warmup_epochs, 1.0) if o.dkd_warmup_epochs else 1.0
            loss = loss + warm * losses.dkd_loss(
                student_logits, teacher_logits, labels, alpha=o.dkd_alpha, beta=o.dkd_beta,
                temperature=o.temperature).mean()
        elif o.logit == "dist":
            loss = loss + losses.dist_loss(student_logits, teacher_logits, beta=o.dist_beta,
                                           gamma=o.dist_gamma, temperature=o.temperature)
    if o.hint_weight > 0:
        loss = loss + o.hint_weight * losses.hint_loss(
            student_features["hint"], teacher_features[o.hint_stage]).mean()
    if o.at_weight > 0:
        stages = _stage_keys(student_features, teacher_features)
        loss = loss + o.at_weight * sum(
            losses.attention_transfer_loss(student_features[k], teacher_features[k],
                                           p=o.at_p).mean() for k in stages)
    s_pooled = student_features["pooled"] if o.needs_features else None
    t_pooled = teacher_features["pooled"] if o.needs_features else None
    if o.sp_weight > 0:
        loss = loss + o.sp_weight * losses.similarity_preserving_loss(s_pooled, t_pooled)
    if o.rkd_weight > 0:
        loss = loss + o.rkd_weight * losses.rkd_loss(s_pooled, t_pooled)
    if o.pkt_weight > 0:
        loss = loss + o.pkt_weight * losses.pkt_loss(s_pooled, t_pooled)
    return loss
