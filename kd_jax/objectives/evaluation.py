"""The evaluation of objectives: the terms' state, heads set from the teacher, the loss.

Feature convention: RepDistiller's weights are calibrated on stage maps taken after the
stage's final ReLU; ``Objective(features="post_relu")`` passes those, ``"pre_relu"`` the
models' ``stageN`` outputs as they are (see :mod:`kd_jax.objectives.terms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.objectives.terms import Objective, TermInputs


# ------------------------------------------------------------------ state and evaluation

def _post_relu(features):
    """Stage maps after their final ReLU (exact for the post-activation ResNet families,
    whose ``stageN`` is the last block's sum before that ReLU)."""
    return {k: nn.relu(v) if k.startswith("stage") else v for k, v in features.items()}


def init_state(objective: Objective, *, num_examples: int | None = None,
               train_labels=None, seed: int = 0, teacher: nn.Module | None = None,
               teacher_variables: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The non-trainable state of ``objective``'s terms (``{term: pytree}``), or ``None``.

    ``teacher`` and ``teacher_variables`` (the frozen teacher's module and variables) are
    needed by the terms set up from the teacher (``uses`` ``"teacher_variables"``: OFD)."""
    if not objective.has_state:
        return None
    state = {}
    for i, term in enumerate(objective.all_terms):
        if term.spec.state is None:
            continue
        extra = {}
        if "teacher_variables" in term.spec.uses:
            if teacher is None or teacher_variables is None:
                raise ValueError(f"term {term.name!r} is set up from the teacher: pass "
                                 "init_state(..., teacher=model, teacher_variables=variables).")
            extra = {"teacher": teacher, "teacher_variables": teacher_variables}
        state[term.name] = term.spec.state(
            num_examples=num_examples, train_labels=train_labels,
            key=jax.random.fold_in(jax.random.PRNGKey(seed), i), **extra, **term.arguments)
    return state


def evaluate_objective(objective: Objective, *, student_logits, labels, epoch,
                       teacher_logits=None, student_features=None, teacher_features=None,
                       heads=None, state=None, index=None, key=None, views=()
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
                            state=state.get(term.name), index=index, key=key,
                            heads=heads, views=views)
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


def heads_from_teacher(objective: Objective, params: Mapping[str, Any],
                       teacher_variables: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (a :class:`~kd_jax.objectives.Student`'s) with the heads of the terms
    registered with ``head_from_teacher`` set from the teacher's variables (SimKD's copy of
    the teacher's classifier); call once, after initialisation."""
    params = dict(params)
    for term in objective.all_terms:
        if term.spec.head_from_teacher is not None:
            name = f"head_{term.name}"
            params[name] = term.spec.head_from_teacher(params[name], teacher_variables)
    return params
