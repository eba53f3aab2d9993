"""kd_jax: knowledge distillation in JAX/Flax.

Modules (imports flow one way: experiment -> loop -> train -> objectives/data ->
losses/models/checkpoint/parallel):

- :mod:`kd_jax.experiment` — the whole experiment in one call: ``run(config, workdir)``
  (teacher, baseline and distilled students, the table), ``ExperimentConfig``, ``PRESETS``.
- :mod:`kd_jax.writers` — the metric-writer interface (CLU's) and the JSONL, TensorBoard and
  text writers.

- :mod:`kd_jax.losses` — pure, jittable distillation losses (Hinton KD, DKD, DIST, FitNets,
  AT, SP, RKD, PKT, LS-KD, NST, CRD's NCE loss and memory bank, VID, CC, ReviewKD's HCL).
- :mod:`kd_jax.models` — Flax CIFAR ResNets, wide ResNets, ResNet-18/34 and more, with
  features.
- :mod:`kd_jax.data` — TFDS CIFAR-10/100 arrays, a cached decode, on-device augmentation,
  sharded batches.
- :mod:`kd_jax.objectives` — a distillation objective as configuration; method presets.
- :mod:`kd_jax.train` — the train state, optimisers, and the supervised, distillation and
  evaluation steps (K students per step).
- :mod:`kd_jax.loop` — the epoch loop with logging, checkpoints and exact resume.
- :mod:`kd_jax.parallel` — the ``("data",)`` mesh, shardings, multi-host start-up.
- :mod:`kd_jax.checkpoint` — Orbax checkpoints with recorded digests.
- :mod:`kd_jax.pretrained` — the shipped published CIFAR teachers and their preprocessing.
- :mod:`kd_jax.convert` — PyTorch CIFAR and torchvision ResNet checkpoints to kd_jax (no
  torch needed).
- :mod:`kd_jax.hostdata` — ImageNet-scale data decoded and augmented in host workers.
- :mod:`kd_jax.dot` — DOT's optimiser.

Submodules and the names below are imported on first use (PEP 562), so ``import
kd_jax.losses`` costs only JAX, not TFDS, Orbax or Flax.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SUBMODULES = frozenset(
    ["checkpoint", "convert", "data", "dot", "experiment", "hostdata", "losses", "loop",
     "models", "objectives", "parallel", "pretrained", "train", "writers"]
)
# Re-exported name -> the submodule that defines it.
_EXPORTS = {
    **{name: "losses" for name in [
        "attention_transfer_loss",
        "cc_loss",
        "crd_memory_update",
        "crd_nce_loss",
        "crd_normalizers",
        "crd_sample_negatives",
        "hcl_loss",
        "vid_loss",
        "distillation_loss",
        "dist_loss",
        "dkd_loss",
        "hint_loss",
        "lskd_loss",
        "nst_loss",
        "pkt_loss",
        "rkd_loss",
        "similarity_preserving_loss",
        "soft_target_cross_entropy",
        "soft_target_kl",
        "tempered_log_softmax",
        "tempered_softmax",
    ]},
    "METHODS": "objectives",
    "Objective": "objectives",
    "Term": "objectives",
    "OptimConfig": "train",
    "TrainState": "train",
    "distill_step": "train",
    "eval_step": "train",
    "train_step": "train",
}

__all__ = [
    "METHODS",
    "Objective",
    "Term",
    "OptimConfig",
    "TrainState",
    "attention_transfer_loss",
    "cc_loss",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_normalizers",
    "crd_sample_negatives",
    "hcl_loss",
    "vid_loss",
    "checkpoint",
    "convert",
    "data",
    "distill_step",
    "distillation_loss",
    "dot",
    "dist_loss",
    "dkd_loss",
    "eval_step",
    "experiment",
    "hint_loss",
    "hostdata",
    "loop",
    "losses",
    "lskd_loss",
    "models",
    "nst_loss",
    "objectives",
    "parallel",
    "pkt_loss",
    "pretrained",
    "rkd_loss",
    "similarity_preserving_loss",
    "soft_target_cross_entropy",
    "soft_target_kl",
    "tempered_log_softmax",
    "tempered_softmax",
    "train",
    "train_step",
    "writers",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # Later lookups skip this function.
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # Eager imports for type checkers and IDEs only.
    from kd_jax import (checkpoint, convert, data, experiment, loop, losses, models,
                        objectives, parallel, pretrained, train, writers)
    from kd_jax.losses import (
        attention_transfer_loss,
        cc_loss,
        crd_memory_update,
        crd_nce_loss,
        crd_normalizers,
        crd_sample_negatives,
        hcl_loss,
        vid_loss,
        dist_loss,
        distillation_loss,
        dkd_loss,
        hint_loss,
        lskd_loss,
        nst_loss,
        pkt_loss,
        rkd_loss,
        similarity_preserving_loss,
        soft_target_cross_entropy,
        soft_target_kl,
        tempered_log_softmax,
        tempered_softmax,
    )
    from kd_jax.objectives import METHODS, Objective, Term
    from kd_jax.train import OptimConfig, TrainState, distill_step, eval_step, train_step
