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

from kd_jax.objectives._arguments import (_SHORTHANDS, _check_argument, _declared_checks,
                                            _hashable, _is_number)

FEATURE_CONVENTIONS = ("post_relu", "pre_relu")
# The optimisers an objective may ask for: ``"default"`` is the run's (OptimConfig's);
# ``"dot"`` is DOT (kd_jax.dot), which needs each term's gradient part.
OPTIMIZERS = ("default", "dot")
GRADIENT_PARTS = ("task", "distill")
_OPTIMIZER_ARGUMENTS = {"default": frozenset(), "dot": frozenset({"delta"})}


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


# The parameter groups a stage may train or an objective may freeze: the backbone (in a
# stage without its classifier, as RepDistiller's ``get_feat_modules``) and each term's head
# (``head_<term>``, or a part of it: ``head_<term>/<module>``).
BACKBONE = "backbone"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A first stage of an objective (RepDistiller's ``init_epochs``): for the first
    ``epochs`` epochs of the run only the parameters under ``trains`` change, minimising the
    sum of ``terms``; then the objective's own terms train with the run's optimiser, from
    fresh optimiser state, over the remaining epochs (the learning-rate schedule runs over
    those). ``trains`` names parameter groups: ``"backbone"`` (its feature layers: the
    classifier is left alone) or ``"head_<term>"`` (``"head_<term>/<module>"`` for a part
    of a head); their BatchNorm statistics move too, nobody else's. The stage's optimiser is
    the run's kind (SGD: momentum and weight decay) at a constant rate, ``lr_factor`` × the
    run's peak rate. :func:`kd_jax.objectives.resolve` scales ``epochs`` to the run's length
    as it does the warm-ups (30 of 240 epochs keep their share of a shorter run)."""

    epochs: float
    terms: tuple[Term, ...]
    trains: tuple[str, ...]
    lr_factor: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "trains", tuple(self.trains))
        object.__setattr__(self, "epochs", float(self.epochs))
        object.__setattr__(self, "lr_factor", float(self.lr_factor))
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            raise ValueError(f"a stage's epochs must be finite and > 0, got {self.epochs}.")
        if not math.isfinite(self.lr_factor) or self.lr_factor <= 0:
            raise ValueError(f"a stage's lr_factor must be finite and > 0, got "
                             f"{self.lr_factor}.")
        if not self.terms or not self.trains:
            raise ValueError("a stage needs at least one term and one parameter group to "
                             "train (trains=('backbone', 'head_<term>', ...)).")
        if any(t.part is not None for t in self.terms):
            raise ValueError("a stage's terms take no gradient part (part= is for the main "
                             "terms under optimizer='dot').")

    def steps(self, steps_per_epoch: int) -> int:
        """The stage's length in steps: ``epochs × steps_per_epoch``, at least 1."""
        return max(1, int(round(self.epochs * steps_per_epoch)))

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "trains": list(self.trains),
                "lr_factor": self.lr_factor,
                "terms": [{"name": t.name, "weight": t.weight, **t.arguments}
                          for t in self.terms]}


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

    ``stage`` is a first stage (:class:`Stage`: AB, FT, FSP). ``frozen`` names parameter
    groups (as ``Stage.trains`` does) that the objective's optimiser never changes after
    any stage: FT's paraphraser, the teacher's classifier inside SimKD's head.
    """

    terms: tuple[Term, ...] = dataclasses.field(default_factory=lambda: (Term("ce"),))
    features: str = "post_relu"
    optimizer: str = "default"
    optimizer_args: tuple[tuple[str, Any], ...] = ()
    stage: Stage | None = None
    frozen: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "optimizer_args",
                           tuple(sorted(_hashable(dict(self.optimizer_args)))))
        if self.features not in FEATURE_CONVENTIONS:
            raise ValueError(f"features must be one of {FEATURE_CONVENTIONS}, got "
                             f"{self.features!r}.")
        if not self.terms:
            raise ValueError("an objective needs at least one term.")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        names = [t.name for t in self.all_terms]
        if len(set(names)) != len(names):
            raise ValueError(f"each term may appear once in an objective (its stage "
                             f"included), got {names}.")
        groups = {BACKBONE} | {f"head_{t.name}" for t in self.all_terms
                               if t.spec.head is not None}
        for where, paths in (("frozen", self.frozen),
                             ("stage trains", self.stage.trains if self.stage else ())):
            for path in paths:
                if path.split("/")[0] not in groups:
                    raise ValueError(f"{where}: {path!r} is not a parameter group of this "
                                     f"objective; groups: {', '.join(sorted(groups))}.")
        predicting = [t.name for t in self.all_terms if t.spec.predicts]
        if len(predicting) > 1 or (predicting and predicting[0] not in
                                   {t.name for t in self.terms}):
            raise ValueError(f"at most one of the objective's own terms may give the "
                             f"student's prediction (an inference head), got {predicting}.")
        if (self.stage is not None or self.frozen) and self.optimizer != "default":
            raise ValueError("a stage or frozen parameters need optimizer='default'.")
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

    @property
    def all_terms(self) -> tuple[Term, ...]:
        """The objective's terms, then its stage's."""
        return self.terms + (self.stage.terms if self.stage is not None else ())

    @property
    def stage_objective(self) -> Objective:
        """What the stage minimises, as an objective of the stage's terms."""
        return Objective(self.stage.terms, features=self.features)

    def _uses(self, what: str) -> bool:
        return any(what in t.spec.uses for t in self.all_terms if t.weight > 0)

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
        return any(t.spec.head is not None for t in self.all_terms)

    @property
    def has_state(self) -> bool:
        return any(t.spec.state is not None for t in self.all_terms)

    @property
    def wraps_student(self) -> bool:
        """Whether the student is a :class:`~kd_jax.objectives.Student` (heads, a stage or
        frozen groups: its parameters are then grouped as ``backbone`` and ``head_*``)."""
        return self.has_heads or self.stage is not None or bool(self.frozen)

    @property
    def views(self) -> int:
        """How many augmented views of each batch the objective's terms need (MLKD: 2)."""
        return max((t.spec.views for t in self.all_terms if t.weight > 0), default=1)

    @property
    def predicting_term(self) -> Term | None:
        """The term whose head gives the deployed student's prediction (SimKD), if any."""
        return next((t for t in self.terms if t.spec.predicts), None)

    def as_dict(self) -> dict[str, Any]:
        """A JSON record: the convention and each term with every argument in effect."""
        record = {"features": self.features,
                  "terms": [{"name": t.name, "weight": t.weight,
                             "warmup_epochs": t.warmup_epochs, **t.arguments,
                             **({"part": t.part} if t.part is not None else {})}
                            for t in self.terms]}
        if self.optimizer != "default":
            record["optimizer"] = {"name": self.optimizer, **dict(self.optimizer_args)}
        if self.stage is not None:
            record["stage"] = self.stage.as_dict()
        if self.frozen:
            record["frozen"] = list(self.frozen)
        return record

    def gradient_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names of the ``"task"`` and of the ``"distill"`` terms (``optimizer="dot"``)."""
        return tuple(tuple(t.name for t in self.terms if t.part == p) for p in GRADIENT_PARTS)

    def term(self, name: str) -> Term:
        for t in self.all_terms:
            if t.name == name:
                return t
        raise KeyError(f"the objective has no term {name!r}; it has "
                       f"{', '.join(t.name for t in self.all_terms)}.")

    def replace_term(self, name: str, **changes) -> Objective:
        """A copy with term ``name``'s (or its stage's term ``name``'s) weight, warm-up or
        keyword arguments changed."""
        self.term(name)
        swap = lambda terms: tuple(t.replace(**changes) if t.name == name else t  # noqa: E731
                                   for t in terms)
        stage = self.stage
        if stage is not None:
            stage = dataclasses.replace(stage, terms=swap(stage.terms))
        return dataclasses.replace(self, terms=swap(self.terms), stage=stage)

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
    own head (a dict), ``heads`` every term's head output by term (FT's translator meets the
    paraphraser's factor), ``state`` its state, ``index`` the examples' positions in the
    training set, ``key`` a PRNG key of this step (for sampling), ``epoch`` the (float)
    epoch count that warm-ups use. ``views`` holds ``(student_logits, teacher_logits)`` of
    each further augmented view of the batch, for a term registered with ``views=2``
    (MLKD); the teacher sees each view too.
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
    heads: Mapping[str, Mapping[str, jax.Array]] | None = None
    views: tuple[tuple[jax.Array, jax.Array], ...] = ()


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
    objective's convention. ``predicts=True``: the head's ``"logits"`` are the student's
    prediction, in training and as deployed (SimKD's projector and the teacher's
    classifier); ``head_from_teacher(head_params, teacher_variables) -> head_params`` sets
    head parameters from the teacher once, at set-up (:func:`heads_from_teacher`).
    ``views``: how many augmented views of each batch the term needs (2: a weak and a
    strong one, MLKD).
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
    predicts: bool = False
    head_from_teacher: Callable[..., Any] | None = None
    views: int = 1


_REGISTRY: dict[str, TermSpec] = {}
_USES = frozenset({"teacher", "features", "index", "teacher_variables"})
# What a head sees: the stage maps of the objective's convention, or the models' pre-ReLU
# stage maps whatever the convention (OFD's connectors).
HEAD_INPUTS = ("convention", "pre_relu")


def register_term(name: str, fn: Callable | None = None, *, uses: Sequence[str] = ("teacher",),
                  defaults: Mapping[str, Any] | None = None, head: Callable | None = None,
                  state: Callable | None = None, checks: Mapping[str, str] | None = None,
                  shorthands: Sequence[str] = (), epoch_arguments: Sequence[str] = (),
                  head_inputs: str = "convention", predicts: bool = False,
                  head_from_teacher: Callable | None = None, views: int = 1,
                  replace: bool = False):
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
    if (predicts or head_from_teacher is not None) and head is None:
        raise ValueError(f"term {name!r}: predicts and head_from_teacher need a head.")
    if views not in (1, 2):
        raise ValueError(f"term {name!r}: views must be 1 or 2, got {views!r}.")
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
                                   head_inputs, predicts, head_from_teacher, views)
        return fn

    return register if fn is None else register(fn)


def registered_terms() -> dict[str, TermSpec]:
    """Every registered term by name."""
    return dict(_REGISTRY)
