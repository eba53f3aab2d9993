"""The trainable heads of the feature terms and the student that carries them.

A term's head (``register_term(head=...)``) is a Flax module called as ``module(
student_features, teacher_features, train)``; :func:`prepare_student` wraps a backbone as a
:class:`Student` with the heads its objective needs, so that they train, checkpoint and
resume with it, and :func:`backbone_variables` drops them again for prediction and export.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.objectives.evaluation import _post_relu
from kd_jax.objectives.terms import Objective


# ------------------------------------------------------------------ feature helpers

def _stage_keys(student_features, teacher_features):
    """The ``stage<N>`` maps both networks return, shallow to deep (numeric order: stage10
    after stage9)."""
    keys = [k for k in student_features
            if re.fullmatch(r"stage\d+", k) and k in teacher_features]
    return sorted(keys, key=lambda k: int(k[len("stage"):]))


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


# ------------------------------------------------------------------ the student with heads

class Student(nn.Module):
    """A backbone plus the heads of its objective's terms, its stage's included (parameters
    ``backbone`` and ``head_<term>``).

    ``model(x, train)`` is the student's prediction alone (evaluation and export use it):
    the backbone's, or, for an objective with a predicting term (SimKD), that head's
    ``"logits"``. ``model(x, train, return_features=True, teacher_features=...)`` returns
    ``(logits, features, heads)``, ``heads[term]`` the term's head output. At
    initialisation (no teacher features) zeros of ``teacher_shapes`` stand in.
    """

    backbone: nn.Module
    objective: Objective
    teacher_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False,
                 teacher_features=None):
        predicting = self.objective.predicting_term
        if not return_features and predicting is None:
            return self.backbone(x, train=train)
        logits, features = self.backbone(x, train=train, return_features=True)
        if teacher_features is None:
            teacher_features = {k: jnp.zeros((x.shape[0], *shape[1:]), jnp.float32)
                                for k, shape in self.teacher_shapes}
        s, t = dict(features), dict(teacher_features)
        if self.objective.features == "post_relu":
            s, t = _post_relu(s), _post_relu(t)
        heads = {}
        for term in self.objective.all_terms:
            if term.spec.head is None or (not return_features and term is not predicting):
                continue
            # A predicting head gives the student's logits: of the backbone's classes.
            extra = {"num_classes": self.backbone.num_classes} if term.spec.predicts else {}
            module = term.spec.head(**term.arguments, **extra).clone(
                parent=self, name=f"head_{term.name}")
            if term.spec.head_inputs == "pre_relu":
                heads[term.name] = module(dict(features), dict(teacher_features), train=train)
            else:
                heads[term.name] = module(s, t, train=train)
        if predicting is not None:
            logits = heads[predicting.name]["logits"]
        if not return_features:
            return logits
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
    if not objective.wraps_student:
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
    """The variables of the student as deployed: for a :class:`Student` the training heads
    are dropped (what the student predicts with, and what to export); with a predicting
    term (SimKD) the backbone plus that head (the projector and the teacher's classifier),
    as ``{"backbone": ..., "head_<term>": ...}`` trees that ``model.apply`` takes (the
    backbone's own classifier, unused by the prediction, stays so that they load into the
    same module; :func:`deployed_params` counts without it). Other models' variables are
    returned as they are."""
    if not isinstance(model, Student):
        return dict(variables)
    predicting = model.objective.predicting_term
    if predicting is None:
        return {collection: tree["backbone"] for collection, tree in variables.items()
                if isinstance(tree, Mapping) and "backbone" in tree}
    keep = ("backbone", f"head_{predicting.name}")
    return {collection: {k: tree[k] for k in keep if k in tree}
            for collection, tree in variables.items() if isinstance(tree, Mapping)}


def deployed_params(model: nn.Module, params: Mapping[str, Any]) -> int:
    """The number of parameters the deployed student predicts with: the backbone's, or for a
    predicting term (SimKD) the backbone's feature layers plus that head's."""
    tree = backbone_variables(model, {"params": params})["params"]
    if isinstance(model, Student) and model.objective.predicting_term is not None:
        tree = {**tree, "backbone": {k: v for k, v in tree["backbone"].items()
                                     if k != "classifier"}}
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
