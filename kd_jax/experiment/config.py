"""The experiment's configuration: one frozen dataclass per concern, presets, ``configure``.

Everything derives from :class:`ExperimentConfig`: the CLI's flags (one per field, its help
from the field's metadata), ``--config`` files, ``config.json``, the records and the run
directories' keys. Field names are unique across the sections, so a setting is named by its
field alone (``configure(PRESETS["smoke"], lr=0.2, seeds=3)``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kd_jax.train import OptimConfig

__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "LEAVES", "ObjectiveConfig",
           "OptimConfig", "PRESETS", "PRESET_HELP", "RunConfig", "SECTIONS", "ScheduleConfig",
           "configure", "flat", "load_config_file"]


class ConfigError(ValueError):
    """A mistake in the configuration or the environment it names; its message is one line
    naming the setting and the fix (the CLI prints it and exits with status 2)."""


def _opt(default, help, **meta):
    """A configuration field: its default, its flag's help, and flag metadata (``flag``: the
    flag's name when it is not the field's, ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("cifar10", "dataset: cifar10, cifar100 (on the devices), imagenet2012 "
                                   "(TFDS, prepared from the manual download) or folder:PATH "
                                   "(PATH/{train,val}/<class>/*.JPEG), decoded in host workers")
    data_dir: str | None = _opt(None, "a prepared TFDS data directory (default: "
                                      "$TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    image_size: int | None = _opt(None, "image side the models see (default: the dataset's, 32 "
                                        "for CIFAR, 224 for imagenet2012 and folders)")
    workers: int | None = _opt(None, "host decode processes for imagenet2012 and folder "
                                     "datasets (default: the CPU count - 1; 0 decodes in the "
                                     "training process)")
    batch_size: int = _opt(64, "global batch size")
    train_subset: int | None = _opt(
        None, "use N training images, the first N/classes of each class (default: all)")
    test_subset: int | None = _opt(None, "evaluate on N test images, class-balanced "
                                         "(default: all)")
    eval_batch_size: int = _opt(500, "evaluation batch size")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How long each phase trains; the learning-rate schedule is the optimiser's
    (:class:`kd_jax.train.OptimConfig`)."""

    epochs: int = _opt(240, "student epochs")
    teacher_epochs: int | None = _opt(None, "teacher epochs (default: --epochs)")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    methods: tuple[str, ...] = _opt(("kd",), "comma list of methods (presets of "
                                             "kd_jax.objectives.METHODS); 'none' is the "
                                             "baseline student, always added", flag="method")
    temperature: float | None = _opt(None, "distillation temperature of every logit term "
                                           "(kd, dkd, dist, lskd; default: each method's, "
                                           "4, lskd 2)")
    alpha: float | None = _opt(None, "KD: weight of the distillation term, CE gets 1-alpha "
                                     "(default 0.9)")
    terms: tuple[str, ...] = _opt(
        (), "term overrides TERM.KEY=VALUE, comma list, applied to every method with that term "
            "(KEY: weight, warmup_epochs or the term's argument), e.g. kd.temperature=5,"
            "crd.num_negatives=4096 (default: none)", flag="term")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    teacher: str = _opt("resnet56", "teacher architecture (default resnet56; with "
                                    "--teacher-checkpoint: the checkpoint's)")
    student: str = _opt("resnet20", "student architecture")
    student_shortcut: str | None = _opt(
        None, "ResNet student's shortcut: A zero-padded identity (default of resnetN), B 1x1 "
              "conv + BN (RepDistiller's, chenyaofo's)", choices=("A", "B"))
    teacher_checkpoint: str | None = _opt(
        None, "distil from this teacher instead of training one: a shipped published teacher "
              "(pretrained:cifar10/resnet20, pretrained:cifar10/resnet56, "
              "pretrained:cifar100/resnet56), a checkpoint written by python -m kd_jax.convert, "
              "or <workdir>/teacher_*/final; the teacher and dataset are then the checkpoint's "
              "unless set (default: train the teacher)")
    dtype: str = _opt("auto", "compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)",
                      choices=("auto", "float32", "bfloat16"))
    seed: int = _opt(0, "base seed")
    seeds: int = _opt(1, "seeds per method, reported as mean ± std")
    seeds_per_method: tuple[tuple[str, int], ...] = _opt(
        (), "per-method seed counts overriding --seeds, e.g. dkd=1,dist=1 (default: none)")
    max_parallel_students: int = _opt(8, "at most K students per compiled step")
    log_every: int = _opt(50, "steps between logged metrics")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on, in one object (see the module docstring)."""

    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
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
        for f in dataclasses.fields(type(section.default)):
            assert f.name not in out, f"setting {f.name} is in two sections"
            out[f.name] = (section.name, f)
    return out


LEAVES = _leaves()


def flat(config: ExperimentConfig) -> dict[str, Any]:
    """``{setting: value}`` over all sections."""
    return {name: getattr(getattr(config, section), name)
            for name, (section, _) in LEAVES.items()}


def configure(base: ExperimentConfig | None = None, **settings) -> ExperimentConfig:
    """``base`` (default: the defaults) with settings replaced by name, whatever section.

    Setting ``teacher_checkpoint`` without ``teacher`` (or ``dataset``) in the same call takes
    the teacher's architecture (and dataset) from the checkpoint, so that a file and the same
    flags mean the same run; a ``teacher`` or ``dataset`` given beside it must match it (the
    run checks).
    """
    base = base or ExperimentConfig()
    by_section: dict[str, dict] = {}
    for name, value in settings.items():
        if name not in LEAVES:
            raise ConfigError(f"unknown setting {name!r}; settings: {', '.join(LEAVES)}.")
        by_section.setdefault(LEAVES[name][0], {})[name] = _coerce(name, value)
    spec = settings.get("teacher_checkpoint")
    if spec and not ("teacher" in settings and "dataset" in settings):
        meta = _teacher_meta(spec)
        if "teacher" not in settings:
            by_section.setdefault("run", {})["teacher"] = meta["arch"]
        if "dataset" not in settings and meta.get("dataset") in ("cifar10", "cifar100",
                                                                  "imagenet2012"):
            by_section.setdefault("data", {})["dataset"] = meta["dataset"]
    return dataclasses.replace(base, **{
        s: dataclasses.replace(getattr(base, s), **v) for s, v in by_section.items()})


def _teacher_meta(spec: str) -> dict:
    from kd_jax import pretrained
    try:
        return pretrained.teacher_meta(spec)
    except ValueError as err:
        raise ConfigError(f"--teacher-checkpoint {err}") from err


def _coerce(name: str, value):
    """JSON/flag values in the field's type (lists -> tuples)."""
    if name == "seeds_per_method":
        if isinstance(value, str):
            pairs = [p.split("=") for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"--seeds-per-method takes method=N pairs, got {value!r}.")
            value = [(m.strip(), n) for m, n in pairs]
        try:
            return tuple((str(m), int(n)) for m, n in (value.items() if isinstance(value, dict)
                                                       else value))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"seeds_per_method must be method=N pairs, got {value!r}.") \
                from err
    if name in ("methods", "terms") and isinstance(value, str):
        return tuple(m.strip() for m in value.split(",") if m.strip())
    if name == "milestones" and isinstance(value, str):
        try:
            return tuple(float(m) for m in value.split(",") if m.strip())
        except ValueError as err:
            raise ConfigError(f"--milestones takes a comma list of fractions, got {value!r}.") \
                from err
    if isinstance(value, list):
        return tuple(value)
    return value


def flag(name: str) -> str:
    """The CLI flag of a setting: ``--field-name`` (or its ``flag`` metadata)."""
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
                             dataset="cifar10",
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
    # ImageNet, mdistiller's recipe for ResNet-34 -> ResNet-18: SGD 0.9, lr 0.2 at batch 512,
    # weight decay 1e-4, 100 epochs, x0.1 at 30/60/90; KD with T=1, 0.5 CE + 0.5 KD. The
    # teacher is a converted torchvision ResNet-34 (--teacher-checkpoint).
    "imagenet": configure(dataset="imagenet2012", teacher="imagenet_resnet34",
                          student="imagenet_resnet18", methods=("kd",), temperature=1.0,
                          alpha=0.5, epochs=100, batch_size=512, lr=0.2, lr_batch_size=512,
                          momentum=0.9, weight_decay=1e-4, schedule="step",
                          milestones=(0.3, 0.6, 0.9), eval_batch_size=500, log_every=100),
    # The ImageNet flow on a small image folder (--dataset folder:DIR) at 64 pixels with a
    # converted teacher: a few minutes on a 2-core CPU.
    "imagenet-smoke": configure(dataset="imagenet2012", teacher="imagenet_resnet18",
                                student="imagenet_resnet18", methods=("kd",), temperature=1.0,
                                alpha=0.5, epochs=1, teacher_epochs=1, batch_size=16, lr=0.1,
                                lr_batch_size=256, momentum=0.9, weight_decay=1e-4,
                                schedule="cosine", image_size=64, workers=0,
                                eval_batch_size=32, log_every=2),
}

# One line per preset, for --help and the README.
PRESET_HELP = {
    "default": "the CRD benchmark recipe: CIFAR-10, resnet56 -> resnet20, KD, 240 epochs",
    "smoke": "every phase on 1,000 images with resnet14 -> resnet8 (about 80 s on a 2-core CPU)",
    "seed": "the blog post this project grew from: resnet18 -> resnet18, Adam, T=5, alpha 0.5",
    "cifar10-cpu": "shipped resnet56 -> resnet8 on CIFAR-10, none/kd/dkd/dist, 5 epochs",
    "cifar100-cpu": "shipped resnet56 -> resnet8 (B) on CIFAR-100, six methods, 5 epochs",
    "imagenet": "mdistiller's ImageNet recipe: converted ResNet-34 -> ResNet-18, KD T=1, 100 "
                "epochs",
    "imagenet-smoke": "the ImageNet flow on a small --dataset folder:DIR at 64 px, 1 epoch",
}
assert set(PRESET_HELP) == set(PRESETS)


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from ``path``: JSON (nested by section as in ``config.json``, or flat) or a
    Python file defining ``config`` (an :class:`ExperimentConfig` or a dict of settings).

    A file's ``configure(..., teacher_checkpoint=...)`` infers the teacher as the same flags
    do (see :func:`configure`).
    """
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
                raise ConfigError(f"--config {path} defines no `config`.")
            raw = namespace["config"]
        else:
            raise ConfigError(f"--config {path}: use a .json or .py file.")
    except (OSError, ValueError, SyntaxError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--config {path} cannot be read ({type(err).__name__}: {err}).") \
            from err
    if isinstance(raw, ExperimentConfig):
        return flat(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold settings (a JSON object or a dict).")
    settings = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            settings.update(value)
        else:
            settings[key] = value
    return settings
