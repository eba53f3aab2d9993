"""The experiment as a library: teacher, baseline and distilled students, and the table.

    from kd_jax.experiment import run, configure, PRESETS
    res = run(configure(PRESETS["smoke"], data_dir="../shared/tfds"), "runs/py")
    print(res.table())

``experiments/cifar_kd.py`` is this module's command line. Modules: ``config`` (the
configuration sections, ``PRESETS``, ``configure``, ``--config`` files), ``plan`` (checks,
jobs, passes, objectives, the phases' keys), ``phases`` (the teacher phase and the student
passes), ``report`` (``Results``, the table, the curves), ``workdir`` (lock, atomic JSON, full
disks), ``runner`` (``run``). Importing this package compiles nothing.
"""

from kd_jax.experiment.config import ConfigError
from kd_jax.experiment.config import DataConfig
from kd_jax.experiment.config import ExperimentConfig
from kd_jax.experiment.config import LEAVES
from kd_jax.experiment.config import ObjectiveConfig
from kd_jax.experiment.config import OptimConfig
from kd_jax.experiment.config import PRESET_HELP
from kd_jax.experiment.config import PRESETS
from kd_jax.experiment.config import RunConfig
from kd_jax.experiment.config import ScheduleConfig
from kd_jax.experiment.config import configure
from kd_jax.experiment.config import flat
from kd_jax.experiment.config import flag
from kd_jax.experiment.config import load_config_file
from kd_jax.experiment.plan import student_jobs
from kd_jax.experiment.plan import student_objective
from kd_jax.experiment.plan import students_key
from kd_jax.experiment.plan import teacher_key
from kd_jax.experiment.plan import validate
from kd_jax.experiment.report import Results
from kd_jax.experiment.report import results_table
from kd_jax.experiment.runner import default_workdir
from kd_jax.experiment.runner import preflight
from kd_jax.experiment.runner import run
from kd_jax.experiment.runner import stored_results
from kd_jax.experiment.workdir import DiskFullError
from kd_jax.experiment.workdir import acquire_lock

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiskFullError",
    "ExperimentConfig",
    "LEAVES",
    "ObjectiveConfig",
    "OptimConfig",
    "PRESETS",
    "PRESET_HELP",
    "Results",
    "RunConfig",
    "ScheduleConfig",
    "acquire_lock",
    "configure",
    "default_workdir",
    "flag",
    "flat",
    "load_config_file",
    "preflight",
    "results_table",
    "run",
    "stored_results",
    "student_jobs",
    "student_objective",
    "students_key",
    "teacher_key",
    "validate",
]
