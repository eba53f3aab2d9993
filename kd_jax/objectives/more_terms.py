"""Terms and presets of the methods of issue 24 that the objectives design holds: KDSVD (stage
maps, no head), CTKD (a learned temperature, carried as a one-parameter head, its curriculum
an epoch argument), DOT (KD with the task and distillation gradients apart, an
objective-level optimiser) and OFD (connectors on the pre-ReLU maps, its margins set up from
the teacher's BatchNorm).

The methods that need a first stage, an inference head or a second view (AB, FT, FSP,
SimKD, MLKD) are in :mod:`kd_jax.objectives.staged_terms`.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.objectives.heads import _batch_norm, _pool_to, _stage_keys
from kd_jax.objectives.presets import register_method
from kd_jax.objectives.terms import Objective, Term, TermInputs, register_term


# ------------------------------------------------------------------ KDSVD

def _kdsvd(x: TermInputs, *, k):
    keys = _stage_keys(x.student_features, x.teacher_features)
    return losses.kdsvd_loss([x.student_features[s] for s in keys],
                             [x.teacher_features[s] for s in keys], k=k).mean()


# ------------------------------------------------------------------ CTKD

class LearnedTemperature(nn.Module):
    """CTKD's ``Global_T``: one trainable scalar :math:`\\theta` (initialised to 1), the
    logit of the temperature. A head, so it trains, checkpoints and resumes with the
    student (same optimiser, weight decay included, as the authors') and is left out of
    the exported student; it ignores the features."""

    init: float = 1.0

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        return {"theta": self.param("theta", nn.initializers.constant(self.init), ())}


def _ctkd(x: TermInputs, *, temperature_min, temperature_range, lambda_min, lambda_max,
          lambda_epochs):
    # The authors set lambda once per epoch from the 1-based epoch number; x.epoch is
    # (step + 1) / steps_per_epoch, whose ceiling is that number.
    reversal = losses.ctkd_lambda(jnp.ceil(x.epoch), lambda_min=lambda_min,
                                  lambda_max=lambda_max, num_epochs=lambda_epochs)
    return losses.ctkd_loss(x.student_logits, x.teacher_logits, x.head["theta"],
                            reversal=jax.lax.stop_gradient(reversal),
                            temperature_min=temperature_min,
                            temperature_range=temperature_range).mean()


register_term("kdsvd", _kdsvd, uses=("teacher", "features"), defaults={"k": 1},
              checks={"k": "positive"})
register_term("ctkd", _ctkd, uses=("teacher",),
              defaults={"temperature_min": 1.0, "temperature_range": 20.0,
                        "lambda_min": 0.0, "lambda_max": 1.0, "lambda_epochs": 10.0},
              checks={"temperature_min": "positive", "temperature_range": "positive",
                      "lambda_epochs": "positive"},
              epoch_arguments=("lambda_epochs",),
              head=lambda **_: LearnedTemperature())

# ------------------------------------------------------------------ OFD

def _stage_order(features) -> list[str]:
    return sorted((k for k in features if re.fullmatch(r"stage\d+", k)),
                  key=lambda k: int(k[5:]))


def _ofd_pairs(student_features, teacher_features) -> list[tuple[str, str]]:
    """(student stage, teacher stage), the deepest ones paired, as mdistiller aligns them."""
    s, t = _stage_order(student_features), _stage_order(teacher_features)
    n = min(len(s), len(t))
    return list(zip(s[len(s) - n:], t[len(t) - n:]))


def _bn_before_relu(params) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{stage: (scale, bias)}`` of the BatchNorm before each stage's final ReLU in a
    kd_jax post-activation ResNet (CIFAR and torchvision layouts): the last BatchNorm
    (``bn2``, ``bn3`` of a bottleneck) of the stage's last block, as mdistiller's
    ``get_bn_before_relu``. Other families have no such BatchNorm by these names."""
    blocks: dict[str, tuple[int, str]] = {}
    for name in params:
        m = re.fullmatch(r"(stage\d+)_block(\d+)", name)
        if m and (m[1] not in blocks or int(m[2]) > blocks[m[1]][0]):
            blocks[m[1]] = (int(m[2]), name)
    out = {}
    for stage, (_, block) in blocks.items():
        bns = sorted((k for k in params[block] if re.fullmatch(r"bn\d+", k)),
                     key=lambda k: int(k[2:]))
        if bns:
            bn = params[block][bns[-1]]
            out[stage] = (jnp.asarray(bn["scale"]), jnp.asarray(bn["bias"]))
    return out


def _ofd_state(*, teacher, teacher_variables, **_):
    found = _bn_before_relu(teacher_variables["params"])
    if not found:
        raise ValueError(f"OFD takes its margins from the BatchNorm before each stage's ReLU; "
                         f"the teacher ({type(teacher).__name__}) has no stageN_blockM/bnK "
                         "BatchNorm (kd_jax's ResNets do): use a ResNet teacher.")
    return {"margins": {k: losses.ofd_margin(*v) for k, v in found.items()}}


class OFDConnectors(nn.Module):
    """OFD's connector per stage pair (mdistiller's ``ConnectorConvBN``): a 1×1 convolution
    without bias from the student's pre-ReLU map to the teacher's channels, N(0, 2/C_t)
    initialised, and BatchNorm. Keyed by the teacher's stage."""

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        out = {}
        for s_key, t_key in _ofd_pairs(student_features, teacher_features):
            c = teacher_features[t_key].shape[-1]
            y = nn.Conv(c, (1, 1), use_bias=False, name=f"{t_key}_conv",
                        kernel_init=nn.initializers.normal(math.sqrt(2.0 / c)))(
                student_features[s_key].astype(jnp.float32))
            out[t_key] = _batch_norm(train, f"{t_key}_bn")(y)
        return out


def _ofd(x: TermInputs):
    pairs = _ofd_pairs(x.raw_student_features, x.raw_teacher_features)
    margins = x.state["margins"]
    total, n = 0.0, len(pairs)
    for i, (_, t_key) in enumerate(pairs):
        if t_key not in margins:
            raise ValueError(f"OFD: the teacher's {t_key} has no BatchNorm before its ReLU "
                             f"(margins of {', '.join(sorted(margins))}).")
        s = x.head[t_key]
        t = _pool_to(x.raw_teacher_features[t_key].astype(jnp.float32), s.shape[1:3])
        part = losses.ofd_loss(s, jax.lax.stop_gradient(t), margins[t_key]).mean()
        total = total + part / 2 ** (n - 1 - i)
    return total, x.state


register_term("ofd", _ofd, uses=("teacher", "features", "teacher_variables"),
              head=lambda **_: OFDConnectors(), state=_ofd_state, head_inputs="pre_relu")


# mdistiller cfg.KDSVD: CE 1 + KDSVD 1, k = 1, on the stage maps after their ReLU.
register_method("kdsvd", Objective((Term.of("ce"), Term.of("kdsvd", 1.0, k=1))))
# CTKD's run_cifar_distill.sh: -r 0.1 -a 0.9, T = 1 + 20 sigmoid(theta), lambda 0 -> 1 over
# 10 epochs (cosine).
register_method("ctkd", Objective((Term.of("ce", 0.1), Term.of("ctkd", 0.9))))
# mdistiller configs/cifar100/dot: its KD (CE 0.1 + KD 0.9, T = 4) under the DOT trainer,
# SGD lr 0.05 at batch 64, momentum 0.9 +- delta 0.075, weight decay 5e-4 (the run's own).
register_method("dot", Objective((Term.of("ce", 0.1, part="task"),
                                  Term.of("kd", 0.9, part="distill", temperature=4.0)),
                                 optimizer="dot", optimizer_args=(("delta", 0.075),)))
# mdistiller cfg.OFD: CE 1 + 0.001 * sum_i 2^-(n-1-i) partial L2 over the pre-ReLU stage
# maps, 1x1 connectors, margins from the teacher's BatchNorm before each stage's ReLU.
register_method("ofd", Objective((Term.of("ce"), Term.of("ofd", 1e-3))))
