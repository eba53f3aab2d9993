"""Terms and presets of the methods that fit the objectives design as it is: KDSVD (stage
maps, no head) and CTKD (a learned temperature, carried as a one-parameter head).

The other methods of issue 24 have their losses in :mod:`kd_jax.losses` (AB, FT, FSP, OFD,
SimKD, MLKD) and :mod:`kd_jax.dot` (DOT's optimiser) but no preset: each needs a capability
the design lacks (a first stage, teacher parameters at set-up, an inference head, two views,
two gradients per step), and a preset without it would not be the method.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.objectives.heads import _stage_keys
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
              head=lambda **_: LearnedTemperature())

# mdistiller cfg.KDSVD: CE 1 + KDSVD 1, k = 1, on the stage maps after their ReLU.
register_method("kdsvd", Objective((Term.of("ce"), Term.of("kdsvd", 1.0, k=1))))
# CTKD's run_cifar_distill.sh: -r 0.1 -a 0.9, T = 1 + 20 sigmoid(theta), lambda 0 -> 1 over
# 10 epochs (cosine).
register_method("ctkd", Objective((Term.of("ce", 0.1), Term.of("ctkd", 0.9))))
