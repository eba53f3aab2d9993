"""Distillation objectives as weighted terms, with the trainable parts and state they need.

An :class:`Objective` is a tuple of :class:`Term` s: each names a *registered* term (a loss
with its keyword arguments), a weight and an optional linear warm-up. The registry maps a
name to the function that evaluates it and says what it uses: the teacher, the features,
the examples' positions in the training set, trainable *heads* (regressors, embeddings,
fusion modules) and non-trainable *state* (memory banks), and what its arguments must be.
:func:`prepare_student` wraps a backbone with the heads its objective needs (they train,
checkpoint and resume with it and are left out of its predictions and exported weights),
:func:`init_state` builds the state, and :func:`evaluate_objective` returns the loss, each
term's part of it and the new state. :data:`METHODS` are the experiment's presets,
:func:`resolve` one of them under a run's settings. Adding a method is one loss in
:mod:`kd_jax.losses`, one :func:`register_term` and one test; see the README's "Add a method".

Modules (imports flow one way: presets → library → heads → terms → losses/models):

- ``terms`` — :class:`Term`, :class:`Objective`, the registry and argument checks, the
  evaluation (:func:`evaluate_objective`) and the terms' state (:func:`init_state`);
- ``heads`` — the Flax heads (``ConvReg``, ``EmbedPair``, ``VIDRegressors``, ``ABF``,
  ``ReviewFusion``) and the :class:`Student` that carries them;
- ``library`` — each method's term function and its registration;
- ``presets`` — :data:`METHODS`, :func:`register_method`, :func:`from_method`,
  :func:`resolve`.
"""

from kd_jax.objectives.heads import ABF
from kd_jax.objectives.heads import ConvReg
from kd_jax.objectives.heads import EmbedPair
from kd_jax.objectives.heads import ReviewFusion
from kd_jax.objectives.heads import Student
from kd_jax.objectives.heads import VIDRegressors
from kd_jax.objectives.heads import backbone_variables
from kd_jax.objectives.heads import deployed_params
from kd_jax.objectives.heads import prepare_student
from kd_jax.objectives.library import cross_entropy
from kd_jax.objectives.presets import METHODS
from kd_jax.objectives.presets import from_method
from kd_jax.objectives.presets import register_method
from kd_jax.objectives.presets import resolve
from kd_jax.objectives import more_terms  # noqa: F401, E402  (KDSVD, CTKD: terms and presets)
from kd_jax.objectives import staged_terms  # noqa: F401, E402  (AB, FT, FSP, SimKD, MLKD)
from kd_jax.objectives.terms import FEATURE_CONVENTIONS
from kd_jax.objectives.terms import Objective
from kd_jax.objectives.terms import Stage
from kd_jax.objectives.terms import Term
from kd_jax.objectives.terms import TermInputs
from kd_jax.objectives.terms import TermSpec
from kd_jax.objectives.evaluation import evaluate_objective
from kd_jax.objectives.evaluation import heads_from_teacher
from kd_jax.objectives.evaluation import init_state
from kd_jax.objectives.evaluation import objective_loss
from kd_jax.objectives.terms import parse_override
from kd_jax.objectives.terms import register_term
from kd_jax.objectives.terms import registered_terms

__all__ = [
    "ABF",
    "FEATURE_CONVENTIONS",
    "METHODS",
    "ConvReg",
    "EmbedPair",
    "Objective",
    "ReviewFusion",
    "Stage",
    "Student",
    "Term",
    "TermInputs",
    "TermSpec",
    "VIDRegressors",
    "backbone_variables",
    "cross_entropy",
    "deployed_params",
    "evaluate_objective",
    "from_method",
    "heads_from_teacher",
    "init_state",
    "objective_loss",
    "parse_override",
    "prepare_student",
    "register_method",
    "register_term",
    "registered_terms",
    "resolve",
]
