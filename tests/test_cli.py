"""experiments/cifar_kd.py's front door, as a new user meets it: one line and exit 2 for every
mistake, before anything is written; a file and the same flags mean the same run."""

import json
import os
import subprocess
import sys

import pytest

from test_experiment import SCRIPT, cifar_kd


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cifar_kd.main(argv)
    return info.value.code, _one_line(capsys.readouterr().err)


def test_unknown_flag_is_one_line_with_the_close_flag(capsys):
    code, line = _exit(["--preset", "smoke", "--learning-rate", "0.1"], capsys)
    assert code == 2 and "unrecognized arguments: --learning-rate 0.1" in line
    assert "did you mean --lr" in line
    code, line = _exit(["--epoks", "3"], capsys)
    assert code == 2 and "--epochs" in line.split("did you mean", 1)[1]


def test_invalid_choice_is_one_line(capsys):
    code, line = _exit(["--dataset", "imagenet"], capsys)
    assert code == 2 and "invalid choice: 'imagenet'" in line and "cifar100" in line


def test_nonexistent_data_dir_is_one_line_and_creates_nothing(tmp_path, capsys):
    argv = ["--preset", "smoke", "--data-dir", str(tmp_path / "nowhere"), "--workdir",
            str(tmp_path / "w")]
    assert cifar_kd.main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--data-dir {tmp_path / 'nowhere'} does not exist" in line
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "w").exists()


def test_a_config_file_and_the_same_flags_mean_the_same_run(tmp_path):
    """The teacher is inferred from --teacher-checkpoint in a .py or .json file as for flags."""
    flags, _ = cifar_kd.parse_args(["--preset", "smoke", "--teacher-checkpoint",
                                    "pretrained:cifar10/resnet20", "--student", "resnet8"])
    assert flags.run.teacher == "resnet20" and flags.data.dataset == "cifar10"
    (tmp_path / "c.py").write_text(
        'config = configure(PRESETS["smoke"], teacher_checkpoint="pretrained:cifar10/resnet20",'
        ' student="resnet8")\n')
    from_py, _ = cifar_kd.parse_args(["--config", str(tmp_path / "c.py")])
    (tmp_path / "c.json").write_text(json.dumps(
        {"teacher_checkpoint": "pretrained:cifar10/resnet20", "student": "resnet8"}))
    from_json, _ = cifar_kd.parse_args(["--preset", "smoke", "--config", str(tmp_path / "c.json")])
    assert from_py == flags == from_json
    # A teacher given beside the checkpoint is kept, and a mismatch refused in one line.
    wrong, _ = cifar_kd.parse_args(["--preset", "smoke", "--teacher-checkpoint",
                                    "pretrained:cifar10/resnet20", "--teacher", "resnet56"])
    assert wrong.run.teacher == "resnet56"


def test_a_rejected_configuration_writes_nothing(tmp_path, capsys):
    """A refused run leaves a finished run's config.json as it was (no lock file, nothing)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"kept": true}')
    for bad in (["--teacher-checkpoint", "pretrained:cifar10/resnet20", "--teacher", "resnet56"],
                ["--epochs", "0"], ["--method", "kd,nope"], ["--term", "kd.temperature=-1"]):
        assert cifar_kd.main(["--preset", "smoke", "--workdir", str(workdir), *bad]) == 2, bad
        _one_line(capsys.readouterr().err)
        assert sorted(os.listdir(workdir)) == ["config.json"], bad
        assert (workdir / "config.json").read_text() == '{"kept": true}'
    assert cifar_kd.main(["--preset", "smoke", "--workdir", str(tmp_path / "new"),
                          "--teacher-checkpoint", "pretrained:cifar10/resnet20",
                          "--teacher", "resnet56"]) == 2
    assert "holds a resnet20" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_batch_not_divisible_by_devices_writes_nothing(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--batch-size", "30",
                           "--workdir", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "batch size 30 is not divisible by the 4 devices" in _one_line(proc.stderr)
    assert not (tmp_path / "w").exists()


def test_full_disk_errors_are_recognised():
    import errno
    from kd_jax.experiment import workdir
    assert workdir.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert workdir.is_disk_full(ValueError("RESOURCE_EXHAUSTED: Error writing local file 'x'"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "disk")
    assert workdir.is_disk_full(wrapped)
    assert not workdir.is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))
    assert not workdir.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_test_split_other_than_the_published_one_is_noted():
    """A published teacher evaluated on a CIFAR-10 test split that is not the published one
    (the JPEG copy in ../shared/tfds) gets a note that the JPEG copy costs about 10 points."""
    import numpy as np
    from test_experiment import SHARED_TFDS
    from kd_jax.experiment import phases
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int32)
    assert phases.differs_from_published("cifar10", images, labels)
    assert not phases.differs_from_published("cifar100", images, labels)  # no digest known
    assert "about 10 points" in phases._NOT_PUBLISHED_NOTE
    if not SHARED_TFDS.exists():
        pytest.skip("../shared/tfds is not present (external)")
    from kd_jax import data
    assert phases.differs_from_published(
        "cifar10", *data.load_arrays("cifar10", "test", data_dir=str(SHARED_TFDS)))
