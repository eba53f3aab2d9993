"""The ImageNet path end to end on an image folder the test makes: --preset imagenet-smoke
with --dataset folder:DIR and a converted-style teacher (random weights: no published ImageNet
weights are reachable here), the usual outputs, and a resume after SIGKILL that ends
bit-identical to the uninterrupted run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cifar_kd.py"


def _folder(root: Path, classes=4, train=8, val=3) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (int(x) for x in rng.integers(40, 160, 2))
                img = rng.integers(0, 60, (h, w, 3)) + 60 * np.eye(3, dtype=int)[c % 3] * 2
                Image.fromarray(img.astype(np.uint8)).save(d / f"img{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    from kd_jax import checkpoint, models
    root = tmp_path_factory.mktemp("imagenet")
    folder = _folder(root / "images")
    model = models.create("imagenet_resnet18", 4)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    checkpoint.save_variables(root / "teacher", {"params": v["params"],
                                                 "batch_stats": v["batch_stats"]},
                              {"arch": "imagenet_resnet18", "num_classes": 4, "image_size": 224,
                               "normalization": {"name": "imagenet",
                                                 "mean": [0.485, 0.456, 0.406],
                                                 "std": [0.229, 0.224, 0.225]}})
    argv = ["--preset", "imagenet-smoke", "--dataset", f"folder:{folder}", "--teacher-checkpoint",
            str(root / "teacher"), "--image-size", "32", "--epochs", "2", "--no-progress"]
    return root, argv


def _run(argv, workdir, **kw):
    return subprocess.Popen([sys.executable, str(SCRIPT), *argv, "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _exported(workdir: Path) -> dict:
    from kd_jax import checkpoint
    out = {}
    for path in sorted(glob.glob(str(workdir / "students_*" / "students" / "*"))):
        variables, _ = checkpoint.load_variables(path)
        out[os.path.basename(path)] = variables
    return out


@pytest.mark.slow
def test_imagenet_smoke_on_a_folder_resumes_bit_exactly_after_sigkill(setup):
    import jax
    root, argv = setup
    whole = _run(argv, root / "whole")
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    for name in ("results.json", "results.md", "metrics.jsonl", "curves.png", "config.json"):
        assert (root / "whole" / name).stat().st_size > 0, name
    results = json.loads((root / "whole" / "results.json").read_text())
    assert results["teacher"]["arch"] == "imagenet_resnet18"
    assert {s["method"] for s in results["students"]} == {"none", "kd"}
    assert "[teacher" not in (root / "whole" / "log.txt").read_text()  # no teacher phase

    killed = _run(argv, root / "killed")
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        steps = glob.glob(str(root / "killed" / "students_*" / "checkpoints" / "[0-9]*"))
        if any(os.path.basename(s).isdigit() for s in steps):  # epoch 1 is checkpointed
            break
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert not (root / "killed" / "results.json").exists()
    resumed = _run(argv, root / "killed")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    again = json.loads((root / "killed" / "results.json").read_text())
    assert [s["test_accuracy"] for s in again["students"]] == \
        [s["test_accuracy"] for s in results["students"]]
    a, b = _exported(root / "whole"), _exported(root / "killed")
    assert set(a) == set(b) == {"none_seed0", "kd_seed0"}
    for name in a:
        for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
