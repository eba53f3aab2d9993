"""The install: a light `import kd_jax.losses`, a `[prepare]` extra that prepares CIFAR, and
packaging metadata that matches the code (licence, dependencies, extras)."""

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "flax", "optax"]


def _python(*parts: str, timeout: int = 300) -> str:
    """Runs the parts (each dedented) as one script in a fresh interpreter; its stdout."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ------------------------------------------------------------------------ light import


def test_import_kd_jax_losses_loads_only_jax_and_numpy():
    out = _python(f"""
        import json, sys
        import kd_jax.losses
        import kd_jax
        kd_jax.distillation_loss, kd_jax.soft_target_kl  # re-exported losses stay light
        heavy = {HEAVY!r}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """)
    assert json.loads(out.splitlines()[-1]) == []


def test_lazy_package_keeps_every_public_name():
    out = _python("""
        import json, kd_jax
        names = list(kd_jax.__all__)
        namespace = {}
        exec("from kd_jax import *", namespace)
        missing = [n for n in names if n not in namespace or n not in dir(kd_jax)]
        print(json.dumps({"names": names, "missing": missing,
                          "same": kd_jax.distill_step is kd_jax.train.distill_step,
                          "loss": kd_jax.dkd_loss.__module__}))
    """)
    result = json.loads(out.splitlines()[-1])
    assert result["missing"] == [] and result["same"] and result["loss"] == "kd_jax.losses"
    assert {"losses", "models", "data", "parallel", "train", "distillation_loss", "METHODS",
            "TrainState"} <= set(result["names"])
    import kd_jax

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        kd_jax.nonexistent  # noqa: B018


# ------------------------------------------------------------------- the [prepare] extra

needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason='TensorFlow is not installed (pip install -e ".[prepare]")')

# Run first in each prepare subprocess: no socket can connect, so the test is the same with
# or without a network, and TFDS gives up at once instead of backing off for 200 s.
_OFFLINE = """
    import socket
    def _no_network(*args, **kwargs):
        raise OSError("kd_jax test: network disabled")
    socket.socket.connect = _no_network
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network
    from tensorflow_datasets.core.download import downloader
    downloader.MAX_RETRIES = 0
    import tensorflow_datasets as tfds
"""


@needs_tensorflow
def test_prepare_reaches_the_download_offline(tmp_path):
    # Everything TFDS's cifar10/cifar100 preparation imports before downloading is
    # installed: offline, the only error left is the network's.
    out = _python(_OFFLINE, f"""
        import json
        errors = {{}}
        for name in ["cifar10", "cifar100"]:
            builder = tfds.builder(name, data_dir={str(tmp_path)!r}, file_format="array_record")
            try:
                builder.download_and_prepare(file_format="array_record")
            except Exception as err:
                errors[name] = [type(err).__module__ + "." + type(err).__name__, str(err)]
        print(json.dumps(errors))
    """)
    errors = json.loads(out.splitlines()[-1])
    for name, archive in [("cifar10", "cifar-10-binary.tar.gz"),
                          ("cifar100", "cifar-100-binary.tar.gz")]:
        kind, message = errors[name]
        assert kind == "requests.exceptions.ConnectionError", errors[name]
        assert "kd_jax test: network disabled" in message and archive in message, errors[name]


# A stand-in for the extracted CIFAR archives in their binary format: per record the label
# byte(s) (coarse before fine for CIFAR-100), then 3072 bytes of pixels, channel-major.
_FAKE_ARCHIVE = """
    import os
    import numpy as np
    LAYOUT = {
        "cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)],
                    ["test_batch.bin"], {"batches.meta.txt": 10}, [10]),
        "cifar100": ("cifar-100-binary", ["train.bin"], ["test.bin"],
                     {"coarse_label_names.txt": 20, "fine_label_names.txt": 100}, [20, 100]),
    }

    def fake_archive(root, name, per_file=3):
        prefix, train, test, names, classes = LAYOUT[name]
        folder = os.path.join(root, prefix)
        os.makedirs(folder)
        for file, n in names.items():
            with open(os.path.join(folder, file), "w") as f:
                f.write("".join(f"class{i}\\n" for i in range(n)))
        rng = np.random.default_rng(len(name))
        expected = {}
        for split, files in [("train", train), ("test", test)]:
            rows = []
            for file in files:
                records = []
                for _ in range(per_file):
                    labels = [int(rng.integers(0, c)) for c in classes]
                    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    records.append(bytes(labels) + image.transpose(2, 0, 1).tobytes())
                    rows.append((image.tobytes(), labels[-1]))
                with open(os.path.join(folder, file), "wb") as f:
                    f.write(b"".join(records))
            expected[split] = sorted(rows)
        return expected
"""


@pytest.mark.slow
@needs_tensorflow
def test_prepare_writes_array_records_that_load_arrays_reads(tmp_path):
    # The whole preparation after the download (TensorFlow's file reading, the array_record
    # writer, dataset statistics) on a small archive, then kd_jax's reader on its output.
    out = _python(_OFFLINE, _FAKE_ARCHIVE, f"""
        from kd_jax import data
        tmp = {str(tmp_path)!r}
        for name in ["cifar10", "cifar100"]:
            archive = os.path.join(tmp, name + "-archive")
            expected = fake_archive(archive, name)
            tfds.download.DownloadManager.download_and_extract = lambda self, url: archive
            tfds.builder(name, data_dir=os.path.join(tmp, "tfds"),
                         file_format="array_record").download_and_prepare(
                             file_format="array_record")
            for split in ["train", "test"]:
                images, labels = data.load_arrays(name, split, data_dir=os.path.join(tmp, "tfds"),
                                                  cache_dir=os.path.join(tmp, "cache"))
                got = sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))
                assert got == expected[split], (name, split)  # TFDS shuffles the order
                print("prepared", name, split, len(got))
    """)
    for line in ["prepared cifar10 train 15", "prepared cifar10 test 3",
                 "prepared cifar100 train 3", "prepared cifar100 test 3"]:
        assert line in out, out


# ------------------------------------------------------------------------- packaging


def test_license_file_is_the_declared_apache_2_0():
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    for phrase in ["Version 2.0, January 2004", "http://www.apache.org/licenses/",
                   "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                   "END OF TERMS AND CONDITIONS"]:
        assert phrase in text, phrase


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level module names imported at module level, and inside functions."""
    eager, deferred = set(), set()
    tree = ast.parse(path.read_text())

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            else:
                visit(child, inner)
                continue
            (deferred if nested else eager).update(n.split(".")[0] for n in names)

    visit(tree, False)
    return eager, deferred


def test_every_import_of_the_package_is_a_declared_dependency():
    project = _pyproject()["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    to_dists = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted((ROOT / "kd_jax").rglob("*.py")):
        eager, deferred = _imports(path)
        for names, allowed in [(eager, core), (deferred, core | extras)]:
            for module in sorted(names - set(sys.stdlib_module_names) - {"kd_jax"}):
                dists = {_name(d) for d in to_dists.get(module, [module])}
                if not dists & allowed:
                    problems.append(f"{path.relative_to(ROOT)} imports {module} ({dists})")
    assert problems == []
    assert "chex" not in core  # used by the tests only
    assert "chex" in {_name(r) for r in project["optional-dependencies"]["test"]}


def test_extras_are_ranges_and_prepare_brings_importlib_resources():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"prepare", "test", "tensorboard", "torch"} <= set(extras)
    assert "importlib_resources" in {r.split(">")[0] for r in extras["prepare"]}
    assert extras["torch"] == ["torch>=2.4,<3"]
    for reqs in extras.values():
        for r in reqs:
            assert "==" not in r.split(";")[0], r  # ranges, not pins


def test_the_library_never_imports_the_scripts_and_its_modules_stay_small():
    """Imports flow one way (nothing in kd_jax/ imports experiments/ or benchmarks/), the CLI
    stays thin, and no module grows past ~500 lines."""
    for path in sorted((ROOT / "kd_jax").rglob("*.py")):
        eager, deferred = _imports(path)
        assert not {"experiments", "benchmarks"} & (eager | deferred), path
        assert len(path.read_text().splitlines()) <= 520, path
    assert len((ROOT / "experiments" / "cifar_kd.py").read_text().splitlines()) <= 250
