"""What a configuration runs, before anything runs: its checks, jobs, passes, objectives and
the keys of its phases' directories."""

from __future__ import annotations

import hashlib
import json
import math

from kd_jax.experiment.config import ConfigError, ExperimentConfig, flag, flat

__all__ = ["NOT_IN_ANY_KEY", "NOT_IN_STUDENTS_KEY", "NOT_IN_TEACHER_KEY", "key_hash",
           "split_passes", "student_jobs", "student_objective", "students_key", "teacher_key",
           "validate"]


def validate(config: ExperimentConfig) -> None:
    """Raises :class:`ConfigError` (one line) for every mistake in ``config`` that can be
    caught before anything runs or is written."""
    from kd_jax import data, models, objectives
    settings = flat(config)
    try:
        spec = data.spec(config.data.dataset)
    except ValueError as err:
        raise ConfigError(f"--dataset: {err}") from err
    if spec.host_augmented:
        for name in ("train_subset", "test_subset"):
            if settings[name] is not None:
                raise ConfigError(f"{flag(name)} applies to CIFAR; for {config.data.dataset} "
                                  "use a smaller image folder (--dataset folder:PATH).")
    elif settings["image_size"] not in (None, spec.image_size):
        raise ConfigError(f"--image-size {settings['image_size']}: {config.data.dataset} images "
                          f"are {spec.image_size} pixels (omit --image-size).")
    for name in ("image_size", "workers"):
        if settings[name] is not None and settings[name] < (1 if name == "image_size" else 0):
            raise ConfigError(f"{flag(name)} must be at least {int(name == 'image_size')}, "
                              f"got {settings[name]}.")
    for role in ("teacher", "student"):
        arch = settings[role]
        if arch not in models.available():
            raise ConfigError(f"unknown {role} architecture {arch!r}; choose from "
                              f"{', '.join(models.available())}.")
    # objectives.METHODS: the presets plus any a --config file registered.
    unknown = [m for m in config.objective.methods if m not in objectives.METHODS]
    if unknown or not config.objective.methods:
        raise ConfigError(f"unknown method {', '.join(unknown) or '(empty)'}; --method takes "
                          f"a comma list of {', '.join(objectives.METHODS)}.")
    for name in ("epochs", "batch_size", "seeds", "max_parallel_students", "log_every",
                 "lr_batch_size", "eval_batch_size"):
        if settings[name] < 1:
            raise ConfigError(f"{flag(name)} must be at least 1, got {settings[name]}.")
    if config.teacher_epochs_ < 1:
        raise ConfigError(f"--teacher-epochs must be at least 1, got {config.teacher_epochs_}.")
    if config.objective.alpha is not None and not 0 <= config.objective.alpha <= 1:  # NaN too
        raise ConfigError(f"--alpha must be in [0, 1], got {config.objective.alpha}.")
    for name in ("temperature", "lr"):
        value = settings[name]
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag(name)} must be a finite number > 0, got {value}.")
    for name in ("weight_decay", "momentum", "warmup_epochs"):
        value = settings[name]
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag(name)} must be a finite number >= 0, got {value}.")
    if config.run.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {config.run.seed}.")
    o = config.optim
    if not (math.isfinite(o.decay_factor) and o.decay_factor > 0) \
            or any(not 0 < m < 1 for m in o.milestones):
        raise ConfigError(f"--milestones must be fractions in (0, 1) and --decay-factor > 0, "
                          f"got {o.milestones} and {o.decay_factor}.")
    for name in ("train_subset", "test_subset"):
        value = settings[name]
        if value is not None and value < 1:
            raise ConfigError(f"{flag(name)} must be at least 1 (omit it for the whole "
                              f"split), got {value}.")
    seeds = config.run.seeds_per_method
    if any(m not in objectives.METHODS for m, _ in seeds) or any(n < 1 for _, n in seeds):
        raise ConfigError(f"seeds_per_method {seeds} must name methods of "
                          f"{', '.join(objectives.METHODS)} with at least 1 seed each.")
    if config.run.student_shortcut is not None and not config.run.student.startswith("resnet"):
        raise ConfigError(f"--student-shortcut applies to ResNet students, not "
                          f"{config.run.student}.")
    _validate_terms(config)


def _validate_terms(config: ExperimentConfig) -> None:
    """Every --term override parses, names a term of some chosen method and gives it valid
    values; every method's objective builds."""
    from kd_jax import objectives
    methods = list(dict.fromkeys(("none",) + tuple(config.objective.methods)))
    present = {t.name for m in methods for t in objectives.METHODS[m].all_terms}
    for assignment in config.objective.terms:
        try:
            name, _, _ = objectives.parse_override(assignment)
        except ValueError as err:
            raise ConfigError(f"--term: {err}") from err
        if name not in present:
            raise ConfigError(f"--term {assignment}: no chosen method has a {name!r} term; the "
                              f"terms of {', '.join(methods)} are {', '.join(sorted(present))}.")
    for m in methods:
        try:
            student_objective(m, config)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"method {m} with --term {','.join(config.objective.terms)}: "
                              f"{str(err).strip(chr(34))}") from err


def student_objective(method: str, config: ExperimentConfig):
    """The objective the experiment trains for ``method``: :func:`kd_jax.objectives.resolve`
    with the configuration's epochs, ``--temperature``, ``--alpha`` and ``--term`` overrides."""
    from kd_jax import objectives
    o = config.objective
    return objectives.resolve(method, epochs=config.schedule.epochs, temperature=o.temperature,
                              alpha=o.alpha, terms=o.terms)


def student_jobs(config: ExperimentConfig) -> list[tuple[str, int]]:
    """``(method, seed)`` of every student: the baseline first, no method twice."""
    methods = list(dict.fromkeys(("none",) + tuple(config.objective.methods)))
    seeds = dict(config.run.seeds_per_method)
    return [(m, config.run.seed + s) for m in methods
            for s in range(seeds.get(m, config.run.seeds))]


def split_passes(jobs: list, cap: int) -> list[list]:
    """Splits the jobs into as few passes as ``cap`` allows, of near-equal sizes."""
    n = math.ceil(len(jobs) / cap)
    size = math.ceil(len(jobs) / n)
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def key_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# Settings that cannot change what a phase computes (logging, grouping, evaluation batching,
# where the data is read from) or that the phase's key holds in resolved form. Everything else
# of the configuration keys the phase's directory, so a new setting changes the keys unless
# it is listed here.
NOT_IN_ANY_KEY = ("log_every", "eval_batch_size", "max_parallel_students", "data_dir",
                  "workers")
# The teacher phase does not see the students' settings; its epochs are resolved.
NOT_IN_TEACHER_KEY = NOT_IN_ANY_KEY + (
    "student", "student_shortcut", "methods", "seeds", "seeds_per_method", "temperature",
    "alpha", "terms", "teacher_checkpoint", "epochs", "teacher_epochs")
# A students pass holds its (method, seed) jobs; its teacher is keyed by content or its key.
NOT_IN_STUDENTS_KEY = NOT_IN_ANY_KEY + (
    "methods", "seeds", "seeds_per_method", "teacher_checkpoint", "teacher_epochs")


def _config_without(config: ExperimentConfig, excluded) -> dict:
    """The whole configuration by setting name, minus ``excluded`` (JSON types)."""
    return json.loads(json.dumps({k: v for k, v in flat(config).items() if k not in excluded}))


def teacher_key(config: ExperimentConfig) -> dict:
    return {**_config_without(config, NOT_IN_TEACHER_KEY),
            "teacher_epochs": config.teacher_epochs_}


def students_key(config: ExperimentConfig, teacher_summary: dict, jobs) -> dict:
    teacher = ({"checkpoint_sha256": teacher_summary["checkpoint_sha256"]}
               if config.run.teacher_checkpoint else teacher_key(config))
    return {**_config_without(config, NOT_IN_STUDENTS_KEY), "teacher": teacher,
            "jobs": [list(j) for j in jobs]}
