"""experiments/cifar_kd.py under hostile use: no stuck runs, no silent wrong results, one clear
line (exit 2) for every mistake, no lost or duplicated records.

Library-side promises (non-finite losses, labels, checkpoint digests and fallback) are tested
in test_losses.py and test_checkpoint.py.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_experiment import (SCRIPT, SHARED_TFDS, cifar_kd, fake_cifar,  # noqa: F401
                             smoke_run)


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def _copy(smoke_run, tmp_path):
    workdir, argv = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy, [a if a != str(workdir) else str(copy) for a in argv]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ one line, exit 2

@pytest.mark.parametrize("args, message", [
    (["--train-subset", "0"], "--train-subset must be at least 1"),
    (["--test-subset", "-5"], "--test-subset must be at least 1"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--alpha", "nan"], "--alpha must be in [0, 1]"),
    (["--student", "vgg8", "--student-shortcut", "B"], "--student-shortcut applies to ResNet"),
])
def test_bad_values_end_with_one_line_before_training(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--workdir",
                           str(tmp_path / "w"), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in _one_line(proc.stderr)
    assert not (tmp_path / "w").exists()  # validated before anything was created


def test_students_checkpoint_is_not_a_teacher(smoke_run, tmp_path, capsys):
    workdir, argv = smoke_run
    (students,) = glob.glob(str(workdir / "students_*" / "checkpoints" / "*"))[:1]
    code = cifar_kd.main(["--preset", "smoke", "--workdir", str(tmp_path / "w"),
                          "--teacher-checkpoint", students])
    assert code == 2
    assert "is not a teacher checkpoint" in _one_line(capsys.readouterr().err)


def test_teacher_checkpoint_whose_arrays_do_not_match_its_metadata(fake_cifar, tmp_path,
                                                                   capsys):
    import jax
    import jax.numpy as jnp
    from kd_jax import checkpoint, models, pretrained
    wrong = models.create("resnet8", 10)
    variables = wrong.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    checkpoint.save_variables(tmp_path / "t", variables,
                              pretrained.info("resnet20", dataset="cifar10"))
    code = cifar_kd.main(["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir",
                          str(tmp_path / "w"), "--teacher-checkpoint", str(tmp_path / "t")])
    assert code == 2
    assert "its arrays cannot be read as a resnet20" in _one_line(capsys.readouterr().err)


def test_multi_host_mistakes_end_with_one_line(tmp_path):
    for args in (["--num-processes", "2", "--process-id", "0"],
                 ["--coordinator-address", "localhost", "--num-processes", "2",
                  "--process-id", "0"],
                 ["--coordinator-address", "localhost:1234", "--num-processes", "2",
                  "--process-id", "2"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--workdir",
                               str(tmp_path / "w"), *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        _one_line(proc.stderr)


def test_full_disk_is_one_line_and_the_run_resumes(fake_cifar, tmp_path, monkeypatch,
                                                   capsys):
    from kd_jax import checkpoint
    argv = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir",
            str(tmp_path / "w"), "--no-progress", "--epochs", "1", "--teacher-epochs", "1",
            "--train-subset", "240", "--test-subset", "100"]
    real_save = checkpoint.Checkpointer.save

    def full(self, *a, **kw):
        # What Orbax/TensorStore raise on a full disk (seen on a 300 kB tmpfs); the OSError
        # form (errno ENOSPC) is checked in test_cli.py.
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local '
                         f'file "{tmp_path}/w/ocdbt.process_0/": Failed to write 1672542 bytes '
                         "to file 9: No space left on device [os_error_code='28']")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", full)
    assert cifar_kd.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert "no space left on device" in line and str(tmp_path / "w") in line and "MB" in line
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    assert cifar_kd.main(argv) == 0


@pytest.mark.skipif(not SHARED_TFDS.exists(), reason="../shared/tfds is not present")
def test_ctrl_c_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", "--workdir",
                             str(tmp_path / "w"), "--no-progress", "--data-dir",
                             str(SHARED_TFDS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "data:" not in _read(tmp_path / "w" / "log.txt") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to resume" in _one_line(err)


def test_ctrl_c_swallowed_by_a_callback_still_stops_the_run(monkeypatch, capsys):
    # JAX's gc callback swallows a KeyboardInterrupt raised inside it ("Exception ignored
    # in: <function _xla_gc_callback ...>"); the run must still end with status 130.
    def swallowing_main(config, args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0

    monkeypatch.setattr(cifar_kd, "_main", swallowing_main)
    before = signal.getsignal(signal.SIGINT)
    assert cifar_kd.main(["--preset", "smoke"]) == 130
    assert "interrupted; rerun the same command" in _one_line(capsys.readouterr().err)
    assert signal.getsignal(signal.SIGINT) is before  # restored for the caller


# ------------------------------------------------------------------------ stuck runs

def test_truncated_results_files_are_recomputed(smoke_run, tmp_path, capsys):
    copy, argv = _copy(smoke_run, tmp_path)
    before = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text('{"dataset": "cif')
    (done,) = glob.glob(str(copy / "students_*" / "result.json"))
    Path(done).write_text("[{")
    (teacher_done,) = glob.glob(str(copy / "teacher_*" / "result.json"))
    Path(teacher_done).write_text("{")
    assert cifar_kd.main(argv) == 0
    after = json.loads((copy / "results.json").read_text())
    assert [s["test_accuracy"] for s in after["students"]] == \
        [s["test_accuracy"] for s in before["students"]]
    assert after["teacher"]["test_accuracy"] == before["teacher"]["test_accuracy"]
    assert cifar_kd.main(argv) == 0 and "stored results" in capsys.readouterr().out


def test_truncated_trained_teacher_is_rebuilt_from_its_checkpoints(smoke_run, tmp_path):
    copy, argv = _copy(smoke_run, tmp_path)
    before = json.loads((copy / "results.json").read_text())
    os.remove(copy / "results.json")
    (final,) = glob.glob(str(copy / "teacher_*" / "final"))
    for path in glob.glob(os.path.join(final, "variables", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    assert cifar_kd.main(argv) == 0
    assert "recomputing it from its checkpoints" in (copy / "log.txt").read_text()
    after = json.loads((copy / "results.json").read_text())
    assert after["teacher"]["test_accuracy"] == before["teacher"]["test_accuracy"]
    assert cifar_kd.main(argv) == 0  # and the rebuilt teacher loads


# ------------------------------------------------------------- records and workdirs

def test_records_of_every_configuration_are_kept(smoke_run, tmp_path):
    copy, argv = _copy(smoke_run, tmp_path)
    first = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    runs_before = {r["run"] for r in first if r["phase"] == "students1"}
    # Another student configuration in the same workdir: its pass is also "students1".
    assert cifar_kd.main([*argv, "--epochs", "1"]) == 0
    records = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    for r in first:
        assert r in records
    runs_after = {r["run"] for r in records if r["phase"] == "students1"}
    assert len(runs_after) == len(runs_before) + 1


def test_a_second_run_in_one_workdir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r);"
        "import importlib.util as u; s = u.spec_from_file_location('c', %r); m = "
        "u.module_from_spec(s); sys.modules['c'] = m; s.loader.exec_module(m);"
        "lock = m.acquire_workdir_lock(%r); print('locked', flush=True); time.sleep(60)")
        % (str(SCRIPT.parent), str(SCRIPT), str(tmp_path))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--workdir",
                           str(tmp_path), "--data-dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"(pid {holder.pid})" in _one_line(proc.stderr)
    holder.kill()
    holder.wait()
    lock = cifar_kd.acquire_workdir_lock(str(tmp_path))  # the kernel released it
    lock.close()


@pytest.mark.skipif(not SHARED_TFDS.exists(), reason="../shared/tfds is not present")
def test_a_damaged_tfds_record_file_is_named_in_one_line(tmp_path):
    source = SHARED_TFDS / "cifar10" / "3.0.2"
    target = tmp_path / "tfds" / "cifar10" / "3.0.2"
    target.mkdir(parents=True)
    for path in source.iterdir():
        if "test.array_record" in path.name:  # a truncated copy
            (target / path.name).write_bytes(path.read_bytes()[:1_000_000])
        else:
            (target / path.name).symlink_to(path)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--data-dir",
                           str(tmp_path / "tfds"), "--train-subset", "100", "--test-subset", "100",
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert "cifar10-test.array_record-00000-of-00001" in line and "prepare it again" in line
