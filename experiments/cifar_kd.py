"""Train a teacher, a baseline student and distilled students on CIFAR; print the table.

    python experiments/cifar_kd.py                       # CIFAR-10, resnet56 -> resnet20, KD
    python experiments/cifar_kd.py --preset smoke --data-dir ../shared/tfds
    python experiments/cifar_kd.py --method none,kd,dkd,dist --seeds 3

Phases: (1) the teacher, trained from labels (or loaded with ``--teacher-checkpoint``);
(2) the students: the baseline (``none``) and every distilled method, ``--seeds`` seeds
each, trained K at a time in one compiled step that runs the teacher once per batch.
Every phase checkpoints under ``--workdir``; rerunning the same command resumes and skips
finished phases, and a finished run prints its stored table at once.

Outputs in the workdir: ``results.json``, ``results.md``, ``metrics.jsonl``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

# Runs from a checkout without installation too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# kd_jax.objectives.METHODS, spelled out so that --help needs no JAX (a test keeps them equal).
METHOD_NAMES = ("none", "kd", "dkd", "dist", "lskd", "fitnet", "at", "nst", "sp", "rkd", "pkt",
                "vid", "cc", "crd", "reviewkd")


class UsageError(Exception):
    """A mistake in the command line or the environment; reported in one line."""


def _opt(default, help, **meta):
    """A configuration field: its default, its flag's help, and flag metadata (``flag``: the
    flag's name when it is not the field's, ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("cifar10", "dataset", choices=("cifar10", "cifar100"))
    batch_size: int = _opt(64, "global batch size")
    train_subset: int | None = _opt(
        None, "use N training images, the first N/classes of each class (default: all)")
    test_subset: int | None = _opt(None, "evaluate on N test images, class-balanced "
                                         "(default: all)")
    eval_batch_size: int = _opt(500, "evaluation batch size")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    optimizer: str = _opt("sgd", "optimiser", choices=("sgd", "adam"))
    lr: float = _opt(0.05, "learning rate at --lr-batch-size images, scaled linearly with the "
                           "batch size")
    lr_batch_size: int = _opt(64, "the batch size --lr refers to")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(5e-4, "weight decay (L2 for SGD, decoupled for Adam)")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = _opt(240, "student epochs")
    teacher_epochs: int | None = _opt(None, "teacher epochs (default: --epochs)")
    schedule: str = _opt("step", "learning-rate schedule (step: x--decay-factor at "
                                 "--milestones, fractions of the run)",
                         choices=("step", "cosine", "onecycle", "constant"))
    milestones: tuple[float, ...] = _opt((150 / 240, 180 / 240, 210 / 240),
                                         "step schedule: comma list of fractions of the run")
    decay_factor: float = _opt(0.1, "step schedule: the rate's factor at each milestone")
    warmup_epochs: float = _opt(0.0, "linear warm-up epochs")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    methods: tuple[str, ...] = _opt(("kd",), f"comma list of {','.join(METHOD_NAMES)}; 'none' "
                                             "is the baseline student, always added",
                                    flag="method")
    temperature: float | None = _opt(None, "distillation temperature of kd, dkd, dist, lskd "
                                           "(default: each method's; 4, lskd 2)")
    alpha: float | None = _opt(None, "KD: weight of the distillation term, CE gets 1-alpha "
                                     "(default 0.9)")
    terms: tuple[str, ...] = _opt(
        (), "term overrides TERM.KEY=VALUE, comma list, applied to every method with that term "
            "(KEY: weight, warmup_epochs or the term's argument), e.g. kd.temperature=5,"
            "crd.num_negatives=4096", flag="term")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    teacher: str = _opt("resnet56", "teacher architecture")
    student: str = _opt("resnet20", "student architecture")
    student_shortcut: str | None = _opt(
        None, "ResNet student's shortcut: A zero-padded identity (default of resnetN), B 1x1 "
              "conv + BN (RepDistiller's, chenyaofo's)", choices=("A", "B"))
    teacher_checkpoint: str | None = _opt(
        None, "distil from this teacher instead of training one: a shipped published teacher "
              "(pretrained:cifar10/resnet20, pretrained:cifar10/resnet56, "
              "pretrained:cifar100/resnet56), a checkpoint written by python -m kd_jax.convert, "
              "or <workdir>/teacher_*/final")
    dtype: str = _opt("auto", "compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)",
                      choices=("auto", "float32", "bfloat16"))
    seed: int = _opt(0, "base seed")
    seeds: int = _opt(1, "seeds per method, reported as mean ± std")
    seeds_per_method: tuple[tuple[str, int], ...] = _opt(
        (), "per-method seed counts overriding --seeds, e.g. dkd=1,dist=1")
    max_parallel_students: int = _opt(8, "at most K students per compiled step")
    log_every: int = _opt(50, "steps between logged metrics")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on, in one object: the flags, ``--config`` files, presets,
    ``config.json``, the records and the run directories' keys all derive from it. Field names
    are unique across sections; each is the flag ``--field-name`` (or its ``flag``)."""

    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    run: RunConfig = RunConfig()

    @property
    def teacher_epochs_(self) -> int:
        s = self.schedule
        return s.epochs if s.teacher_epochs is None else s.teacher_epochs


SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


def _leaves() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every setting's name -> (its section, its field)."""
    out = {}
    for section in dataclasses.fields(ExperimentConfig):
        for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                    else type(section.default)):
            assert f.name not in out, f"setting {f.name} is in two sections"
            out[f.name] = (section.name, f)
    return out


LEAVES = _leaves()


def flat(config: ExperimentConfig) -> dict[str, Any]:
    """``{setting: value}`` over all sections."""
    return {name: getattr(getattr(config, section), name)
            for name, (section, _) in LEAVES.items()}


def configure(base: ExperimentConfig | None = None, **settings) -> ExperimentConfig:
    """``base`` (default: the defaults) with settings replaced by name, whatever section."""
    base = base or ExperimentConfig()
    by_section: dict[str, dict] = {}
    for name, value in settings.items():
        if name not in LEAVES:
            raise UsageError(f"unknown setting {name!r}; settings: {', '.join(LEAVES)}.")
        by_section.setdefault(LEAVES[name][0], {})[name] = _coerce(name, value)
    return dataclasses.replace(base, **{
        s: dataclasses.replace(getattr(base, s), **v) for s, v in by_section.items()})


def _coerce(name: str, value):
    """JSON/flag values in the field's type (lists -> tuples)."""
    if name == "seeds_per_method":
        if isinstance(value, str):
            pairs = [p.split("=") for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise UsageError(f"--seeds-per-method takes method=N pairs, got {value!r}.")
            value = [(m.strip(), n) for m, n in pairs]
        try:
            return tuple((str(m), int(n)) for m, n in (value.items() if isinstance(value, dict)
                                                       else value))
        except (TypeError, ValueError) as err:
            raise UsageError(f"seeds_per_method must be method=N pairs, got {value!r}.") from err
    if name in ("methods", "terms") and isinstance(value, str):
        return tuple(m.strip() for m in value.split(",") if m.strip())
    if name == "milestones" and isinstance(value, str):
        try:
            return tuple(float(m) for m in value.split(",") if m.strip())
        except ValueError as err:
            raise UsageError(f"--milestones takes a comma list of fractions, got {value!r}.") \
                from err
    if isinstance(value, list):
        return tuple(value)
    return value


def _flag(name: str) -> str:
    return "--" + LEAVES[name][1].metadata.get("flag", name).replace("_", "-")


# Presets are configurations. The CRD benchmark recipe (Tian et al. 2020) is the default.
PRESETS: dict[str, ExperimentConfig] = {
    "default": ExperimentConfig(),
    # All phases on 1,000 images with tiny models: about 80 s on a 2-core CPU. A batch of 48
    # splits evenly over 1, 2, 3, 4, 6, 8, 12, 16 devices.
    "smoke": configure(teacher="resnet14", student="resnet8", methods=("kd",), epochs=2,
                       teacher_epochs=3, batch_size=48, lr=0.1, lr_batch_size=128,
                       schedule="cosine", train_subset=1000, test_subset=500, log_every=5,
                       eval_batch_size=250),
    # The blog post this project grew from, with its bugs fixed (see README).
    "seed": configure(teacher="resnet18", student="resnet18", methods=("kd",), epochs=100,
                      batch_size=128, optimizer="adam", lr=1e-3, lr_batch_size=128,
                      weight_decay=0.0, schedule="constant", temperature=5.0, alpha=0.5),
    # The CPU protocols (results/cifar10-cpu, results/cifar100-cpu): the published teachers
    # shipped with kd_jax, resnet8 students, about 100 min on a 2-core CPU each.
    "cifar10-cpu": configure(teacher="resnet56", teacher_checkpoint="pretrained:cifar10/resnet56",
                             student="resnet8", methods=("none", "kd", "dkd", "dist"),
                             epochs=5, batch_size=128, lr=0.1, lr_batch_size=128, nesterov=True,
                             weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0, seeds=2,
                             seeds_per_method=(("dkd", 1), ("dist", 1))),
    "cifar100-cpu": configure(dataset="cifar100", teacher="resnet56",
                              teacher_checkpoint="pretrained:cifar100/resnet56",
                              student="resnet8", student_shortcut="B",
                              methods=("none", "kd", "dkd", "dist", "fitnet", "at"),
                              epochs=5, batch_size=128, lr=0.1, lr_batch_size=128,
                              nesterov=True, weight_decay=5e-4, schedule="cosine",
                              warmup_epochs=1.0, seeds=2,
                              seeds_per_method=(("dkd", 1), ("dist", 1), ("fitnet", 1),
                                                ("at", 1))),
}


# --------------------------------------------------------------------------- CLI

def _type_of(f: dataclasses.Field):
    """The argparse type of a setting (from its default and annotation)."""
    text = str(f.type)
    if "tuple" in text:
        return str  # comma lists, coerced by configure
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from ``path``: JSON (nested by section as in ``config.json``, or flat) or a
    Python file defining ``config`` (an :class:`ExperimentConfig` or a dict of settings)."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                raw = json.load(f)
        elif path.endswith(".py"):
            namespace: dict[str, Any] = {"ExperimentConfig": ExperimentConfig,
                                         "configure": configure, "PRESETS": PRESETS}
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102 — the user's own file
            if "config" not in namespace:
                raise UsageError(f"--config {path} defines no `config`.")
            raw = namespace["config"]
        else:
            raise UsageError(f"--config {path}: use a .json or .py file.")
    except (OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"--config {path} cannot be read ({type(err).__name__}: {err}).") \
            from err
    if isinstance(raw, ExperimentConfig):
        return flat(raw)
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path} must hold settings (a JSON object or a dict).")
    settings = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            settings.update(value)
        else:
            settings[key] = value
    return settings


def parse_args(argv=None) -> tuple[ExperimentConfig, argparse.Namespace]:
    """The configuration: ``--preset``, then ``--config``, then flags; flags derive from the
    fields of :class:`ExperimentConfig`."""
    d = flat(ExperimentConfig())
    p = argparse.ArgumentParser(
        prog="cifar_kd.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="a named configuration; --config and flags override its values "
                        "(default: default, the CRD recipe)")
    p.add_argument("--config", default=None,
                   help="a configuration file: .json (like a workdir's config.json, or flat "
                        "settings) or .py defining `config`; flags override it")
    p.add_argument("--data-dir", default=None,
                   help="a prepared TFDS data directory (default: $TFDS_DATA_DIR, else "
                        "~/tensorflow_datasets)")
    p.add_argument("--workdir", default=None,
                   help="where checkpoints and results go (default runs/<dataset>_<teacher>_"
                        "<student>)")
    for name, (section, f) in LEAVES.items():
        kind = _type_of(f)
        default = d[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if name == "seeds_per_method":
            shown = ",".join(f"{m}={n}" for m, n in default) or "none"
        help = f.metadata["help"]
        if "default" not in help:
            help += f" (default {shown})"
        kwargs = dict(default=None, dest=name, help=help)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        p.add_argument(_flag(name), **kwargs)
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0 (default: detected from the "
                        "cluster environment)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the one-line epoch summaries stay)")
    args = p.parse_args(argv)

    config = PRESETS[args.preset]
    from_file = {}
    try:
        if args.config:
            from_file = load_config_file(args.config)
            config = configure(config, **from_file)
        given = {name: getattr(args, name) for name in LEAVES if getattr(args, name) is not None}
        if "seeds" in given and "seeds_per_method" not in given:
            given["seeds_per_method"] = ()  # an explicit --seeds applies to every method
        config = configure(config, **given)
    except UsageError as err:
        p.exit(2, f"cifar_kd.py: error: {err}\n")
    args.given = set(given) | set(from_file)  # settings the user chose, not the preset
    return config, args


def validate(config: ExperimentConfig, args) -> None:
    """Catches every mistake that can be caught before anything runs."""
    from kd_jax import models
    settings = flat(config)
    for role in ("teacher", "student"):
        arch = settings[role]
        if arch not in models.available():
            raise UsageError(f"unknown {role} architecture {arch!r}; choose from "
                             f"{', '.join(models.available())}.")
    from kd_jax import objectives  # its METHODS: the presets plus any a --config file registered
    unknown = [m for m in config.objective.methods if m not in objectives.METHODS]
    if unknown or not config.objective.methods:
        raise UsageError(f"unknown method {', '.join(unknown) or '(empty)'}; --method takes a "
                         f"comma list of {', '.join(objectives.METHODS)}.")
    for name in ("epochs", "batch_size", "seeds", "max_parallel_students", "log_every",
                 "lr_batch_size", "eval_batch_size"):
        if settings[name] < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {settings[name]}.")
    if config.teacher_epochs_ < 1:
        raise UsageError(f"--teacher-epochs must be at least 1, got {config.teacher_epochs_}.")
    if config.objective.alpha is not None and not 0 <= config.objective.alpha <= 1:  # NaN fails too
        raise UsageError(f"--alpha must be in [0, 1], got {config.objective.alpha}.")
    positive = {"temperature": config.objective.temperature, "lr": config.optim.lr}
    for name, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number > 0, got "
                             f"{value}.")
    non_negative = {"weight_decay": config.optim.weight_decay, "momentum": config.optim.momentum,
                    "warmup_epochs": config.schedule.warmup_epochs}
    for name, value in non_negative.items():
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got "
                             f"{value}.")
    if config.run.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {config.run.seed}.")
    if not (math.isfinite(config.schedule.decay_factor) and config.schedule.decay_factor > 0) \
            or any(not 0 < m < 1 for m in config.schedule.milestones):
        raise UsageError(f"--milestones must be fractions in (0, 1) and --decay-factor > 0, got "
                         f"{config.schedule.milestones} and {config.schedule.decay_factor}.")
    for name in ("train_subset", "test_subset"):
        value = settings[name]
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (omit it for the "
                             f"whole split), got {value}.")
    unknown = [m for m, _ in config.run.seeds_per_method if m not in objectives.METHODS]
    if unknown or any(n < 1 for _, n in config.run.seeds_per_method):
        raise UsageError(f"seeds_per_method {config.run.seeds_per_method} must name methods of "
                         f"{', '.join(objectives.METHODS)} with at least 1 seed each.")
    if config.run.student_shortcut is not None and not config.run.student.startswith("resnet"):
        raise UsageError(f"--student-shortcut applies to ResNet students, not {config.run.student}.")
    _validate_terms(config)


def _validate_terms(config: ExperimentConfig) -> None:
    """Every --term override parses, names a term of some chosen method and gives it valid
    values; every method's objective builds."""
    from kd_jax import objectives
    methods = list(dict.fromkeys(("none",) + tuple(config.objective.methods)))
    present = {t.name for m in methods for t in objectives.METHODS[m].terms}
    for assignment in config.objective.terms:
        try:
            name, _, _ = objectives.parse_override(assignment)
        except ValueError as err:
            raise UsageError(f"--term: {err}") from err
        if name not in present:
            raise UsageError(f"--term {assignment}: no chosen method has a {name!r} term; the "
                             f"terms of {', '.join(methods)} are {', '.join(sorted(present))}.")
    for m in methods:
        try:
            student_objective(m, config)
        except (ValueError, KeyError) as err:
            raise UsageError(f"method {m} with --term {','.join(config.objective.terms)}: "
                             f"{str(err).strip(chr(34))}") from err


def ensure_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"workdir {path!r} is not writable ({err.strerror}); pass --workdir "
                         "with a directory you can write to.") from err


# ------------------------------------------------------------------- bookkeeping

def teacher_dir(spec: str) -> str:
    """The checkpoint directory of ``--teacher-checkpoint spec`` (``pretrained:`` names, a
    teacher directory holding ``final``, or a checkpoint directory)."""
    from kd_jax import pretrained
    try:
        path = pretrained.resolve(spec)
    except ValueError as err:
        raise UsageError(f"--teacher-checkpoint {spec!r}: {err}") from err
    if os.path.isdir(os.path.join(path, "final")):
        path = os.path.join(path, "final")
    return path


def teacher_meta(spec: str) -> dict:
    from kd_jax import checkpoint
    path = teacher_dir(spec)
    try:
        meta = checkpoint.load_meta(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--teacher-checkpoint {spec!r} is not a teacher checkpoint (no "
                         "readable meta); use pretrained:<dataset>/<arch>, a directory written "
                         "by python -m kd_jax.convert, or <workdir>/teacher_*/final.") from err
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise UsageError(f"--teacher-checkpoint {spec!r} is not a teacher checkpoint (its meta "
                         "names no arch and num_classes; a students checkpoint?); use "
                         "pretrained:<dataset>/<arch> or <workdir>/teacher_*/final.")
    return meta


def dir_digest(path: str) -> str:
    """SHA-256 over the relative names and contents of every file under ``path``: the
    identity of a teacher checkpoint's content, whatever its path."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def adopt_teacher_checkpoint(config: ExperimentConfig, args) -> ExperimentConfig:
    """With a teacher checkpoint, the teacher's architecture and dataset are the checkpoint's
    unless given on the command line (a conflict is then reported by the teacher phase)."""
    if not config.run.teacher_checkpoint:
        return config
    meta = teacher_meta(config.run.teacher_checkpoint)
    over = {}
    if "teacher" not in args.given:
        over["teacher"] = meta["arch"]
    if "dataset" not in args.given and meta.get("dataset") in ("cifar10", "cifar100"):
        over["dataset"] = meta["dataset"]
    return configure(config, **over)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# Fields that cannot change what a phase computes (logging, grouping, evaluation batching)
# or that the phase's key holds in resolved form. Everything else of the configuration keys
# the phase's directory, so a new field changes the keys unless it is listed here.
NOT_IN_ANY_KEY = ("log_every", "eval_batch_size", "max_parallel_students")
# The teacher phase does not see the students' settings; its epochs are resolved.
NOT_IN_TEACHER_KEY = NOT_IN_ANY_KEY + (
    "student", "student_shortcut", "methods", "seeds", "seeds_per_method", "temperature",
    "alpha", "teacher_checkpoint", "epochs", "teacher_epochs")
# A students pass holds its (method, seed) jobs; its teacher is keyed by content or its key.
NOT_IN_STUDENTS_KEY = NOT_IN_ANY_KEY + (
    "methods", "seeds", "seeds_per_method", "teacher_checkpoint", "teacher_epochs")


def _config_without(c: ExperimentConfig, excluded) -> dict:
    """The whole configuration by setting name, minus ``excluded`` (JSON types)."""
    return json.loads(json.dumps({k: v for k, v in flat(c).items() if k not in excluded}))


def teacher_key(c: ExperimentConfig) -> dict:
    return {**_config_without(c, NOT_IN_TEACHER_KEY), "teacher_epochs": c.teacher_epochs_}


def students_key(c: ExperimentConfig, teacher_summary: dict, jobs) -> dict:
    teacher = ({"checkpoint_sha256": teacher_summary["checkpoint_sha256"]}
               if c.run.teacher_checkpoint else teacher_key(c))
    return {**_config_without(c, NOT_IN_STUDENTS_KEY), "teacher": teacher,
            "jobs": [list(j) for j in jobs]}


def student_jobs(c: ExperimentConfig) -> list[tuple[str, int]]:
    methods = list(dict.fromkeys(("none",) + tuple(c.objective.methods)))  # baseline first, no repeats
    seeds = dict(c.run.seeds_per_method)
    return [(m, c.run.seed + s) for m in methods for s in range(seeds.get(m, c.run.seeds))]


def split_passes(jobs: list, cap: int) -> list[list]:
    """Splits the jobs into as few passes as ``cap`` allows, of near-equal sizes."""
    n = math.ceil(len(jobs) / cap)
    size = math.ceil(len(jobs) / n)
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def student_objective(method: str, c: ExperimentConfig):
    """The objective of ``method`` (a preset of ``kd_jax.objectives.METHODS``) under ``c``:
    --temperature for every logit term with a temperature, --alpha as KD's weight (CE gets
    1 - alpha), warm-ups scaled to the run (mdistiller's 20 of 240 epochs keeps its share in
    shorter runs), then the --term overrides of the terms it has."""
    from kd_jax import objectives
    obj = objectives.METHODS[method]
    names = {t.name for t in obj.terms}
    if c.objective.temperature is not None:
        for name in ("kd", "dkd", "dist", "lskd"):
            if name in names:
                obj = obj.replace_term(name, temperature=c.objective.temperature)
    if c.objective.alpha is not None and method == "kd":
        obj = obj.replace_term("ce", weight=1.0 - c.objective.alpha)
        obj = obj.replace_term("kd", weight=c.objective.alpha)
    for t in obj.terms:
        if t.warmup_epochs > 0:
            obj = obj.replace_term(t.name, warmup_epochs=min(
                t.warmup_epochs, t.warmup_epochs * c.schedule.epochs / 240))
    mine = [a for a in c.objective.terms if objectives.parse_override(a)[0] in names]
    return obj.override(*mine)


class TensorBoard:
    """Scalar event files of every logged metric, one run directory per phase, configuration
    and student: ``<workdir>/tensorboard/<phase>_<run>/<student>``, so that
    ``tensorboard --logdir runs/`` shows the curves. Needs the ``[tensorboard]`` extra
    (tensorboardX); metrics.jsonl stays the source of truth."""

    STEP_KEYS = ("loss", "accuracy", "lr", "images_per_s")
    EPOCH_KEYS = ("train_loss", "train_accuracy", "test_accuracy", "test_loss", "epoch_time_s")

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter
        self._writer_class = SummaryWriter
        self.root = os.path.join(workdir, "tensorboard")
        self.writers: dict[tuple, Any] = {}

    def add(self, record: dict) -> None:
        key = (record.get("phase"), record.get("run"), record.get("student"))
        if key not in self.writers:
            path = os.path.join(self.root, f"{key[0]}_{key[1]}", str(key[2]).replace("/", "_"))
            self.writers[key] = self._writer_class(logdir=path)
        writer = self.writers[key]
        kind = record.get("kind", "step")
        for name in self.STEP_KEYS if kind == "step" else self.EPOCH_KEYS:
            if isinstance(record.get(name), (int, float)):
                writer.add_scalar(f"{kind}/{name}", record[name], global_step=record["step"])
        if kind == "epoch":
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class Logger:
    """metrics.jsonl, log.txt and (with tensorboardX installed) TensorBoard event files,
    written by process 0 only."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.log_path = os.path.join(workdir, "log.txt")
        self.tensorboard = None
        if enabled:
            try:
                self.tensorboard = TensorBoard(workdir)
            except ImportError:
                pass  # the [tensorboard] extra is optional

    def metrics(self, record: dict) -> None:
        check_interrupted()  # called every log interval: a swallowed Ctrl-C still stops here
        if self.enabled:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.add(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        tqdm.write(text)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def drop_after(self, phase: str, step: int, run_id: str) -> None:
        """Forgets records of ``phase`` of the configuration ``run_id`` past ``step`` (written
        before an interruption); records of other configurations are kept."""
        if not self.enabled or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not (rec.get("phase") == phase and rec.get("run") == run_id
                    and rec.get("step", 0) > step):
                keep.append(line)
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics_path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _read_json_or_none(path: str, log=None):
    """The JSON at ``path``; ``None`` if absent or unreadable (a file cut by a kill or a full
    disk is recomputed from the checkpoints, not trusted)."""
    if not os.path.exists(path):
        return None
    try:
        return _read_json(path)
    except (OSError, ValueError) as err:
        if log is not None:
            log.line(f"warning: {path} is unreadable ({type(err).__name__}); recomputing it "
                     "from the checkpoints")
        return None


# ----------------------------------------------------------------------- phases

class Run:
    """One invocation: data, mesh and the phases."""

    def __init__(self, config: ExperimentConfig, args):
        import jax
        import jax.numpy as jnp
        from kd_jax import data, parallel
        self.c = config
        self.args = args
        self.jax = jax
        self.mesh = parallel.make_mesh()
        self.devices = jax.device_count()
        try:
            parallel.check_batch_size(config.data.batch_size, self.mesh)
        except ValueError as err:
            raise UsageError(str(err)) from err
        platform = jax.devices()[0].platform
        dtype = config.run.dtype if config.run.dtype != "auto" else (
            "float32" if platform == "cpu" else "bfloat16")
        self.dtype = jnp.dtype(dtype)
        self.num_classes = data.num_classes(config.data.dataset)
        self.workdir = args.workdir_resolved
        self.log = Logger(self.workdir, jax.process_index() == 0)
        self._data = None
        self.teacher_preprocess = None  # the teacher's own normalisation, if not the dataset's

    # data is loaded only when a phase needs to train
    @property
    def data(self):
        if self._data is None:
            from kd_jax import data
            c = self.c
            t0 = time.perf_counter()
            train_x, train_y = _load_split(c.data.dataset, "train", self.args.data_dir,
                                           c.data.train_subset, self.num_classes)
            test_x, test_y = _load_split(c.data.dataset, "test", self.args.data_dir,
                                         c.data.test_subset, self.num_classes)
            if c.data.batch_size > len(train_x):
                raise UsageError(f"--batch-size {c.data.batch_size} is larger than the "
                                 f"{len(train_x)} training images; lower it.")
            self._data = (train_x, train_y, test_x, test_y)
            self.log.line(f"data: {c.data.dataset} train {len(train_x)} test {len(test_x)} "
                          f"({time.perf_counter() - t0:.1f}s)")
        return self._data

    def model(self, arch, shortcut=None):
        from kd_jax import models
        try:
            return models.create(arch, self.num_classes, dtype=self.dtype, shortcut=shortcut)
        except ValueError as err:
            raise UsageError(str(err)) from err

    def optimizer(self, epochs: int, steps_per_epoch: int):
        from kd_jax import train
        c = self.c
        # The optimiser's settings are the configuration's of the same names.
        settings = flat(c)
        oc = train.OptimConfig(**{f.name: settings[f.name]
                                  for f in dataclasses.fields(train.OptimConfig)
                                  if f.name in settings})
        kw = dict(batch_size=c.data.batch_size, steps_per_epoch=steps_per_epoch, epochs=epochs)
        return train.make_optimizer(oc, **kw), train.make_schedule(oc, **kw)

    def loader(self):
        from kd_jax import data
        train_x, train_y, _, _ = self.data
        return data.TrainLoader(train_x, train_y, batch_size=self.c.data.batch_size,
                                seed=self.c.run.seed, mesh=self.mesh)

    def evaluator(self, preprocess=None):
        from kd_jax import loop
        _, _, test_x, test_y = self.data
        return loop.make_evaluator(self.mesh, images=test_x, labels=test_y,
                                   batch_size=_eval_batch(self.c.data.eval_batch_size, self.devices),
                                   dataset=self.c.data.dataset, preprocess=preprocess)

    # -- phase 1
    def teacher_phase(self) -> dict:
        """Trains the teacher (or loads it); returns its summary and sets the variables."""
        from kd_jax import checkpoint, loop, train
        c = self.c
        if c.run.teacher_checkpoint:
            return self._load_teacher(c.run.teacher_checkpoint)
        tdir = os.path.join(self.workdir, f"teacher_{c.run.teacher}_{_hash(teacher_key(c))}")
        final = os.path.join(tdir, "final")
        summary = _read_json_or_none(os.path.join(tdir, "result.json"), self.log)
        if summary is not None:
            try:
                loaded = self._load_teacher(final, summary=summary)
            except UsageError as err:
                # final/ and result.json are derived from checkpoints/: rebuild them.
                self.log.line(f"warning: the trained teacher in {final} is unreadable ({err}); "
                              "recomputing it from its checkpoints")
                shutil.rmtree(final, ignore_errors=True)
            else:
                self.log.line(f"teacher: {c.run.teacher} already trained "
                              f"({summary['test_accuracy']:.4f}), reusing {final}")
                return loaded
        model = self.model(c.run.teacher)
        loader = self.loader()
        tx, schedule = self.optimizer(c.teacher_epochs_, loader.steps_per_epoch)
        state = train.create_train_state(model, tx, init_seed=c.run.seed, data_seed=c.run.seed)
        states = loop.replicate((state,), self.mesh)
        self.args.checkpoint_bytes = _tree_bytes(states)
        ckpt = checkpoint.Checkpointer(os.path.join(tdir, "checkpoints"))
        self.log.drop_after("teacher", ckpt.latest_step() or 0, os.path.basename(tdir))
        result = loop.fit(
            states, loop.make_supervised_step(self.mesh, dataset=c.data.dataset), loader=loader,
            epochs=c.teacher_epochs_, evaluate=self.evaluator(), names=[c.run.teacher],
            phase="teacher", checkpointer=ckpt, lr_fn=schedule, log_every=c.run.log_every,
            log_fn=self._log_fn("teacher", os.path.basename(tdir), c.run.teacher,
                                c.teacher_epochs_ * loader.steps_per_epoch),
            progress=not self.args.no_progress,
            meta={"arch": c.run.teacher})
        ckpt.close()
        (state,) = result.states
        hist = result.history[0]
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        summary = {"arch": c.run.teacher, "test_accuracy": hist[-1]["test_accuracy"],
                   "best_test_accuracy": max(h["test_accuracy"] for h in hist),
                   "params": train.num_params(state.params),
                   "train_time_s": result.train_time_s, "epochs": c.teacher_epochs_,
                   "num_classes": self.num_classes, "dataset": c.data.dataset,
                   "images_per_s": _steady_rate(hist)}
        checkpoint.save_variables(final, variables, summary)  # every process takes part
        if self.jax.process_index() == 0:
            _write_json(os.path.join(tdir, "history.json"), hist)
            _write_json(os.path.join(tdir, "result.json"), summary)
        self.teacher_model, self.teacher_variables = model, variables
        return summary

    def _load_teacher(self, spec: str, summary: dict | None = None) -> dict:
        """Loads a teacher checkpoint (trained here, converted, or shipped) with its own input
        preprocessing; without a stored ``summary``, measures its test accuracy in this run
        (cached in the workdir by the checkpoint's content digest)."""
        import optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from kd_jax import pretrained, train
        c = self.c
        path = teacher_dir(spec)
        meta = teacher_meta(spec)
        if meta.get("arch") != c.run.teacher or meta.get("num_classes") != self.num_classes:
            raise UsageError(
                f"--teacher-checkpoint holds a {meta.get('arch')} with "
                f"{meta.get('num_classes')} classes, but this run's teacher is {c.run.teacher} "
                f"with {self.num_classes} classes ({c.data.dataset}); pass --teacher "
                f"{meta.get('arch')} and the matching --dataset, or another checkpoint.")
        try:
            loaded = pretrained.load_checkpoint(path, dtype=self.dtype,
                                                sharding=NamedSharding(self.mesh, P()))
        except Exception as err:  # noqa: BLE001 — any unreadable array is the user's file
            raise UsageError(f"--teacher-checkpoint {spec!r}: its arrays cannot be read as a "
                             f"{meta.get('arch')} ({type(err).__name__}: {_squash(err, 160)}); "
                             "convert it again or point at another checkpoint.") from err
        self.teacher_model, self.teacher_variables = loaded.model, loaded.variables
        # A converted teacher keeps its authors' normalisation; kd_jax-trained ones use the
        # dataset's, like the students (preprocess None).
        self.teacher_preprocess = loaded.preprocess if meta.get("normalization") else None
        if summary is not None:
            return summary
        digest = dir_digest(path)
        cache = os.path.join(self.workdir, f"teacher_eval_{_hash(dict(digest=digest, dataset=c.data.dataset, test_subset=c.data.test_subset, data_dir=os.path.abspath(self.args.data_dir) if self.args.data_dir else None))}.json")
        if os.path.exists(cache):
            measured = _read_json(cache)
        else:
            t0 = time.perf_counter()
            model = train.TrainState.create(apply_fn=loaded.model.apply,
                                            params=loaded.variables["params"],
                                            batch_stats=loaded.variables["batch_stats"],
                                            tx=optax.identity())
            (ev,) = self.evaluator(preprocess=self.teacher_preprocess)([model])
            measured = {"test_accuracy": ev["test_accuracy"], "test_loss": ev["test_loss"],
                        "eval_time_s": time.perf_counter() - t0}
            if self.jax.process_index() == 0:
                _write_json(cache, measured)
        summary = {"arch": meta["arch"], "shortcut": meta.get("shortcut"),
                   "test_accuracy": measured["test_accuracy"],
                   "params": meta.get("params"), "train_time_s": meta.get("train_time_s"),
                   "source": spec, "checkpoint_sha256": digest,
                   "published_accuracy": meta.get("published_accuracy"),
                   "origin": (meta.get("source") or {}).get("origin"),
                   "normalization": (meta.get("normalization") or {}).get("name", c.data.dataset)}
        published = summary["published_accuracy"]
        self.log.line(f"teacher: {meta['arch']} from {spec}: test accuracy "
                      f"{100 * measured['test_accuracy']:.2f}% measured here"
                      + (f" (published {100 * published:.2f}%)" if published else ""))
        return summary

    # -- phase 2
    def student_phase(self, teacher_summary: dict) -> list[dict]:
        from kd_jax import checkpoint, loop, models, objectives, train
        c = self.c
        jobs = student_jobs(c)
        results = []
        passes = split_passes(jobs, c.run.max_parallel_students)
        for i, group in enumerate(passes):
            key = students_key(c, teacher_summary, group)
            names = [f"{m}/seed{s}" for m, s in group]
            pdir = os.path.join(self.workdir, f"students_{c.run.student}_{_hash(key)}")
            done = os.path.join(pdir, "result.json")
            stored = _read_json_or_none(done, self.log)
            if stored is not None:
                self.log.line(f"students pass {i + 1}/{len(passes)} ({', '.join(names)}) "
                              "already trained")
                results += stored
                continue
            phase = f"students{i + 1}"
            self.log.line(f"students pass {i + 1}/{len(passes)}: {len(group)} x {c.run.student} "
                          f"({', '.join(names)}) from {c.run.teacher}")
            loader = self.loader()
            tx, schedule = self.optimizer(c.schedule.epochs, loader.steps_per_epoch)
            objs = [student_objective(m, c) for m, _ in group]
            teacher = self.teacher_model
            states, models_ = [], []
            train_labels = self.data[1]
            for (method, seed), obj in zip(group, objs):
                model = objectives.prepare_student(
                    self.model(c.run.student, shortcut=c.run.student_shortcut), obj, teacher)
                models_.append(model)
                aux_state = objectives.init_state(obj, num_examples=len(train_labels),
                                                  train_labels=train_labels, seed=seed)
                states.append(train.create_train_state(model, tx, init_seed=seed,
                                                       data_seed=c.run.seed,
                                                       aux_state=aux_state))
            states = loop.replicate(tuple(states), self.mesh)
            if any(o.needs_teacher for o in objs):
                # The frozen teacher runs with its BatchNorm folded into its convolutions.
                step = loop.make_distill_step(self.mesh, objectives=objs,
                                              teacher_apply=models.folded_apply(teacher),
                                              dataset=c.data.dataset,
                                              steps_per_epoch=loader.steps_per_epoch,
                                              teacher_preprocess=self.teacher_preprocess)
                tvars = self.teacher_variables
                step_fn = lambda s, b: step(s, tvars, b)  # noqa: E731
            else:
                step_fn = loop.make_supervised_step(self.mesh, dataset=c.data.dataset)
            self.args.checkpoint_bytes = _tree_bytes(states)
            ckpt = checkpoint.Checkpointer(os.path.join(pdir, "checkpoints"))
            run_id = os.path.basename(pdir)
            self.log.drop_after(phase, ckpt.latest_step() or 0, run_id)
            result = loop.fit(states, step_fn, loader=loader, epochs=c.schedule.epochs,
                              evaluate=self.evaluator(), names=names, phase=phase,
                              checkpointer=ckpt, lr_fn=schedule, log_every=c.run.log_every,
                              log_fn=self._log_fn(phase, run_id, names[0],
                                                  c.schedule.epochs * loader.steps_per_epoch,
                                                  passes_left=len(passes) - i - 1),
                              progress=not self.args.no_progress,
                              meta={"jobs": group})
            ckpt.close()
            group_results = []
            for (method, seed), state, hist, model in zip(group, result.states, result.history,
                                                          models_):
                # The distilled student alone (no heads), loadable like any kd_jax checkpoint
                # (e.g. as --teacher-checkpoint): <pass dir>/students/<method>_seed<seed>.
                exported = objectives.backbone_variables(
                    model, {"params": state.params, "batch_stats": state.batch_stats})
                checkpoint.save_variables(
                    os.path.join(pdir, "students", f"{method}_seed{seed}"), exported,
                    {"arch": c.run.student, "shortcut": c.run.student_shortcut,
                     "method": method, "seed": seed, "objective": objs[group.index(
                         (method, seed))].as_dict(), "test_accuracy": hist[-1]["test_accuracy"],
                     "num_classes": self.num_classes, "dataset": c.data.dataset})
                group_results.append({
                    "arch": c.run.student, "method": method, "seed": seed,
                    "test_accuracy": hist[-1]["test_accuracy"],
                    "best_test_accuracy": max(h["test_accuracy"] for h in hist),
                    "params": train.num_params(exported["params"]),
                    "train_time_s": result.train_time_s,
                    "images_per_s": _steady_rate(hist),
                    "students_in_pass": len(group), "history": hist})
            if self.jax.process_index() == 0:
                _write_json(done, group_results)
            results += group_results
        return results

    def _log_fn(self, phase, run_id, first_name, total_steps, passes_left=0):
        """Logs each record; after the first timed interval (the one before includes the
        compilation), prints an estimate of the phase's and the run's remaining time."""
        seen = {"intervals": 0}
        batch_size = self.c.data.batch_size

        def log(record):
            # run_id (the phase's directory) tells records of different configurations apart.
            self.log.metrics({**record, "run": run_id})
            if (record.get("kind") == "step" and seen["intervals"] >= 0
                    and record["student"] == first_name):
                seen["intervals"] += 1
                if seen["intervals"] == 2:  # the first interval includes compilation
                    seen["intervals"] = -1
                    left = (total_steps - record["step"]) * batch_size / record["images_per_s"]
                    whole = left + passes_left * total_steps * batch_size / record["images_per_s"]
                    self.log.line(
                        f"time estimate: {phase} about {_duration(left)} more at "
                        f"{record['images_per_s']:.0f} img/s"
                        + (f"; the whole run about {_duration(whole)} more"
                           if passes_left else ""))
            if "test_accuracy" in record:
                self.log.line(
                    f"[{phase} {record['student']}] epoch {record['epoch']} "
                    f"loss {record['train_loss']:.4f} train_acc {record['train_accuracy']:.4f} "
                    f"test_acc {record['test_accuracy']:.4f} "
                    f"{record['images_per_s']:.0f} img/s {record['epoch_time_s']:.1f}s"
                    + (" (" + ", ".join(f"{t} {v:.4g}" for t, v in record["terms"].items())
                       + ")" if len(record.get("terms", {})) > 1 else ""))
        return log


def _load_split(dataset: str, split: str, data_dir: str | None, subset: int | None,
                num_classes: int):
    """``data.load_arrays`` of the class-balanced ``subset`` (the first subset/classes images
    of each class; only those are decoded), with a damaged prepared copy reported in one line."""
    from kd_jax import data
    per_class = None
    if subset:
        flag = f"--{split}-subset"
        per_class = subset // num_classes
        if per_class < 1:
            raise UsageError(f"{flag} {subset} is smaller than the {num_classes} classes; use at "
                             f"least {num_classes}.")
    try:
        return data.load_arrays(dataset, split, data_dir=data_dir, per_class=per_class)
    except data.DataNotFoundError:
        raise
    except ValueError as err:
        if per_class is None:
            raise
        raise UsageError(f"{flag} {subset}: {err}") from err
    except Exception as err:  # noqa: BLE001 — array_record/TFDS raise many kinds
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        import glob
        files = sorted(glob.glob(os.path.join(os.path.expanduser(where), dataset, "*",
                                              f"{dataset}-{split}.*")))
        raise UsageError(
            f"could not read the {split} split of {dataset} from "
            f"{', '.join(files) or where} ({type(err).__name__}: {_squash(err, 200)}); its "
            f"prepared files are damaged: delete "
            f"{os.path.join(where, dataset)} and prepare it again (pip install -e \".[prepare]\" "
            "with network), or pass --data-dir with an intact copy.") from err


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _squash(err: BaseException, limit: int) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tree_bytes(tree) -> int:
    import jax
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _eval_batch(requested: int, devices: int) -> int:
    return max(devices, requested // devices * devices)


def _steady_rate(hist):
    """Training images/s per student: the median epoch after the first (which compiles)."""
    import statistics
    rates = [h["images_per_s"] for h in hist]
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


# ---------------------------------------------------------------------- reports

def summarise(config: ExperimentConfig, teacher: dict, students: list[dict]) -> dict:
    return {
        "dataset": config.data.dataset,
        "teacher": {k: teacher.get(k) for k in ("arch", "test_accuracy", "params",
                                                "train_time_s")}
        | {k: teacher[k] for k in ("shortcut", "source", "origin", "published_accuracy",
                                   "checkpoint_sha256", "normalization") if k in teacher},
        "students": [{k: s[k] for k in ("arch", "method", "seed", "test_accuracy",
                                        "best_test_accuracy", "params", "train_time_s",
                                        "images_per_s")} | {"students_in_pass":
                                                            s.get("students_in_pass", 1)}
                     for s in students],
        "config": dataclasses.asdict(config),
        # Each method's objective with the values in effect (presets and overrides resolved).
        "objectives": {m: student_objective(m, config).as_dict()
                       for m in dict.fromkeys(m for m, _ in student_jobs(config))},
    }


def results_table(results: dict) -> str:
    """The Markdown table of ``results``: method, accuracy mean ± std, gain over baseline."""
    import statistics
    by_method: dict[str, list[float]] = {}
    arch = {}
    for s in results["students"]:
        by_method.setdefault(s["method"], []).append(s["test_accuracy"])
        arch[s["method"]] = s["arch"]
    base = statistics.mean(by_method["none"]) if "none" in by_method else None
    t = results["teacher"]
    source = ""
    if t.get("source"):
        source = f" from `{t['source']}`"
        if t.get("published_accuracy"):
            source += f" (published {100 * t['published_accuracy']:.2f}%)"
    lines = [f"Teacher {t['arch']}{source}: {100 * t['test_accuracy']:.2f}% test accuracy "
             f"({results['dataset']}, measured in this run).", "",
             "| Method | Student | Test accuracy (%) | Gain over baseline | Seeds |",
             "|---|---|---|---|---|"]
    for method, accs in by_method.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = "baseline (none)" if method == "none" else method
        gain = "—" if method == "none" or base is None else f"{100 * (mean - base):+.2f}"
        lines.append(f"| {name} | {arch[method]} | {100 * mean:.2f} ± {100 * std:.2f} | "
                     f"{gain} | {len(accs)} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: str, teacher_hist: list[dict] | None, students: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = []
    if teacher_hist:
        series.append(("teacher", teacher_hist, "k"))
    series += [(f"{s['method']} seed {s['seed']}", s.get("history", []), None) for s in students]
    for label, hist, color in series:
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist]
        ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in hist], label=label, color=color,
                    marker="o", markersize=3)
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], label=label, color=color,
                     marker="o", markersize=3)
    from matplotlib.ticker import MaxNLocator
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss (objective)", title="Training loss",
                yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def all_done(config, args) -> dict | None:
    """The stored results if every phase of this exact configuration has finished."""
    stored = _read_json_or_none(os.path.join(args.workdir_resolved, "results.json"))
    if not isinstance(stored, dict):
        return None
    if stored.get("config") != json.loads(json.dumps(dataclasses.asdict(config))):
        return None
    digest = stored.get("teacher", {}).get("checkpoint_sha256")
    if config.run.teacher_checkpoint and digest != dir_digest(teacher_dir(config.run.teacher_checkpoint)):
        return None  # the checkpoint at that path changed: the stored students are stale
    return stored


_INTERRUPTED: list[int] = []


def _on_sigint(signum, frame) -> None:
    # Python raises KeyboardInterrupt wherever the main thread is; inside a callback that
    # swallows exceptions (JAX's gc callback prints "Exception ignored in ...") it is lost.
    # The flag is not: the logger and the end of the run check it.
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _unraisable(hook):
    def quiet(unraisable) -> None:  # the swallowed Ctrl-C is flagged: no traceback for it
        if not (_INTERRUPTED and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            hook(unraisable)
    return quiet


def check_interrupted() -> None:
    """Raises KeyboardInterrupt if Ctrl-C arrived, even where its exception was swallowed."""
    if _INTERRUPTED:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    config, args = parse_args(argv)
    args.workdir_resolved = args.workdir
    _INTERRUPTED.clear()
    previous_handler, previous_hook = None, sys.unraisablehook
    try:
        previous_handler = signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable(previous_hook)
    except ValueError:
        pass  # not the main thread (main() called from a thread): Python's default handling
    try:
        return _main_checked(config, args)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook


def _main_checked(config, args) -> int:
    try:
        status = _main(config, args)
        check_interrupted()
        return status
    except UsageError as err:
        print(f"cifar_kd.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cifar_kd.py: interrupted; rerun the same command to resume from the last "
              f"checkpoint in {args.workdir_resolved}.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        from kd_jax import data, loop
        if isinstance(err, (data.DataNotFoundError, loop.NonFiniteLossError)):
            print(f"cifar_kd.py: error: {err}", file=sys.stderr)
            return 1
        if _is_disk_full(err):
            wd = os.path.abspath(args.workdir_resolved or ".")
            free = shutil.disk_usage(wd).free if os.path.isdir(wd) else 0
            need = getattr(args, "checkpoint_bytes", 0)
            print(f"cifar_kd.py: error: no space left on device while writing under {wd} "
                  f"({free / 1e6:.0f} MB free; a checkpoint of this run needs about "
                  f"{max(need, 1e6) / 1e6:.0f} MB, keep a few times that free); free space and "
                  "rerun the same command: it resumes from the last complete checkpoint.",
                  file=sys.stderr)
            return 1
        raise


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain (Orbax and TensorStore wrap the OSError)."""
    while err is not None:
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or \
                "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def acquire_workdir_lock(workdir: str):
    """An exclusive lock on ``workdir`` for this process's lifetime (released by the kernel
    when the process ends, however it ends); a second run in the same workdir is refused."""
    import fcntl
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"workdir {workdir} is in use by a running experiment (pid {owner}); "
                         "wait for it to finish or pass another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _main(config: ExperimentConfig, args) -> int:
    config = adopt_teacher_checkpoint(config, args)
    args.workdir_resolved = args.workdir or os.path.join(
        "runs", f"{config.data.dataset}_{config.run.teacher}_{config.run.student}")
    validate(config, args)
    stored = all_done(config, args)
    if stored is not None:
        print(f"Finished run in {args.workdir_resolved}; stored results:\n")
        print(results_table(stored))
        return 0
    ensure_writable(args.workdir_resolved)
    from kd_jax import parallel
    try:
        parallel.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                              args.process_id)
    except (ValueError, RuntimeError, TimeoutError) as err:
        raise UsageError(f"multi-host start-up failed: {err}") from err
    import jax
    lock = acquire_workdir_lock(args.workdir_resolved) if jax.process_index() == 0 else None
    if lock is not None:  # what this invocation runs; --config config.json reruns it
        _write_json(os.path.join(args.workdir_resolved, "config.json"),
                    dataclasses.asdict(config))
    run = Run(config, args)
    jobs = student_jobs(config)
    run.log.line(f"kd_jax: {config.data.dataset} {config.run.teacher} -> {config.run.student} on "
                 f"{run.devices} {run.jax.devices()[0].platform} device(s), "
                 f"{run.dtype.name}; workdir {args.workdir_resolved}")
    teacher_plan = (f"load {config.run.teacher_checkpoint}" if config.run.teacher_checkpoint else
                    f"train {config.run.teacher} for {config.teacher_epochs_} epochs")
    run.log.line(f"plan: teacher: {teacher_plan}; students: {len(jobs)} x {config.run.student} "
                 f"({', '.join(f'{m}/seed{s}' for m, s in jobs)}) for {config.schedule.epochs} epochs "
                 f"in {len(split_passes(jobs, config.run.max_parallel_students))} pass(es)")
    teacher = run.teacher_phase()
    students = run.student_phase(teacher)
    results = summarise(config, teacher, students)
    results["teacher_checkpoint"] = config.run.teacher_checkpoint
    results["devices"] = f"{run.devices} x {run.jax.devices()[0].device_kind}"
    if run.jax.process_index() == 0:
        wd = args.workdir_resolved
        table = results_table(results)
        teacher_hist = None
        hist_path = os.path.join(wd, f"teacher_{config.run.teacher}_{_hash(teacher_key(config))}",
                                 "history.json")
        if not config.run.teacher_checkpoint:
            teacher_hist = _read_json_or_none(hist_path)
        plot_curves(os.path.join(wd, "curves.png"), teacher_hist, students)
        with open(os.path.join(wd, "results.md"), "w") as f:
            f.write(table)
        _write_json(os.path.join(wd, "results.json"), results)
        print("\n" + table)
        print(f"Outputs: {wd}/results.json, results.md, metrics.jsonl, curves.png")
    run.log.close()
    if lock is not None:
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
