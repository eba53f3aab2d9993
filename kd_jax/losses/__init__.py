"""Knowledge-distillation losses.

Pure, jittable functions in the style of ``optax.losses``: arrays in, a
``jax.Array`` out, hyperparameters keyword-only, no reduction over examples
unless the loss itself relates examples to each other.

* Logit losses take logits of shape ``[..., C]`` and return shape ``[...]``.
* Per-example feature losses take ``[B, ...]`` and return shape ``[B]``.
* Relational losses (DIST, SP, RKD, PKT, CC, MLKD) return a scalar.
* CTKD's learned temperature comes with its two parts, :func:`gradient_reversal` and the
  curriculum :func:`ctkd_lambda`; :func:`ofd_margin` computes OFD's margin.

All arithmetic runs in float32 or wider: bfloat16/float16 inputs are upcast to
float32 first, float64 inputs stay float64. Shapes and dtypes are validated at trace
time and raise ``ValueError``.

Three promises hold for every loss (tested):

* **Non-finite in, non-finite out.** A NaN or infinite value in the student or teacher
  input makes the output NaN for the examples it belongs to (the whole value of a
  relational loss), so a run's non-finite-loss check fires; it is never masked into a
  plausible number.
* **Out-of-range labels** (outside ``[0, C)``, e.g. -1) give NaN for that example, here
  and in the train/eval steps (:func:`kd_jax.objectives.cross_entropy`).
* **Hyperparameters are checked whatever their type**: a temperature must be a finite
  scalar > 0, ``alpha`` a scalar in [0, 1], weights finite scalars, whether given as a
  Python number, a NumPy scalar or 0-d array, or a concrete JAX array. A non-scalar
  (e.g. a ``[B, 1]`` temperature, which would broadcast the loss to ``[B, B]``) is
  rejected even when traced; the value of a traced scalar cannot be checked.

Families live in private modules (``_logit``, ``_feature``, ``_relational``, ``_crd`` and
``_crd_sampler`` (CRD), ``_margin`` (AB, OFD), ``_factor`` (FSP, KDSVD, FT), ``_temperature``
(CTKD), with the shared checks in ``_checks``); import the names from here.
"""

# One public name per line, grouped by family (as optax.losses).
from kd_jax.losses._logit import dist_loss as dist_loss
from kd_jax.losses._logit import distillation_loss as distillation_loss
from kd_jax.losses._logit import dkd_loss as dkd_loss
from kd_jax.losses._logit import lskd_loss as lskd_loss
from kd_jax.losses._logit import mlkd_loss as mlkd_loss
from kd_jax.losses._logit import soft_target_cross_entropy as soft_target_cross_entropy
from kd_jax.losses._logit import soft_target_kl as soft_target_kl
from kd_jax.losses._logit import tempered_log_softmax as tempered_log_softmax
from kd_jax.losses._logit import tempered_softmax as tempered_softmax
from kd_jax.losses._feature import attention_transfer_loss as attention_transfer_loss
from kd_jax.losses._feature import hcl_loss as hcl_loss
from kd_jax.losses._feature import hint_loss as hint_loss
from kd_jax.losses._feature import nst_loss as nst_loss
from kd_jax.losses._feature import simkd_loss as simkd_loss
from kd_jax.losses._feature import vid_loss as vid_loss
from kd_jax.losses._relational import cc_loss as cc_loss
from kd_jax.losses._relational import pkt_loss as pkt_loss
from kd_jax.losses._relational import rkd_loss as rkd_loss
from kd_jax.losses._relational import similarity_preserving_loss as similarity_preserving_loss
from kd_jax.losses._margin import ab_loss as ab_loss
from kd_jax.losses._margin import ofd_loss as ofd_loss
from kd_jax.losses._margin import ofd_margin as ofd_margin
from kd_jax.losses._factor import factor_transfer_loss as factor_transfer_loss
from kd_jax.losses._factor import fsp_loss as fsp_loss
from kd_jax.losses._factor import kdsvd_loss as kdsvd_loss
from kd_jax.losses._temperature import ctkd_lambda as ctkd_lambda
from kd_jax.losses._temperature import ctkd_loss as ctkd_loss
from kd_jax.losses._temperature import gradient_reversal as gradient_reversal
from kd_jax.losses._crd import crd_memory_update as crd_memory_update
from kd_jax.losses._crd import crd_nce_loss as crd_nce_loss
from kd_jax.losses._crd import crd_nce_loss_and_normalizers as crd_nce_loss_and_normalizers
from kd_jax.losses._crd import crd_normalizers as crd_normalizers
from kd_jax.losses._crd_sampler import crd_sample_negatives as crd_sample_negatives

# Private, imported here only so that `kd_jax.losses._adaptive_pool_matrix` (used by
# kd_jax.objectives for pooled feature targets) keeps working; not part of the API.
from kd_jax.losses._feature import _adaptive_pool_matrix as _adaptive_pool_matrix

__all__ = [
    "ab_loss",
    "attention_transfer_loss",
    "cc_loss",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_nce_loss_and_normalizers",
    "crd_normalizers",
    "crd_sample_negatives",
    "ctkd_lambda",
    "ctkd_loss",
    "distillation_loss",
    "dist_loss",
    "dkd_loss",
    "factor_transfer_loss",
    "fsp_loss",
    "gradient_reversal",
    "hcl_loss",
    "hint_loss",
    "kdsvd_loss",
    "lskd_loss",
    "mlkd_loss",
    "nst_loss",
    "ofd_loss",
    "ofd_margin",
    "pkt_loss",
    "rkd_loss",
    "similarity_preserving_loss",
    "simkd_loss",
    "soft_target_cross_entropy",
    "soft_target_kl",
    "tempered_log_softmax",
    "tempered_softmax",
    "vid_loss",
]

# Each public function names this module as its home, as before the split into private
# modules: reprs, docs and pickles point at `kd_jax.losses`, not at a private module.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
