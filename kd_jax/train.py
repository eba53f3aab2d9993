"""Train state, optimisers and the pure, jit-able steps: supervised, distillation, evaluation.

Every step is a pure function ``(state(s), [teacher variables], batch) -> (state(s), metrics)``;
the caller jits it with its configuration bound (``jax.jit(partial(step, ...),
donate_argnums=0)``). A batch is ``{"image": uint8[B, 32, 32, 3], "label": int32[B]}`` (plus
``"mask": bool[B]`` for evaluation), sharded over the ``"data"`` mesh axis; augmentation runs
inside the step from a key derived from ``(state.rng, state.step)``, so the data stream is a
function of the seed and the step alone and the teacher and every student see one view.

Under ``jax.jit`` with a batch-sharded input, BatchNorm statistics are taken over the global
batch, so the results do not depend on the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from kd_jax import data
from kd_jax.optim import (OptimConfig, in_groups, learning_rate,  # noqa: F401 (re-exported)
                          make_optimizer, make_schedule, objective_schedule)
from kd_jax.objectives import Objective, cross_entropy, evaluate_objective

__all__ = [
    "OptimConfig",
    "TrainState",
    "create_train_state",
    "distill_step",
    "distill_step_many",
    "distill_step_vmap",
    "eval_step",
    "learning_rate",
    "make_optimizer",
    "make_schedule",
    "objective_schedule",
    "stack_states",
    "train_step",
    "unstack_states",
]

IMAGE_SHAPE = (32, 32, 3)


class TrainState(train_state.TrainState):
    """``step``, ``params``, ``opt_state`` (from flax) plus ``batch_stats`` and ``rng``.

    ``rng`` is the raw ``uint32[2]`` key of the data stream: augmentation at step ``s`` uses
    ``fold_in(rng, s)``. Students trained together share it (one view for all).
    ``aux_state`` is the objective's non-trainable state (``{term: pytree}``, e.g. CRD's
    memory bank; :func:`kd_jax.objectives.init_state`): donated, checkpointed and resumed with
    the rest.
    """

    batch_stats: Any = None
    rng: jax.Array | None = None
    aux_state: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, *,
                       init_seed: int, data_seed: int, aux_state: Any = None,
                       image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> TrainState:
    """Initialises ``model`` from ``init_seed`` for ``image_shape`` inputs (CIFAR's 32×32×3 by
    default); the augmentation stream comes from ``data_seed``; ``aux_state`` is the
    objective's state (:func:`kd_jax.objectives.init_state`)."""
    # return_features=True so auxiliary modules on the feature path (regressors) exist too.
    variables = model.init(jax.random.PRNGKey(init_seed),
                           jnp.zeros((1, *image_shape), jnp.float32), train=False,
                           return_features=True)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=jax.random.PRNGKey(data_seed),
        aux_state=aux_state,
    )


def _augmented_pixels(state: TrainState, batch: dict[str, jax.Array], dataset: str
                      ) -> jax.Array:
    """The step's augmented view, uint8 pixels before any model's normalisation: CIFAR's
    crop and flip drawn on the device, or the batch as the host workers augmented it."""
    if data.spec(dataset).host_augmented:
        return batch["image"]
    key = jax.random.fold_in(state.rng, state.step)
    return data.random_crop_flip(key, batch["image"])


def _strong_pixels(state: TrainState, batch: dict[str, jax.Array], dataset: str
                   ) -> jax.Array:
    """The step's second, strong view (MLKD): its own crop and flip, then RandAugment
    (:func:`kd_jax.data.rand_augment`), from a key apart from the first view's."""
    if data.spec(dataset).host_augmented:
        raise ValueError(f"a second augmented view (MLKD) is drawn on the device for CIFAR; "
                         f"{dataset} is augmented by host workers, which draw one view.")
    crop, rand = jax.random.split(jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                                     2))
    return data.rand_augment(rand, data.random_crop_flip(crop, batch["image"]))


def _views(states, objectives, batch, dataset, teachers):
    """``((images, teacher_logits),)`` of the strong view if an objective asks for two."""
    if max(o.views for o in objectives) < 2:
        return ()
    applies, variables, preps = teachers
    pixels = _strong_pixels(states[0], batch, dataset)
    images = data.normalize(pixels, dataset=dataset)
    t_logits, _ = teacher_outputs(applies, variables, images, with_features=False,
                                  pixels=pixels, preprocess=preps)
    return ((images, t_logits),)


def _augmented(state: TrainState, batch: dict[str, jax.Array], dataset: str) -> jax.Array:
    return data.normalize(_augmented_pixels(state, batch, dataset), dataset=dataset)


def _variables(state: TrainState, params=None) -> dict[str, Any]:
    return {"params": state.params if params is None else params,
            "batch_stats": state.batch_stats}


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, dataset: str
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One supervised SGD step: cross-entropy with the labels on an augmented batch.

    Returns the new state and ``{"loss", "accuracy"}`` (batch means, on the device).
    """
    images = _augmented(state, batch, dataset)
    labels = batch["label"]

    def loss_fn(params):
        logits, updates = state.apply_fn(_variables(state, params), images, train=True,
                                         mutable=["batch_stats"])
        loss = cross_entropy(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "accuracy": _accuracy(logits, labels)}


def teacher_outputs(teacher_applies: Sequence[Callable], teacher_variables: Sequence[Any],
                    images: jax.Array, *, with_features: bool,
                    pixels: jax.Array | None = None,
                    preprocess: Sequence[Callable | None] | None = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """The frozen teachers in inference mode: averaged logits, and the first one's features.

    Teachers run with ``train=False`` (running BatchNorm averages, nothing mutated) and
    under ``stop_gradient``: no gradient reaches them. Teacher ``i`` sees
    ``preprocess[i](pixels)`` when it has a preprocessing function (its own input
    normalisation, e.g. a converted PyTorch teacher's), else ``images`` (the student's).
    """
    teacher_variables = jax.lax.stop_gradient(teacher_variables)
    preprocess = preprocess or (None,) * len(teacher_applies)
    logits, features = [], None
    for i, (apply, variables, prep) in enumerate(zip(teacher_applies, teacher_variables,
                                                      preprocess)):
        images_i = images if prep is None else prep(pixels)
        if with_features and i == 0:
            out, features = apply(variables, images_i, train=False, return_features=True)
        else:
            out = apply(variables, images_i, train=False)
        logits.append(out)
    mean_logits = logits[0] if len(logits) == 1 else jnp.mean(jnp.stack(logits), axis=0)
    return mean_logits, features


def _as_teachers(teacher_apply, teacher_variables, teacher_preprocess=None):
    if callable(teacher_apply):
        teacher_apply, teacher_variables = (teacher_apply,), (teacher_variables,)
    teacher_apply, teacher_variables = tuple(teacher_apply), tuple(teacher_variables)
    if len(teacher_apply) != len(teacher_variables) or not teacher_apply:
        raise ValueError(f"got {len(teacher_apply)} teacher apply functions and "
                         f"{len(teacher_variables)} teacher variable sets; pass one of each.")
    if teacher_preprocess is None or callable(teacher_preprocess):
        teacher_preprocess = (teacher_preprocess,) * len(teacher_apply)
    teacher_preprocess = tuple(teacher_preprocess)
    if len(teacher_preprocess) != len(teacher_apply):
        raise ValueError(f"got {len(teacher_preprocess)} teacher_preprocess functions for "
                         f"{len(teacher_apply)} teachers; pass one per teacher (None: the "
                         "student's normalisation).")
    return teacher_apply, teacher_variables, teacher_preprocess


def _restrict(new, old, groups, classifier=True):
    """``new`` where a leaf lies in ``groups`` (a stage's), else ``old``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, n, o: n if in_groups(path, groups, classifier=classifier) else o, new, old)


def _student_update(state: TrainState, objective: Objective, images, labels, t_logits,
                    t_features, progress, index=None, key=None, views=(),
                    steps_per_epoch: int = 1):
    """One student's SGD step on ``objective`` given the teacher's outputs; returns the new
    state, the loss, the accuracy and each term's part of the loss.

    With ``objective.optimizer == "dot"`` the task and the distillation parts of the loss
    are differentiated apart (one forward, two cotangents of one ``jax.vjp``) and the
    state's optimiser (:func:`kd_jax.dot.dot`) receives the pair. With a ``stage``, the
    steps before ``stage.steps(...)`` minimise the stage's terms and change only the
    stage's parameter groups and their BatchNorm statistics (one forward pass; both
    objectives are evaluated on it and the step's is selected). ``views`` are ``(images, teacher_logits)`` of further augmented views (MLKD):
    the student runs on each after the first, in training mode, as the authors' code does."""

    def forward(params):
        variables = _variables(state, params)
        heads = None
        if objective.wraps_student:
            (logits, features, heads), updates = state.apply_fn(
                variables, images, train=True, return_features=True,
                teacher_features=t_features, mutable=["batch_stats"])
        elif objective.needs_features:
            (logits, features), updates = state.apply_fn(
                variables, images, train=True, return_features=True, mutable=["batch_stats"])
        else:
            logits, updates = state.apply_fn(variables, images, train=True,
                                              mutable=["batch_stats"])
            features = None
        view_logits = []
        for view_images, view_teacher in views:
            out, updates = state.apply_fn({"params": params, **updates}, view_images,
                                          train=True, mutable=["batch_stats"])
            view_logits.append((out, view_teacher))
        return logits, features, heads, updates["batch_stats"], tuple(view_logits)

    def evaluate(evaluated: Objective, logits, features, heads, view_logits):
        return evaluate_objective(
            evaluated, student_logits=logits, labels=labels, epoch=progress,
            teacher_logits=t_logits, student_features=features, teacher_features=t_features,
            heads=heads, state=state.aux_state, index=index, key=key, views=view_logits)

    def loss_fn(params):
        logits, features, heads, batch_stats, view_logits = forward(params)
        loss, parts, aux_state = evaluate(objective, logits, features, heads, view_logits)
        return loss, (logits, batch_stats, parts, aux_state)

    def main(state):
        if objective.optimizer == "dot":
            task_names, distill_names = objective.gradient_parts()

            def split_fn(params):
                loss, aux = loss_fn(params)
                zero = jnp.zeros((), jnp.float32)
                task = sum((aux[2][n] for n in task_names if n in aux[2]), zero)
                distill = sum((aux[2][n] for n in distill_names if n in aux[2]), zero)
                return (task, distill), (loss, aux)

            _, vjp_fn, (loss, (logits, batch_stats, parts, aux_state)) = jax.vjp(
                split_fn, state.params, has_aux=True)
            one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
            (g_task,), (g_distill,) = vjp_fn((one, zero)), vjp_fn((zero, one))
            grads = (g_task, g_distill)
        else:
            (loss, (logits, batch_stats, parts, aux_state)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), (
            loss, logits, parts, aux_state)

    if objective.stage is None:
        state, (loss, logits, parts, aux_state) = main(state)
    else:
        # One forward pass, both objectives evaluated on it, the stage's selected while it
        # lasts (a jax.lax.cond around the two updates ran 20x slower on XLA:CPU).
        stage = objective.stage
        in_stage = state.step < stage.steps(steps_per_epoch)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(in_stage, x, y), a, b)  # noqa: E731
        idle = jnp.full((), jnp.nan, jnp.float32)

        def staged_fn(params):
            logits, features, heads, batch_stats, view_logits = forward(params)
            first = evaluate(objective.stage_objective, logits, features, heads, view_logits)
            then = evaluate(objective, logits, features, heads, view_logits)
            # Every term reported each step: NaN where it does not run (kd_jax.loop
            # averages a term over the steps it ran in).
            parts = {**{n: jnp.where(in_stage, idle, v) for n, v in then[1].items()},
                     **{n: jnp.where(in_stage, v, idle) for n, v in first[1].items()}}
            aux = None if then[2] is None else pick(first[2], then[2])
            # In the stage only its groups' BatchNorm statistics move.
            batch_stats = pick(_restrict(batch_stats, state.batch_stats, stage.trains),
                               batch_stats)
            return jnp.where(in_stage, first[0], then[0]), (logits, batch_stats, parts, aux)

        (loss, (logits, batch_stats, parts, aux_state)), grads = jax.value_and_grad(
            staged_fn, has_aux=True)(state.params)
        new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        # Only the stage's groups move in it, whatever optimiser the state holds
        # (make_optimizer's staged one also gives the others zero updates).
        state = new.replace(params=pick(_restrict(new.params, state.params, stage.trains,
                                                  classifier=False), new.params))
    if aux_state is not None:
        state = state.replace(aux_state=jax.lax.stop_gradient(aux_state))
    return state, loss, _accuracy(logits, labels), parts


def _term_key(state: TrainState) -> jax.Array:
    """The step's key for the terms' sampling (CRD's negatives), apart from augmentation's."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)


def distill_step_many(states: Sequence[TrainState], teacher_variables: Any,
                      batch: dict[str, jax.Array], *,
                      objectives: Sequence[Objective],
                      teacher_apply: Callable | Sequence[Callable], dataset: str,
                      steps_per_epoch: int,
                      teacher_preprocess: Callable | Sequence[Callable | None] | None = None,
                      ) -> tuple[tuple[TrainState, ...], dict[str, jax.Array]]:
    """K students distilled from one teacher pass: one step for each, one shared view.

    ``states`` are the K student states (they must share ``rng`` and ``step``), each
    trained with its own objective (``objectives[k]``). The teacher(s) run once on the
    augmented batch; their logits (averaged over several teachers, i.e. ensemble
    distillation) and features feed every student. Each student's update is its own graph
    inside the one jit: on CPU this is faster than ``vmap`` over stacked states (measured in
    ``benchmarks/throughput.py``).

    ``teacher_preprocess`` (one callable, or one per teacher; ``None`` = the student's
    ``dataset`` normalisation) maps the augmented uint8 pixels to a teacher's input, so a
    teacher with its own normalisation (:mod:`kd_jax.pretrained`) sees the same view as the
    students, normalised its own way.

    Returns the K new states and metrics ``{"loss", "accuracy"}`` of shape ``[K]`` plus
    ``"terms"``, one dict per student of its terms' weighted parts of the loss.
    """
    if len(states) != len(objectives):
        raise ValueError(f"got {len(states)} student states and {len(objectives)} "
                         "objectives; pass one objective per student.")
    applies, variables, preps = _as_teachers(teacher_apply, teacher_variables,
                                             teacher_preprocess)
    pixels = _augmented_pixels(states[0], batch, dataset)
    images = data.normalize(pixels, dataset=dataset)
    labels = batch["label"]
    with_features = any(o.needs_features for o in objectives)
    t_logits, t_features = teacher_outputs(applies, variables, images,
                                           with_features=with_features, pixels=pixels,
                                           preprocess=preps)
    progress = (states[0].step + 1).astype(jnp.float32) / steps_per_epoch
    key = _term_key(states[0])
    views = _views(states, objectives, batch, dataset, (applies, variables, preps))

    new_states, losses, accuracies, terms = [], [], [], []
    for state, objective in zip(states, objectives):
        state, loss, accuracy, parts = _student_update(
            state, objective, images, labels, t_logits, t_features, progress,
            index=batch.get("index"), key=key, steps_per_epoch=steps_per_epoch,
            views=views if objective.views > 1 else ())
        new_states.append(state)
        losses.append(loss)
        accuracies.append(accuracy)
        terms.append(parts)
    metrics = {"loss": jnp.stack(losses), "accuracy": jnp.stack(accuracies),
               "terms": tuple(terms)}
    return tuple(new_states), metrics


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """K states of one architecture and optimiser as one state with a leading ``[K]`` axis.

    The static fields (``apply_fn``, ``tx``) are taken from the first state.
    """
    stacked = {field: jax.tree.map(lambda *x: jnp.stack(x), *[getattr(s, field) for s in states])
               for field in ("step", "params", "opt_state", "batch_stats", "rng", "aux_state")}
    return states[0].replace(**stacked)


def unstack_states(stacked: TrainState) -> tuple[TrainState, ...]:
    """The inverse of :func:`stack_states`."""
    k = jax.tree.leaves(stacked.params)[0].shape[0]
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(k))


def distill_step_vmap(stacked: TrainState, teacher_variables: Any,
                      batch: dict[str, jax.Array], *, objective: Objective,
                      teacher_apply: Callable | Sequence[Callable], dataset: str,
                      steps_per_epoch: int,
                      teacher_preprocess: Callable | Sequence[Callable | None] | None = None,
                      ) -> tuple[TrainState, dict[str, jax.Array]]:
    """K students of one architecture and objective as one ``jax.vmap``-ed update.

    ``stacked`` is :func:`stack_states` of the K states (they differ in initialisation).
    The teacher runs once, outside the vmap. Mathematically the same as
    :func:`distill_step_many`; which is faster depends on the backend (on XLA:CPU the
    batched convolutions are slower than K separate ones; see ``benchmarks/throughput.py``).
    Metrics have shape ``[K]``.
    """
    applies, variables, preps = _as_teachers(teacher_apply, teacher_variables,
                                             teacher_preprocess)
    first = jax.tree.map(lambda x: x[0], stacked)
    pixels = _augmented_pixels(first, batch, dataset)
    images = data.normalize(pixels, dataset=dataset)
    labels = batch["label"]
    t_logits, t_features = teacher_outputs(applies, variables, images,
                                           with_features=objective.needs_features,
                                           pixels=pixels, preprocess=preps)
    progress = (first.step + 1).astype(jnp.float32) / steps_per_epoch
    key = _term_key(first)
    views = _views((first,), (objective,), batch, dataset, (applies, variables, preps))

    def one(state):
        return _student_update(state, objective, images, labels, t_logits, t_features,
                               progress, index=batch.get("index"), key=key,
                               steps_per_epoch=steps_per_epoch, views=views)

    new, losses, accuracies, parts = jax.vmap(one)(stacked)
    k = losses.shape[0]
    terms = tuple({name: v[i] for name, v in parts.items()} for i in range(k))
    return new, {"loss": losses, "accuracy": accuracies, "terms": terms}


def distill_step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array], *,
                 objective: Objective, teacher_apply: Callable | Sequence[Callable],
                 dataset: str, steps_per_epoch: int,
                 teacher_preprocess: Callable | Sequence[Callable | None] | None = None,
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One distillation step of one student against frozen teacher(s).

    The teacher is applied with ``train=False`` to the same augmented batch as the student,
    is never differentiated and its ``batch_stats`` never change. ``steps_per_epoch`` turns
    the step into the epoch count that warm-ups (DKD) use. ``teacher_preprocess`` gives a
    teacher its own input normalisation (see :func:`distill_step_many`; pass
    ``kd_jax.pretrained.load(...).preprocess`` for a shipped teacher). Returns the new state and
    ``{"loss", "accuracy"}`` scalars plus ``"terms"``, each term's weighted part of the loss.
    """
    states, metrics = distill_step_many(
        (state,), teacher_variables, batch, objectives=(objective,),
        teacher_apply=teacher_apply, dataset=dataset, steps_per_epoch=steps_per_epoch,
        teacher_preprocess=teacher_preprocess)
    return states[0], {"loss": metrics["loss"][0], "accuracy": metrics["accuracy"][0],
                       "terms": metrics["terms"][0]}


def eval_step(variables: Any, batch: dict[str, jax.Array], *, apply_fn: Callable,
              dataset: str, preprocess: Callable | None = None) -> dict[str, jax.Array]:
    """Sums over the real examples of a (padded) batch: ``{"correct", "loss_sum", "count"}``.

    Sums rather than means, so the masked last batch of a test set adds up exactly. Images
    are normalised with ``preprocess`` (a model's own, e.g. a converted teacher's) or else
    ``dataset``'s statistics.
    """
    images = (data.normalize(batch["image"], dataset=dataset) if preprocess is None
              else preprocess(batch["image"]))
    logits = apply_fn(variables, images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    ce = cross_entropy(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(ce * mask),
            "count": jnp.sum(mask)}


def num_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
