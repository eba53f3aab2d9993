"""Orbax checkpoints: last k + best, corrupt-latest fallback, interrupted saves, teacher export."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _tree(value):
    return {"w": jnp.full((4,), value, jnp.float32), "step": jnp.int32(value)}


def test_keeps_the_last_k_and_the_best(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    for step, acc in [(1, 0.3), (2, 0.9), (3, 0.5), (4, 0.6), (5, 0.4)]:
        ckpt.save(step, _tree(step), meta={"epoch": step}, metrics={"test_accuracy": acc})
    assert ckpt.all_steps() == [2, 4, 5]  # best (0.9 at step 2) + the last two
    step, tree, meta = ckpt.restore(_tree(0))
    assert step == 5 and meta == {"epoch": 5}
    np.testing.assert_array_equal(tree["w"], np.full(4, 5.0))


def _corrupt(step_dir: Path):
    for path in step_dir.rglob("*"):
        if path.is_file() and "state" in path.parts:
            path.write_bytes(b"not a checkpoint")


def test_corrupt_latest_falls_back_to_the_previous_with_a_warning(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _tree(step), meta={"epoch": step}, metrics={"test_accuracy": 0.1})
    _corrupt(tmp_path / "2")
    with pytest.warns(UserWarning, match="step 2 .* could not be read"):
        step, tree, _ = ckpt.restore(_tree(0))
    assert step == 1
    np.testing.assert_array_equal(tree["w"], np.full(4, 1.0))


def test_no_checkpoint_restores_none(tmp_path):
    assert checkpoint.Checkpointer(tmp_path).restore(_tree(0)) is None


_SAVER = """
import sys, jax.numpy as jnp
from kd_jax import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=3)
ckpt.save(1, {"w": jnp.ones((4,))}, meta={"epoch": 1}, metrics={"test_accuracy": 0.5})
print("saved 1", flush=True)
big = {"w": jnp.ones((4,)), "big": jnp.zeros((64, 1024, 1024))}   # 256 MiB: a slow save
ckpt.save(2, big, meta={"epoch": 2}, metrics={"test_accuracy": 0.6})
print("saved 2", flush=True)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    deadline = time.time() + 60
    while time.time() < deadline:  # kill as soon as step 2's temporary directory appears
        if any(p.name.startswith("2") and p.name != "2" for p in tmp_path.iterdir()):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "2").exists() or not (tmp_path / "2" / "_CHECKPOINT_METADATA").exists()
    step, tree, meta = checkpoint.Checkpointer(tmp_path).restore({"w": jnp.zeros((4,))})
    assert step == 1 and meta == {"epoch": 1}
    np.testing.assert_array_equal(tree["w"], np.ones(4))


def test_variables_export_round_trip(tmp_path):
    variables = {"params": {"w": jnp.arange(3.0)}, "batch_stats": {"m": jnp.ones(2)}}
    meta = {"arch": "resnet8", "num_classes": 10, "test_accuracy": 0.5}
    checkpoint.save_variables(tmp_path / "t", variables, meta)
    assert checkpoint.load_meta(tmp_path / "t") == meta
    restored, meta2 = checkpoint.load_variables(tmp_path / "t", variables)
    assert meta2 == meta
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))


# ------------------------------------------------------------------ corrupt checkpoints

def _garbage_meta(step_dir: Path):
    (step_dir / "meta" / "metadata").write_text("{not json")


def _truncate_data(step_dir: Path):
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(files[-1].stat().st_size // 2)


def _delete_data(step_dir: Path):
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for path in data:
        path.unlink()


def _swap_arrays(step_dir: Path):
    """Valid arrays of another step: only the recorded digest can tell (bit rot that
    decodes, or two changed weights)."""
    import shutil
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


@pytest.mark.parametrize("damage", [_garbage_meta, _truncate_data, _delete_data, _swap_arrays])
def test_a_corrupt_step_is_moved_aside_and_can_be_saved_again(tmp_path, damage):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _tree(step), meta={"epoch": step}, metrics={"test_accuracy": 0.1})
    damage(tmp_path / "2")
    with pytest.warns(UserWarning, match="step 2 .* could not be read.*moved it to"):
        step, tree, meta = ckpt.restore(_tree(0))
    assert step == 1 and meta == {"epoch": 1}
    np.testing.assert_array_equal(tree["w"], np.full(4, 1.0))
    assert ckpt.all_steps() == [1]
    assert len(list((tmp_path / "corrupt").iterdir())) == 1  # kept for inspection
    # The rerun saves step 2 again instead of dying with StepAlreadyExistsError.
    ckpt.save(2, _tree(2), meta={"epoch": 2}, metrics={"test_accuracy": 0.1})
    assert ckpt.restore(_tree(0))[0] == 2


def test_with_every_checkpoint_bad_the_run_starts_afresh_with_a_warning(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    ckpt.save(1, _tree(1), meta={"epoch": 1}, metrics={"test_accuracy": 0.1})
    _garbage_meta(tmp_path / "1")
    with pytest.warns(UserWarning, match="no readable checkpoint .* starting afresh"):
        assert ckpt.restore(_tree(0)) is None
    ckpt.save(1, _tree(1), meta={"epoch": 1}, metrics={"test_accuracy": 0.1})


def test_changed_weights_of_a_saved_model_are_detected(tmp_path):
    checkpoint.save_variables(tmp_path / "a", {"params": {"w": jnp.arange(4.0)}}, {"arch": "x"})
    checkpoint.save_variables(tmp_path / "b", {"params": {"w": jnp.arange(4.0) + 1}},
                              {"arch": "x"})
    variables, meta = checkpoint.load_variables(tmp_path / "a")
    assert meta == {"arch": "x"}
    assert checkpoint.variables_digest(tmp_path / "a") == checkpoint.tree_digest(variables)
    import shutil
    shutil.rmtree(tmp_path / "a" / "variables")
    shutil.copytree(tmp_path / "b" / "variables", tmp_path / "a" / "variables")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="do not match the SHA-256"):
        checkpoint.load_variables(tmp_path / "a")


def test_a_full_disk_is_raised_without_worker_tracebacks(tmp_path, capfd):
    """On a real full disk (a 300 kB tmpfs) Orbax raises in the caller and its worker threads'
    log records are dropped, so the experiment can report one line. Needs root to mount."""
    import subprocess
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (external)")
    try:
        ckpt = checkpoint.Checkpointer(mount / "ck")
        big = {"a": jax.random.normal(jax.random.key(0), (500_000,))}
        with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED") as info:
            ckpt.save(1, big, meta={}, metrics={"test_accuracy": 0.0})
        from kd_jax.experiment.workdir import is_disk_full
        assert is_disk_full(info.value)
        assert "raised an exception" not in capfd.readouterr().err
        ckpt.close()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
