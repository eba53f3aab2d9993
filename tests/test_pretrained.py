"""kd_jax.pretrained and kd_jax.convert: the shipped teachers equal PyTorch's, the converter's
mapping, inference and errors, per-teacher normalisation in the distillation step.

The logit fixture (tests/fixtures/pretrained_logits.npz) was made by
tests/fixtures/make_pretrained_logits.py with torch, the torch.save fixtures and digests
(tests/fixtures/torch_files/) by tests/fixtures/make_torch_files.py; these tests need no torch.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, convert, data, models, objectives, pretrained, train

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "pretrained"

_spec = importlib.util.spec_from_file_location("make_pretrained_logits",
                                               FIXTURES / "make_pretrained_logits.py")
_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixture)


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_teacher_logits_equal_pytorch(name):
    dataset, arch = name.split("/")
    model, variables, preprocess = pretrained.load(arch, dataset=dataset)
    expected = np.load(FIXTURES / "pretrained_logits.npz")[name]
    logits = jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))(
        variables, _fixture.fixture_images())
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    # The fixture is not degenerate: several classes are predicted.
    assert len(np.unique(expected.argmax(-1))) >= 3


def test_shipped_teachers_record_their_source_and_preprocessing():
    meta = pretrained.info("resnet56", dataset="cifar100")
    assert meta["shortcut"] == "B" and meta["num_classes"] == 100
    assert meta["normalization"]["mean"] == [0.507, 0.4865, 0.4409]
    assert meta["source"]["sha256"].startswith("f2eff4c8")
    assert meta["license"].startswith("BSD-3-Clause") and meta["published_accuracy"] == 0.7263
    meta10 = pretrained.info("resnet56", dataset="cifar10")
    assert meta10["shortcut"] == "A" and meta10["normalization"]["name"] == "imagenet"
    assert meta10["source"]["sha256"].startswith("4bfd9763")
    # Exact published parameter counts (akamaster: 853,018; option B + 100 classes).
    assert meta10["params"] == 853_018 and meta["params"] == 861_620
    _, _, prep = pretrained.load("resnet20", dataset="cifar10")
    chex.assert_trees_all_close(prep(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0],
                                (1 - np.array([0.485, 0.456, 0.406])) /
                                np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    for notice in ("LICENSE-akamaster", "LICENSE-chenyaofo"):
        assert (Path(pretrained.__file__).parent / notice).stat().st_size > 500


def test_pretrained_names_and_errors():
    assert pretrained.resolve("pretrained:cifar10/resnet56") == pretrained.path(
        "resnet56", dataset="cifar10")
    assert pretrained.resolve("/some/dir") == "/some/dir"
    with pytest.raises(ValueError, match="shipped: cifar10/resnet20"):
        pretrained.load("resnet20", dataset="cifar100")


# ------------------------------------------------------------------- converter (no torch)

def _as_torch_state_dict(variables, *, option, head):
    """kd_jax variables written back in PyTorch's layout (the inverse of the mapping table)."""
    state = {}
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(variables)}
    for key, value in flat.items():
        coll, module, *rest = key.split("/")
        if module == "stem_conv":
            base = "conv1"
        elif module == "stem_bn":
            base = "bn1"
        elif module == "classifier":
            base = head
        else:
            stage, block = module.replace("stage", "").split("_block")
            sub = rest[0]
            sub = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(sub, sub)
            base = f"layer{stage}.{block}.{sub}"
        leaf = rest[-1]
        name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}[leaf]
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        state[f"{base}.{name}"] = value
        if leaf == "var":
            state[f"{base}.num_batches_tracked"] = np.array(7)
    return state


def _random_variables(arch, num_classes, shortcut):
    model = models.create(arch, num_classes, shortcut=shortcut)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)), train=False)
    # Non-trivial BatchNorm statistics, so a swapped mean/var would show.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.uniform(jax.random.PRNGKey(len(str(p))), x.shape)
        if p[0].key == "batch_stats" else x, variables)
    return model, variables


@pytest.mark.parametrize("arch,classes,shortcut,head", [
    ("resnet20", 10, "A", "linear"), ("resnet8", 100, "B", "fc"), ("resnet14", 7, "B", "fc")])
def test_convert_state_dict_round_trip_and_inference(arch, classes, shortcut, head):
    model, variables = _random_variables(arch, classes, shortcut)
    state = _as_torch_state_dict(variables, option=shortcut, head=head)
    # DataParallel's prefix and a {"state_dict": ...} wrapper are tolerated.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    converted, info = convert.convert_state_dict(wrapped)
    assert info == {"arch": arch, "shortcut": shortcut, "num_classes": classes}
    chex.assert_trees_all_equal(converted, jax.tree.map(np.asarray, dict(variables)))


def test_convert_state_dict_rejects_what_does_not_fit():
    _, variables = _random_variables("resnet20", 10, "A")
    state = _as_torch_state_dict(variables, option="A", head="linear")
    with pytest.raises(convert.ConversionError, match="lacks"):
        convert.convert_state_dict({k: v for k, v in state.items() if "layer2.1.bn1.running_var"
                                    not in k})
    with pytest.raises(convert.ConversionError, match="no place"):
        convert.convert_state_dict({**state, "extra.weight": np.zeros(3)})
    with pytest.raises(convert.ConversionError, match="shape"):
        convert.convert_state_dict(state, num_classes=100)
    with pytest.raises(convert.ConversionError, match="layer1..layer3"):
        convert.convert_state_dict({"conv1.weight": np.zeros((16, 3, 3, 3))})


def test_option_a_shortcut_is_strided_subsample_with_planes_over_4_padding():
    # (Stride-2 padding, PyTorch's 1 on each side rather than Flax's asymmetric "SAME", is
    # checked by the logit fixtures above: with "SAME" the logits differ by far more than 1e-4.)
    block = models.resnet._BasicBlock(32, 2, "zero_pad", jnp.float32)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 16))
    bv = block.init(jax.random.PRNGKey(4), h, False)
    # Zero the residual branch's last BN scale and bias: the block returns its shortcut.
    bv = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if p[1].key == "bn2" and p[0].key == "params" else a, bv)
    out = block.apply(bv, h, False)
    expected = jnp.pad(h[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
    chex.assert_trees_all_close(out, expected, atol=1e-6)


@pytest.mark.parametrize("arch,shortcut,count", [
    ("resnet20", "A", 269_722), ("resnet20", "B", 272_474), ("resnet56", "A", 853_018),
    ("resnet56", "B", 855_770)])
def test_parameter_counts_of_both_shortcut_types(arch, shortcut, count):
    model = models.create(arch, 10, shortcut=shortcut)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                          train=False))
    assert models.num_params(v["params"]) == count
    assert models.shortcut_of(model) == shortcut


# ------------------------------------------------- torch.save files read without torch

_torch_spec = importlib.util.spec_from_file_location("make_torch_files",
                                                     FIXTURES / "make_torch_files.py")
_torch_files = importlib.util.module_from_spec(_torch_spec)
_torch_spec.loader.exec_module(_torch_files)
TORCH_FILES = FIXTURES / "torch_files"
_DIGESTS = json.loads((TORCH_FILES / "digests.json").read_text())["files"]
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/pretrained")


def _shared_files():
    return sorted(SHARED.glob("*/*.th")) + sorted(SHARED.glob("*/*.pt"))


def _described(path):
    return _torch_files.digest(convert.read_torch_file(path), _torch_files.numpy_of_array)


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt"])
def test_read_torch_file_equals_torch_load_on_every_kind_of_tensor(name):
    """Both torch.save formats, every storage dtype, views of a shared storage (transpose,
    column, offset tail), scalar, empty, nn.Parameter, plain values: dtype, shape and bytes
    equal what torch.load(weights_only=True) read (recorded by make_torch_files.py)."""
    assert _described(TORCH_FILES / name) == _DIGESTS[name]


@needs_shared
def test_read_torch_file_equals_torch_load_on_the_published_files():
    files = _shared_files()
    assert len(files) == 5
    for path in files:
        assert _torch_files.summary(_described(path)) == _DIGESTS[path.name], path.name


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch; without it the recorded digests above check the same")
def test_read_torch_file_equals_torch_load_here():
    """Where torch is installed: the reader against torch.load directly (and so the recorded
    digests against this torch)."""
    import torch

    for path in [TORCH_FILES / "zip.pt", TORCH_FILES / "legacy.pt", *_shared_files()]:
        ref = _torch_files.digest(torch.load(path, map_location="cpu", weights_only=True),
                                  _torch_files.numpy_of_tensor)
        assert _described(path) == ref, path.name


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_read_torch_file_runs_no_pickled_code(tmp_path):
    """A pickle that would run a command, in either format, is refused before anything runs,
    as torch.load(weights_only=True) refuses it; so are tensors that reach past their
    storage."""
    marker = tmp_path / "ran"
    evil = pickle.dumps({"w": _Evil(marker)}, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", evil)
    legacy = b"".join(pickle.dumps(x, protocol=2) for x in (
        convert._LEGACY_MAGIC, convert._LEGACY_PROTOCOL, {"little_endian": True})) + evil
    (tmp_path / "evil.th").write_bytes(legacy)
    for name in ("evil.pt", "evil.th"):
        with pytest.raises(convert.ConversionError, match="system is not allowed"):
            convert.read_torch_file(tmp_path / name)
    assert not marker.exists()
    # BUILD on an allowed global (here FloatStorage's dtype set to float64) is refused, so a
    # file cannot change how the next one is read.
    def text(s):
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    tamper = b"\x80\x02ctorch\nFloatStorage\n}" + text("dtype") + text("float64") + b"sb."
    with zipfile.ZipFile(tmp_path / "tamper.pt", "w") as z:
        z.writestr("archive/data.pkl", tamper)
    with pytest.raises(convert.ConversionError, match="cannot be set"):
        convert.read_torch_file(tmp_path / "tamper.pt")
    # The zip fixture with its storage cut short: a tensor would read past it.
    with zipfile.ZipFile(TORCH_FILES / "zip.pt") as src, \
            zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-4] if "/data/" in info.filename else data)
    with pytest.raises(convert.ConversionError, match="bytes, not"):
        convert.read_torch_file(tmp_path / "short.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(convert.ConversionError, match="cannot read"):
        convert.read_torch_file(tmp_path / "text.pt")


@pytest.fixture
def without_torch(monkeypatch):
    """``import torch`` fails, as in CI: what runs is kd_jax's own reader."""
    monkeypatch.setitem(sys.modules, "torch", None)


def _convert_command(capsys, *args):
    """``python -m kd_jax.convert ARGS`` in this process: (exit code, stdout, stderr)."""
    code = convert.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_shared
def test_convert_command_on_the_shared_files(tmp_path, capsys, without_torch):
    """The converter CLI on the five published files, as CI runs it: without torch.

    CI installs ``.[test,prepare]``, no torch, so the command reads the files with kd_jax's
    own reader (:func:`kd_jax.convert.read_torch_file`; torch is blocked here, so the same
    path runs where torch is installed). That reader, not torch, is what every user without
    torch runs, and CI checks it against torch.load through the digests recorded with torch
    (tests above; directly against torch where it is installed). Installing torch in CI
    instead would test a path users without torch never take, and add a ~200 MB download.
    """
    files = _shared_files()
    assert len(files) == 5
    for src in files:
        dst = tmp_path / src.stem
        code, out, err = _convert_command(capsys, src, dst)
        assert code == 0, err
        known = convert.KNOWN_SOURCES[convert.sha256_file(src)]
        meta = checkpoint.load_meta(str(dst))
        assert (meta["arch"], meta["dataset"], meta["normalization"]["name"]) == (
            known.arch, known.dataset, known.normalization), out
        loaded = pretrained.load_checkpoint(str(dst))
        assert loaded.model.num_classes == (10 if known.dataset == "cifar10" else 100)
    # Same weights as shipped for the shipped ones.
    for name, stem in [("cifar100/resnet56", "cifar100_resnet56-f2eff4c8"),
                       ("cifar10/resnet20", "resnet20-12fca82f"),
                       ("cifar10/resnet56", "resnet56-4bfd9763")]:
        dataset, arch = name.split("/")
        chex.assert_trees_all_equal(pretrained.load_checkpoint(str(tmp_path / stem)).variables,
                                    pretrained.load(arch, dataset=dataset).variables)


@needs_shared
def test_convert_command_unknown_file_needs_normalization(tmp_path, capsys, without_torch):
    """A valid checkpoint that is not a known published file (the CIFAR-100 resnet56 re-zipped
    under another name: same weights, other SHA-256) converts only with its normalisation
    given: one line naming --normalization, exit 2, nothing written. Fails if the converter
    guessed one (e.g. from the number of classes) or wrote the checkpoint first."""
    src = SHARED / "chenyaofo-cifar100" / "cifar100_resnet56-f2eff4c8.pt"
    unknown = tmp_path / "mine.pt"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(unknown, "w") as b:
        for info in a.infolist():
            b.writestr("mine/" + info.filename.split("/", 1)[1], a.read(info))
    assert convert.sha256_file(unknown) not in convert.KNOWN_SOURCES

    code, _, err = _convert_command(capsys, unknown, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert "mine.pt is not a known published file" in err and "--normalization" in err
    assert not (tmp_path / "out").exists()
    code, _, err = _convert_command(capsys, unknown, tmp_path / "out",
                                    "--normalization", "cifar100")
    assert code == 0, err
    meta = checkpoint.load_meta(str(tmp_path / "out"))
    assert meta["normalization"]["name"] == "cifar100" and meta["source"]["origin"] is None
    # The module's entry point, once: a missing file.
    r = subprocess.run([sys.executable, "-m", "kd_jax.convert", str(tmp_path / "missing.pt"),
                        str(tmp_path / "out2")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no file" in r.stderr


# ------------------------------------------------- per-teacher normalisation in the step

def test_teacher_sees_the_students_view_normalised_its_own_way():
    """A teacher with its own preprocessing gets exactly preprocess(view): equal to a teacher
    that re-normalises the student's input itself."""
    num_classes, dataset = 10, "cifar10"
    student = models.create("resnet8", num_classes)
    teacher = models.create("resnet8", num_classes)
    tvars = teacher.init(jax.random.PRNGKey(9), jnp.zeros((1, 32, 32, 3)), train=False)
    own = pretrained.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    spec = data.DATASETS[dataset]

    def renormalising_apply(v, x, train=False, **kw):  # student-normalised -> own
        pixels01 = x * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
        return teacher.apply(v, (pixels01 - np.asarray(own.mean, np.float32))
                             / np.asarray(own.std, np.float32), train=train, **kw)

    tx = optax.sgd(0.1)
    batch = {"image": jax.random.randint(jax.random.PRNGKey(5), (8, 32, 32, 3), 0, 256
                                         ).astype(jnp.uint8),
             "label": jnp.arange(8) % num_classes}
    obj = objectives.METHODS["kd"]
    state = train.create_train_state(student, tx, init_seed=0, data_seed=1)
    step = partial(train.distill_step, objective=obj, dataset=dataset, steps_per_epoch=10)
    a, ma = jax.jit(partial(step, teacher_apply=teacher.apply, teacher_preprocess=own))(
        state, tvars, batch)
    b, mb = jax.jit(partial(step, teacher_apply=renormalising_apply))(state, tvars, batch)
    c, mc = jax.jit(partial(step, teacher_apply=teacher.apply))(state, tvars, batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-5)
    # Feeding the teacher the student's normalisation instead is a different loss.
    assert abs(float(ma["loss"]) - float(mc["loss"])) > 1e-3


def test_teacher_preprocess_count_must_match_teachers():
    with pytest.raises(ValueError, match="one per teacher"):
        train._as_teachers((lambda *a: 0, lambda *a: 0), ({}, {}), (None,))
