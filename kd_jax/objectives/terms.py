"""Objectives as weighted registered terms: the configuration, the registry and the evaluation.

An :class:`Objective` is a tuple of :class:`Term` s: each names a *registered* term (a loss
with its keyword arguments), a weight and an optional linear warm-up. The registry
(:func:`register_term`) maps a name to a :class:`TermSpec`: the function that evaluates it,
what it uses (the teacher, the features, the examples' positions in the training set), its
arguments' defaults and constraints, its trainable head and its non-trainable state.
:func:`init_state` builds the state, :func:`evaluate_objective` returns the loss, each term's
part of it and the new state.

Feature convention: RepDistiller's weights are calibrated on stage maps taken after the
stage's final ReLU (``preact=False``); ``Objective(features="post_relu")`` (the default,
used by every preset) does that, ``"pre_relu"`` passes the models' ``stageN`` outputs as
they are. ``stem`` and ``pooled`` are post-ReLU in both.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_CONVENTIONS = ("post_relu", "pre_relu")
# The optimisers an objective may ask for: ``"default"`` is the run's (OptimConfig's);
# ``"dot"`` is DOT (kd_jax.dot), which needs each term's gradient part.
OPTIMIZERS = ("default", "dot")
GRADIENT_PARTS = ("task", "distill")
_OPTIMIZER_ARGUMENTS = {"default": frozenset(), "dot": frozenset({"delta"})}


def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# ------------------------------------------------------------------ argument checks

# The constraints a term may declare on a numeric argument (``register_term(checks=...)``):
# the test and what the error says when it fails. A numeric argument without one must be >= 0.
_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "nonnegative": (lambda v: v >= 0, "must be >= 0"),
}
# The keywords of :func:`kd_jax.objectives.resolve` that set an argument of the terms that
# declare it (``register_term(shorthands=...)``).
_SHORTHANDS = frozenset({"temperature"})


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_argument(term: str, key: str, value, default, check: str = "nonnegative") -> None:
    """A numeric argument must be a finite number of its default's kind (an integer for an
    integer default) passing ``check``; any other one of its default's type."""
    where = f"term {term!r}: {key}"
    if not _is_number(default):
        if not isinstance(value, type(default)):
            raise ValueError(f"{where} must be a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}.")
        return
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    if isinstance(default, int) and not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}.")
    holds, requirement = _CHECKS[check]
    if not holds(value):
        raise ValueError(f"{where} {requirement}, got {value}.")


# ------------------------------------------------------------------ terms and objectives

@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted part of an objective: ``weight · warm(epoch) · name(**kwargs)``.

    ``name`` is a registered term (:func:`registered_terms`); ``kwargs`` its keyword
    arguments as ``((key, value), ...)`` (unset ones take the registration's defaults);
    ``warmup_epochs > 0`` ramps the weight linearly from 0 over that many epochs, counted
    continuously from the step (DKD's and ReviewKD's warm-up). ``part`` is the gradient
    the term's loss belongs to under an objective with ``optimizer="dot"``: ``"task"`` or
    ``"distill"`` (``None`` otherwise). Build one with ``Term.of("kd", 0.9, temperature=4.0)``.
    """

    name: str
    weight: float = 1.0
    kwargs: tuple[tuple[str, Any], ...] = ()
    warmup_epochs: float = 0.0
    part: str | None = None

    @classmethod
    def of(cls, name: str, weight: float = 1.0, *, warmup_epochs: float = 0.0,
           part: str | None = None, **kwargs) -> Term:
        return cls(name, float(weight), _hashable(kwargs), float(warmup_epochs), part)

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
            _check_argument(self.name, k, kwargs[k], spec.defaults[k],
                            spec.checks.get(k, "nonnegative"))
        object.__setattr__(self, "kwargs", tuple(sorted(_hashable(kwargs))))
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "warmup_epochs", float(self.warmup_epochs))
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"term {self.name!r}: weight must be finite and >= 0, got "
                             f"{self.weight}.")
        if not math.isfinite(self.warmup_epochs) or self.warmup_epochs < 0:
            raise ValueError(f"term {self.name!r}: warmup_epochs must be finite and >= 0, got "
                             f"{self.warmup_epochs}.")
        if self.part is not None and self.part not in GRADIENT_PARTS:
            raise ValueError(f"term {self.name!r}: part must be one of {GRADIENT_PARTS} (or "
                             f"None), got {self.part!r}.")

    @property
    def spec(self) -> TermSpec:
        return _REGISTRY[self.name]

    @property
    def arguments(self) -> dict[str, Any]:
        """The term's keyword arguments: the registration's defaults, then ``kwargs``."""
        return {**self.spec.defaults, **dict(self.kwargs)}

    def replace(self, **changes) -> Term:
        """A copy with ``weight``/``warmup_epochs``/``part`` and keyword arguments changed."""
        weight = changes.pop("weight", self.weight)
        warmup = changes.pop("warmup_epochs", self.warmup_epochs)
        part = changes.pop("part", self.part)
        return Term(self.name, float(weight), tuple({**dict(self.kwargs), **changes}.items()),
                    float(warmup), part)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a student minimises: the sum of its terms (each name at most once).

    ``features`` picks the stage-map convention of the feature terms, see the module
    docstring. ``optimizer`` is a gradient-level capability: ``"default"`` trains with the
    run's optimiser (one gradient of the summed loss); ``"dot"`` with DOT
    (:func:`kd_jax.dot.dot`, Zhao et al. 2023): the gradient of the ``"task"`` terms and
    that of the ``"distill"`` terms (each term's ``part``) are taken apart and get their own
    momentum; ``optimizer_args`` its arguments (``(("delta", 0.075),)``; momentum, weight
    decay and schedule are the run's). :func:`kd_jax.train.make_optimizer` builds it.
    """

    terms: tuple[Term, ...] = dataclasses.field(default_factory=lambda: (Term("ce"),))
    features: str = "post_relu"
    optimizer: str = "default"
    optimizer_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "optimizer_args",
                           tuple(sorted(_hashable(dict(self.optimizer_args)))))
        if self.features not in FEATURE_CONVENTIONS:
            raise ValueError(f"features must be one of {FEATURE_CONVENTIONS}, got "
                             f"{self.features!r}.")
        if not self.terms:
            raise ValueError("an objective needs at least one term.")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"each term may appear once in an objective, got {names}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        accepted = _OPTIMIZER_ARGUMENTS[self.optimizer]
        unknown = sorted(set(dict(self.optimizer_args)) - accepted)
        if unknown:
            raise ValueError(f"optimizer {self.optimizer!r} takes no argument "
                             f"{', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(accepted)) or 'none'}.")
        if self.optimizer == "dot":
            missing = [t.name for t in self.terms if t.part is None]
            if missing:
                raise ValueError(f"optimizer 'dot' needs each term's gradient part: set "
                                 f"part='task' or part='distill' on {', '.join(missing)}.")
        else:
            parted = [t.name for t in self.terms if t.part is not None]
            if parted:
                raise ValueError(f"terms {', '.join(parted)} set a gradient part, which only "
                                 "optimizer='dot' uses; drop part or use optimizer='dot'.")

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
    def set_up_from_teacher(self) -> bool:
        """Whether a term's state comes from the teacher's variables (OFD's margins)."""
        return any("teacher_variables" in t.spec.uses for t in self.terms)

    @property
    def has_heads(self) -> bool:
        return any(t.spec.head is not None for t in self.terms)

    @property
    def has_state(self) -> bool:
        return any(t.spec.state is not None for t in self.terms)

    def as_dict(self) -> dict[str, Any]:
        """A JSON record: the convention and each term with every argument in effect."""
        record = {"features": self.features,
                  "terms": [{"name": t.name, "weight": t.weight,
                             "warmup_epochs": t.warmup_epochs, **t.arguments,
                             **({"part": t.part} if t.part is not None else {})}
                            for t in self.terms]}
        if self.optimizer != "default":
            record["optimizer"] = {"name": self.optimizer, **dict(self.optimizer_args)}
        return record

    def gradient_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of the ``"task"`` and of the ``"distill"`` terms (``optimizer="dot"``)."""
        return tuple(tuple(t.name for t in self.terms if t.part == p) for p in GRADIENT_PARTS)

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


# ------------------------------------------------------------------ the registry

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
    is the old one; no gradient flows into it). ``checks`` the constraint of each numeric
    argument (``"positive"``, ``"unit"`` or ``"nonnegative"``, the default);
    ``shorthands`` the arguments that :func:`kd_jax.objectives.resolve`'s keyword of the
    same name sets (``"temperature"`` for the logit terms); ``epoch_arguments`` the
    arguments that are a number of epochs of the authors' schedule, which
    :func:`kd_jax.objectives.resolve` scales to the run's length as it does the warm-ups
    (CTKD's ``lambda_epochs``). A term whose ``uses`` hold ``"teacher_variables"`` is
    set up from the teacher: its ``state`` function also receives ``teacher`` (the module)
    and ``teacher_variables`` (OFD's margins from the teacher's BatchNorm).
    ``head_inputs="pre_relu"``: the head sees the models' pre-ReLU stage maps whatever the
    objective's convention.
    """

    name: str
    fn: Callable[..., jax.Array]
    uses: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    head: Callable[..., nn.Module] | None = None
    state: Callable[..., Any] | None = None
    checks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    shorthands: frozenset[str] = frozenset()
    epoch_arguments: frozenset[str] = frozenset()
    head_inputs: str = "convention"


_REGISTRY: dict[str, TermSpec] = {}
_USES = frozenset({"teacher", "features", "index", "teacher_variables"})
# What a head sees: the stage maps of the objective's convention, or the models' pre-ReLU
# stage maps whatever the convention (OFD's connectors).
HEAD_INPUTS = ("convention", "pre_relu")


def _declared_checks(name: str, defaults: Mapping[str, Any],
                     checks: Mapping[str, str]) -> dict[str, str]:
    """Every numeric argument's check: the declared one, else ``"nonnegative"``."""
    for key, check in checks.items():
        if key not in defaults:
            raise ValueError(f"term {name!r}: checks names {key!r}, which is not one of its "
                             f"arguments ({', '.join(sorted(defaults)) or 'none'}).")
        if check not in _CHECKS:
            raise ValueError(f"term {name!r}: the check of {key} must be one of "
                             f"{', '.join(sorted(_CHECKS))}, got {check!r}.")
        if not _is_number(defaults[key]):
            raise ValueError(f"term {name!r}: checks apply to numeric arguments; {key}'s "
                             f"default is {defaults[key]!r}.")
        _check_argument(name, key, defaults[key], defaults[key], check)  # a default meets it
    return {key: checks.get(key, "nonnegative") for key, default in defaults.items()
            if _is_number(default)}


def register_term(name: str, fn: Callable | None = None, *, uses: Sequence[str] = ("teacher",),
                  defaults: Mapping[str, Any] | None = None, head: Callable | None = None,
                  state: Callable | None = None, checks: Mapping[str, str] | None = None,
                  shorthands: Sequence[str] = (), epoch_arguments: Sequence[str] = (),
                  head_inputs: str = "convention", replace: bool = False):
    """Registers term ``name`` (usable as a decorator on ``fn``). See :class:`TermSpec`.

    ``checks`` maps a numeric argument to ``"positive"`` (> 0), ``"unit"`` (in [0, 1]) or
    ``"nonnegative"`` (>= 0, what an argument without one gets); every argument must also
    be of its default's kind (a finite number, an integer for an integer default).
    """
    unknown = set(uses) - _USES
    if unknown:
        raise ValueError(f"uses must be a subset of {sorted(_USES)}, got {sorted(unknown)}.")
    defaults = dict(defaults or {})
    checks = _declared_checks(name, defaults, dict(checks or {}))
    for key in shorthands:
        if key not in _SHORTHANDS or key not in defaults:
            raise ValueError(f"term {name!r}: shorthands must be arguments of the term among "
                             f"{', '.join(sorted(_SHORTHANDS))}, got {key!r}.")
    if head_inputs not in HEAD_INPUTS:
        raise ValueError(f"term {name!r}: head_inputs must be one of {HEAD_INPUTS}, got "
                         f"{head_inputs!r}.")
    if "teacher_variables" in uses and state is None:
        raise ValueError(f"term {name!r}: uses 'teacher_variables' is for a term whose state "
                         "is set up from the teacher; pass state=.")
    for key in epoch_arguments:
        if key not in defaults or not _is_number(defaults[key]) or \
                isinstance(defaults[key], int):
            raise ValueError(f"term {name!r}: epoch_arguments must be float arguments of the "
                             f"term ({', '.join(sorted(defaults)) or 'none'}), got {key!r}.")

    def register(fn):
        if name in _REGISTRY and not replace:
            raise ValueError(f"term {name!r} is already registered; pass replace=True.")
        _REGISTRY[name] = TermSpec(name, fn, frozenset(uses), defaults, head, state, checks,
                                   frozenset(shorthands), frozenset(epoch_arguments),
                                   head_inputs)
        return fn

    return register if fn is None else register(fn)


def registered_terms() -> dict[str, TermSpec]:
    """Every registered term by name."""
    return dict(_REGISTRY)


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
    for i, term in enumerate(objective.terms):
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
