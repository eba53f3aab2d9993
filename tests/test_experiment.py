"""kd_jax.experiment and its command line experiments/cifar_kd.py: the smoke preset end to end,
the Python API, resume, errors, the outputs."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from fake_tfds import fake_as_data_source

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cifar_kd.py"
SHARED_TFDS = ROOT.parent / "shared" / "tfds"

spec = importlib.util.spec_from_file_location("cifar_kd", SCRIPT)
cifar_kd = importlib.util.module_from_spec(spec)
sys.modules["cifar_kd"] = cifar_kd  # dataclasses look their module up
spec.loader.exec_module(cifar_kd)


def _session_dir(tmp_path_factory) -> Path:
    """A directory shared by every xdist worker of this test session (and only this one)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` run once per test session, whichever worker asks first; the others wait
    and reuse the result (the smoke run costs about a minute of CPU)."""
    import fcntl
    root = _session_dir(tmp_path_factory)
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            make(target)
            (root / f"{name}.done").touch()
    return target


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """Mocked CIFAR-10 (1,000 train, 500 test images) under a data dir path that is the same
    for every module and worker, so that runs keyed by it are shared."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    data_dir = _session_dir(tmp_path_factory) / "fake_tfds"
    data_dir.mkdir(exist_ok=True)
    with tfds.testing.mock_data(
            as_data_source_fn=fake_as_data_source({"train": 1000, "test": 500}, balanced=True)):
        yield data_dir
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def smoke_run(fake_cifar, tmp_path_factory):
    """The smoke preset through the CLI, once per session (shared with test_reliability.py);
    tests that change a workdir work on a copy."""
    def argv_for(workdir):
        return ["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir", str(workdir),
                "--no-progress"]

    def make(workdir):
        assert cifar_kd.main(argv_for(workdir)) == 0

    workdir = _once(tmp_path_factory, "smoke", make)
    return workdir, argv_for(workdir)


def test_smoke_preset_writes_all_four_outputs(smoke_run):
    workdir, _ = smoke_run
    for name in ("results.json", "results.md", "metrics.jsonl", "curves.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_schema(smoke_run):
    workdir, _ = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == "cifar10"
    assert set(results["teacher"]) >= {"arch", "test_accuracy", "params", "train_time_s"}
    assert results["teacher"]["arch"] == "resnet14"
    assert results["config"]["run"]["teacher"] == "resnet14"
    assert results["config"]["schedule"]["epochs"] == 2
    # The effective objective of every method, not null placeholders.
    terms = {t["name"]: t for t in results["objectives"]["kd"]["terms"]}
    assert terms["kd"]["temperature"] == 4.0 and terms["kd"]["weight"] == 0.9
    assert terms["ce"]["weight"] == pytest.approx(0.1)
    assert results["objectives"]["kd"]["features"] == "post_relu"
    # config.json is the configuration as run; --config reruns it.
    assert json.loads((workdir / "config.json").read_text()) == results["config"]
    students = results["students"]
    assert {s["method"] for s in students} == {"none", "kd"}
    for s in students:
        assert set(s) >= {"arch", "method", "seed", "test_accuracy", "best_test_accuracy",
                          "params", "train_time_s", "images_per_s"}
        assert 0.0 <= s["test_accuracy"] <= s["best_test_accuracy"] <= 1.0
        assert s["arch"] == "resnet8" and s["params"] > 70_000
        assert s["train_time_s"] > 0 and s["images_per_s"] > 0
    table = (workdir / "results.md").read_text()
    assert "| baseline (none) | resnet8 |" in table and "| kd | resnet8 |" in table


def test_metrics_jsonl_has_steps_and_epochs_of_every_phase(smoke_run):
    workdir, _ = smoke_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in records}
    assert phases == {"teacher", "students1"}
    for r in records:
        assert {"phase", "epoch", "step", "loss", "accuracy"} <= set(r)
    teacher_epochs = [r for r in records if r["phase"] == "teacher" and "test_accuracy" in r]
    assert [r["epoch"] for r in teacher_epochs] == [1, 2, 3]
    steps = [r for r in records if r["phase"] == "teacher" and "lr" in r]
    assert steps and all(r["lr"] > 0 for r in steps)


def test_time_estimate_after_the_first_timed_steps(smoke_run):
    workdir, _ = smoke_run
    log = (workdir / "log.txt").read_text()
    assert log.index("plan: teacher: train resnet14 for 3 epochs; students: 2 x resnet8") \
        < log.index("time estimate: teacher about")
    assert "time estimate: students1 about" in log


def test_tensorboard_event_files_per_phase_and_student(smoke_run):
    pytest.importorskip("tensorboardX")
    workdir, _ = smoke_run
    runs = {p.parent.parent.name.split("_")[0] + "/" + p.parent.name
            for p in (workdir / "tensorboard").glob("*/*/events.out.tfevents.*")
            if p.stat().st_size > 0}
    assert runs == {"teacher/resnet14", "students1/none_seed0", "students1/kd_seed0"}


def test_rerunning_a_finished_run_prints_the_table_at_once(smoke_run, capsys):
    workdir, argv = smoke_run
    before = (workdir / "metrics.jsonl").read_text()
    start = time.perf_counter()
    assert cifar_kd.main(argv) == 0
    assert time.perf_counter() - start < 2.0
    out = capsys.readouterr().out
    assert "stored results" in out and "| kd | resnet8 |" in out
    assert (workdir / "metrics.jsonl").read_text() == before


def test_resume_skips_finished_phases(smoke_run, tmp_path, capsys):
    workdir, argv = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    before = json.loads((copy / "results.json").read_text())
    # Interrupted after the last student checkpoint, before the phase was marked done.
    os.remove(copy / "results.json")
    for done in glob.glob(str(copy / "students_*" / "result.json")):
        os.remove(done)
    argv = [a if a != str(workdir) else str(copy) for a in argv]
    log_before = (copy / "log.txt").read_text()
    metrics_before = (copy / "metrics.jsonl").read_text()
    assert cifar_kd.main(argv) == 0
    log = (copy / "log.txt").read_text()
    new = log[len(log_before):]
    assert log.startswith(log_before) and "teacher: resnet14 already trained" in new
    assert "plan: teacher: reuse resnet14 trained for 3 epochs" in new
    # Mutation caught: a student phase that ignores its checkpoint and retrains (even
    # deterministically) logs epochs again and appends records.
    assert "[students1" not in new and "[teacher" not in new, new
    assert (copy / "metrics.jsonl").read_text() == metrics_before
    after = json.loads((copy / "results.json").read_text())
    assert [s["test_accuracy"] for s in after["students"]] == \
        [s["test_accuracy"] for s in before["students"]]


def test_teacher_checkpoint_is_reused_and_checked(smoke_run, tmp_path, capsys):
    workdir, argv = smoke_run
    (final,) = glob.glob(str(workdir / "teacher_*" / "final"))
    base = ["--preset", "smoke", "--data-dir", argv[3], "--no-progress",
            "--teacher-checkpoint", final]
    code = cifar_kd.main([*base, "--workdir", str(tmp_path / "w"), "--teacher", "resnet8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet14" in err and "resnet8" in err and len(err.strip().splitlines()) == 1


def test_shipped_teacher_runs_with_no_teacher_phase(fake_cifar, tmp_path):
    workdir = tmp_path / "w"
    argv = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir", str(workdir),
            "--no-progress", "--teacher-checkpoint", "pretrained:cifar10/resnet20",
            "--epochs", "1", "--method", "kd", "--train-subset", "240", "--test-subset", "100"]
    assert cifar_kd.main(argv) == 0
    assert not glob.glob(str(workdir / "teacher_resnet*")), "no teacher was trained"
    assert "[teacher" not in (workdir / "log.txt").read_text()
    results = json.loads((workdir / "results.json").read_text())
    t = results["teacher"]
    assert t["arch"] == "resnet20" and t["source"] == "pretrained:cifar10/resnet20"
    assert t["published_accuracy"] == 0.9173 and t["normalization"] == "imagenet"
    assert results["config"]["run"]["teacher_checkpoint"] == "pretrained:cifar10/resnet20"
    table = (workdir / "results.md").read_text()
    assert "`pretrained:cifar10/resnet20` (published 91.73%)" in table


def test_results_are_keyed_on_teacher_content_not_path(fake_cifar, tmp_path, capsys):
    """Replacing the checkpoint at a --teacher-checkpoint path retrains the students."""
    import jax
    from kd_jax import checkpoint, pretrained
    teacher = tmp_path / "teacher"
    loaded = pretrained.load("resnet20", dataset="cifar10")
    meta = pretrained.info("resnet20", dataset="cifar10")
    checkpoint.save_variables(teacher, loaded.variables, meta)
    argv = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir",
            str(tmp_path / "w"), "--no-progress", "--teacher-checkpoint", str(teacher),
            "--epochs", "1", "--method", "kd", "--train-subset", "240", "--test-subset", "100"]
    assert cifar_kd.main(argv) == 0
    capsys.readouterr()
    assert cifar_kd.main(argv) == 0
    assert "Finished run" in capsys.readouterr().out  # unchanged teacher: stored table
    changed = jax.tree.map(lambda x: x * 0.5, loaded.variables)
    checkpoint.save_variables(teacher, changed, meta)
    assert cifar_kd.main(argv) == 0
    assert "Finished run" not in capsys.readouterr().out
    assert len(glob.glob(str(tmp_path / "w" / "students_*"))) == 2


@pytest.mark.parametrize("args, message", [
    (["--teacher", "resnet999"], "unknown teacher architecture 'resnet999'"),
    (["--method", "kd,foo"], "unknown method foo"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--teacher-checkpoint", "pretrained:cifar100/resnet20"], "no shipped teacher"),
    (["--teacher-checkpoint", "/nonexistent/teacher"], "is not a teacher checkpoint"),
    (["--workdir", "/proc/kd_jax_cannot_write_here"], "is not writable"),
])
def test_mistakes_end_with_one_clear_line(args, message, capsys, tmp_path):
    argv = ["--preset", "smoke", "--workdir", str(tmp_path / "w"), *args]
    assert cifar_kd.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_dataset_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        cifar_kd.main(["--dataset", "mnist"])
    assert info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_batch_larger_than_subset(fake_cifar, tmp_path, capsys):
    argv = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--workdir", str(tmp_path),
            "--batch-size", "2000"]
    assert cifar_kd.main(argv) == 2
    assert "--batch-size 2000 is larger than the 1000 training images" in capsys.readouterr().err


def test_missing_data_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    def offline(self, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    argv = ["--preset", "smoke", "--data-dir", str(tmp_path / "empty"), "--workdir",
            str(tmp_path / "w")]
    assert cifar_kd.main(argv) == 1
    err = capsys.readouterr().err
    assert "--data-dir" in err and "TFDS_DATA_DIR" in err and "cifar10" in err


def test_batch_not_divisible_by_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--batch-size", "30",
                           "--workdir", "/tmp/kd_jax_divisibility_test"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "batch size 30 is not divisible by the 4 devices" in proc.stderr


def test_config_file_and_flags(tmp_path):
    """One configuration object: --config (json nested or flat, or .py) under flags."""
    (tmp_path / "c.json").write_text(json.dumps({"run": {"student": "resnet14"},
                                                 "lr": 0.2, "methods": ["kd", "dkd"]}))
    config, _ = cifar_kd.parse_args(["--preset", "smoke", "--config", str(tmp_path / "c.json"),
                                     "--lr", "0.3"])
    assert config.run.student == "resnet14" and config.objective.methods == ("kd", "dkd")
    assert config.optim.lr == 0.3  # the flag wins over the file
    assert config.run.teacher == "resnet14" and config.data.batch_size == 48  # the preset
    (tmp_path / "c.py").write_text("config = configure(PRESETS['smoke'], seeds=3)\n")
    config, _ = cifar_kd.parse_args(["--config", str(tmp_path / "c.py")])
    assert config == cifar_kd.configure(cifar_kd.PRESETS["smoke"], seeds=3)
    # A config.json written by a run reproduces the configuration exactly.
    (tmp_path / "full.json").write_text(json.dumps(
        __import__("dataclasses").asdict(cifar_kd.PRESETS["cifar100-cpu"])))
    config, _ = cifar_kd.parse_args(["--config", str(tmp_path / "full.json")])
    assert config == cifar_kd.PRESETS["cifar100-cpu"]


def test_every_setting_is_a_flag_and_in_the_run_key():
    """Flags derive from the configuration; the run directories hash all of it except an
    explicit list, so a new setting changes the keys unless someone says it cannot."""
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for name in cifar_kd.LEAVES:
        assert cifar_kd._flag(name) in help_text, name
    base = cifar_kd.PRESETS["smoke"]
    summary = {"checkpoint_sha256": "x"}
    for name, value in [("momentum", 0.8), ("nesterov", True), ("decay_factor", 0.5),
                        ("student_shortcut", "B"), ("dtype", "bfloat16")]:
        changed = cifar_kd.configure(base, **{name: value})
        assert cifar_kd.students_key(changed, summary, [("kd", 0)]) != \
            cifar_kd.students_key(base, summary, [("kd", 0)]), name
    assert cifar_kd.students_key(cifar_kd.configure(base, log_every=1), summary, [("kd", 0)]) \
        == cifar_kd.students_key(base, summary, [("kd", 0)])


def test_help_lists_every_option_with_its_default():
    """Each setting's flag shows its real default (mutation caught: a flag whose help drops
    or misstates its default, ``(default )`` for an empty one, words broken at hyphens);
    --help names every architecture, method and preset."""
    from kd_jax import models, objectives
    from kd_jax.experiment import PRESETS, ExperimentConfig, flat
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # unwrapped
    import re
    blocks = {b.split()[0].rstrip(","): " ".join(b.split())
              for b in re.split(r"\n  (?=-)", proc.stdout) if b.startswith("-")}
    for flag in ["--dataset", "--data-dir", "--workdir", "--teacher", "--student", "--method",
                 "--epochs", "--teacher-epochs", "--batch-size", "--lr", "--seed", "--seeds",
                 "--train-subset", "--teacher-checkpoint", "--preset",
                 "--max-parallel-students"]:
        assert flag in proc.stdout, flag
    defaults = flat(ExperimentConfig())
    for name, value in [("epochs", 240), ("batch_size", 64), ("lr", 0.05), ("seed", 0),
                        ("dataset", "cifar10"), ("student", "resnet20"), ("log_every", 50),
                        ("momentum", 0.9), ("max_parallel_students", 8)]:
        assert defaults[name] == value  # the defaults the README documents
        help_of = blocks[cifar_kd._flag(name)]
        assert help_of.endswith(f"(default: {value})"), (name, help_of)
    assert "(default )" not in proc.stdout and "(default: )" not in proc.stdout
    assert "(default: none)" in text  # --term, --seeds-per-method
    for line in proc.stdout.splitlines():
        assert not line.rstrip().endswith("-") or line.strip() == "-", line  # no broken words
    for arch in models.available():
        assert arch in text, arch
    for method in objectives.METHODS:
        assert method in text, method
    for preset in PRESETS:
        assert f"  {preset} " in proc.stdout, preset


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TFDS.exists(), reason="../shared/tfds is not present")
def test_smoke_preset_on_real_cifar10(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--data-dir",
                           str(SHARED_TFDS), "--workdir", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    # 1,000 real images, 3 epochs: the teacher is far better than chance (10%).
    assert results["teacher"]["test_accuracy"] > 0.15
    assert "| kd | resnet8 |" in proc.stdout


def test_protocol_report_reads_a_finished_run(smoke_run):
    workdir, _ = smoke_run
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "protocol_report.py"),
                           str(workdir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    kd = [s for s in results["students"] if s["method"] == "kd"][0]
    assert f"| kd | 0 | {100 * kd['test_accuracy']:.2f} |" in proc.stdout
    assert "kd beats the baseline of the same seed on" in proc.stdout
    assert "Training time per epoch of the pass" in proc.stdout


# ----------------------------------------------------------------------- methods and terms

@pytest.mark.parametrize("terms, message", [
    ("kd.temperature", "TERM.KEY=VALUE"),
    ("crd.num_negatives=8", "no chosen method has a 'crd' term"),
    ("kd.nonsense=1", "has no argument nonsense"),
    ("kd.weight=-1", "weight must be finite and >= 0"),
    ("kd.temperature=0", "term 'kd': temperature must be > 0"),
    ("dkd.alpha='x'", "must be a finite number"),
])
def test_term_mistakes_end_with_one_clear_line(terms, message, capsys, tmp_path):
    argv = ["--preset", "smoke", "--workdir", str(tmp_path / "w"), "--method", "kd,dkd",
            "--term", terms]
    code = cifar_kd.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1, err


def test_term_overrides_reach_every_method_with_the_term():
    config = cifar_kd.configure(cifar_kd.PRESETS["smoke"], methods=("kd", "dkd", "crd"),
                                terms=("ce.weight=0.5", "dkd.beta=2", "crd.num_negatives=64"),
                                epochs=24)
    kd = cifar_kd.student_objective("kd", config)
    dkd = cifar_kd.student_objective("dkd", config)
    crd = cifar_kd.student_objective("crd", config)
    assert kd.term("ce").weight == dkd.term("ce").weight == crd.term("ce").weight == 0.5
    assert kd.term("kd").weight == 0.9 and dict(kd.term("kd").kwargs)["temperature"] == 4.0
    assert dkd.term("dkd").arguments["beta"] == 2.0
    assert dkd.term("dkd").warmup_epochs == pytest.approx(2.0)  # 20 of 240 epochs -> 2 of 24
    assert crd.term("crd").arguments["num_negatives"] == 64
    # --temperature and --alpha are shorthands over the same terms.
    config = cifar_kd.configure(config, temperature=2.0, alpha=0.5, terms=())
    kd = cifar_kd.student_objective("kd", config)
    assert kd.term("kd").arguments["temperature"] == 2.0
    assert kd.term("kd").weight == 0.5 and kd.term("ce").weight == 0.5
    assert cifar_kd.student_objective("dkd", config).term("dkd").arguments["temperature"] == 2.0
    # The flag's comma list parses to the same configuration.
    parsed, _ = cifar_kd.parse_args(["--preset", "smoke", "--term", "ce.weight=0.5,dkd.beta=2"])
    assert parsed.objective.terms == ("ce.weight=0.5", "dkd.beta=2")


@pytest.fixture(scope="module")
def head_students(fake_cifar, tmp_path_factory):
    """One short pass of students whose methods train heads (FitNets' regressor, VID's,
    CRD's embeddings and memory bank, ReviewKD's fusion) from a shipped teacher."""
    from kd_jax.experiment import PRESETS, configure, run
    workdir = tmp_path_factory.mktemp("heads")
    config = configure(PRESETS["smoke"], data_dir=str(fake_cifar), epochs=1, train_subset=100,
                       test_subset=100, methods=("fitnet", "vid", "crd", "reviewkd"),
                       teacher_checkpoint="pretrained:cifar10/resnet20",
                       terms=("crd.num_negatives=200",), log_every=1)
    return run(config, str(workdir), progress=False), workdir


def test_crd_subset_warning_is_one_line(head_students):
    """100 images, 10 per class: 200 negatives cannot be drawn from the other classes."""
    _, workdir = head_students
    log = (workdir / "log.txt").read_text().splitlines()
    (line,) = [x for x in log if "negatives requested" in x]
    assert line.startswith("warning: crd/seed0: CRD: 200 negatives requested but only 90")
    assert "warnings.warn" not in (workdir / "log.txt").read_text()


def test_each_student_is_exported_without_heads(head_students):
    """Every student, heads or not, is exported as the bare architecture: the exported tree is
    a fresh resnet8's, and evaluating the exported file reproduces the recorded accuracy.
    Mutations caught: heads left in the export, the wrong student's or the untrained weights
    exported, a backbone subtree dropped."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from kd_jax import checkpoint, data, loop, models, parallel, train
    res, workdir = head_students
    mesh = parallel.make_mesh()
    images, labels = data.load_arrays("cifar10", "test", per_class=10)
    fresh = models.create("resnet8", 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False)
    evaluate = loop.make_evaluator(mesh, images=images, labels=labels, batch_size=50,
                                   dataset="cifar10")
    accuracies = {}
    for s in res.students:
        (path,) = glob.glob(str(workdir / "students_*" / "students" /
                                f"{s['method']}_seed{s['seed']}"))
        variables, meta = checkpoint.load_variables(path)
        assert jax.tree.structure(variables["params"]) == jax.tree.structure(fresh["params"])
        assert not any(k.startswith("head_") for k in variables["params"])
        assert meta["method"] == s["method"] and meta["arch"] == "resnet8"
        assert meta["test_accuracy"] == s["test_accuracy"]
        assert sum(np.asarray(x).size for x in jax.tree.leaves(variables["params"])) == \
            s["params"] == train.num_params(fresh["params"])
        state = train.TrainState.create(apply_fn=models.create("resnet8", 10).apply,
                                        params=variables["params"],
                                        batch_stats=variables["batch_stats"],
                                        tx=optax.identity())
        (ev,) = evaluate([state])
        accuracies[s["method"]] = (ev["test_accuracy"], s["test_accuracy"])
    assert set(accuracies) == {"none", "fitnet", "vid", "crd", "reviewkd"}
    for method, (measured, recorded) in accuracies.items():
        assert measured == pytest.approx(recorded, abs=1e-6), method


# ------------------------------------------------------------------- the Python API

def _readme_example() -> str:
    """The Python example of the README's "Design" section (the same as in "The experiment")."""
    readme = (ROOT / "README.md").read_text()
    examples = []
    for section in ("## The experiment", "## Design"):
        start = readme.index("```python\nfrom kd_jax.experiment import run",
                             readme.index(section))
        examples.append(readme[start + len("```python\n"):readme.index("```", start + 10)])
    assert examples[0] == examples[1]
    return examples[1]


class RecordingWriter:
    """A user's writer with CLU's contract and nothing else."""

    def __init__(self):
        self.scalars, self.texts, self.flushed = [], [], 0

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def write_texts(self, step, texts):
        self.texts.append(dict(texts))

    def flush(self):
        self.flushed += 1

    def close(self):
        raise AssertionError("run() must not close a writer it did not create")


@pytest.fixture(scope="module")
def api_run(fake_cifar, tmp_path_factory):
    """The README's Python example, run as written (data and workdir redirected to the test's),
    with a recording writer added."""
    import kd_jax.experiment as experiment
    workdir = tmp_path_factory.mktemp("py")
    recorder = RecordingWriter()
    real_run = experiment.run
    experiment.run = lambda config, wd, **kw: real_run(config, wd, writers=[recorder],
                                                       progress=False, **kw)
    try:
        namespace = {}
        exec(_readme_example().replace('"../shared/tfds"', repr(str(fake_cifar)))
             .replace('"runs/py"', repr(str(workdir))), namespace)
    finally:
        experiment.run = real_run
    return namespace["res"], workdir, recorder


def test_python_api_equals_the_cli(api_run, smoke_run):
    """run() and the CLI give bit-identical accuracies and the same results.json (but paths)."""
    res, workdir, _ = api_run
    cli_dir, _ = smoke_run
    api = json.loads((workdir / "results.json").read_text())
    cli = json.loads((cli_dir / "results.json").read_text())
    for d in (api, cli):
        d["config"]["data"]["data_dir"] = None
        for s in d["students"]:
            s.pop("train_time_s"), s.pop("images_per_s")
        d["teacher"].pop("train_time_s")
    assert api == cli
    assert [s["test_accuracy"] for s in res.students] == \
        [s["test_accuracy"] for s in cli["students"]]
    assert res.config.run.teacher == "resnet14" and res.workdir == str(workdir)
    assert res.to_json() == json.loads((workdir / "results.json").read_text())
    assert res.table() == (workdir / "results.md").read_text()
    for name in ("results.json", "results.md", "metrics.jsonl", "curves.png", "config.json",
                 "log.txt"):
        assert (workdir / name).stat().st_size > 0, name


def test_custom_writer_receives_every_scalar_of_metrics_jsonl(api_run):
    from kd_jax.writers import scalars_of
    _, workdir, recorder = api_run
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records and len(recorder.scalars) == len(records)
    for record, (step, scalars) in zip(records, recorder.scalars):
        assert step == record["step"]
        assert scalars == scalars_of(record)
        numbers = {k for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        assert len(scalars) == len(numbers) + len(record.get("terms", {}))
    terms = [k for _, s in recorder.scalars for k in s if "/terms/" in k]
    assert any(k.endswith("/terms/kd") for k in terms)
    log = (workdir / "log.txt").read_text()
    assert [t["log"] for t in recorder.texts if "log" in t][0] in log
    assert recorder.flushed >= 1


def test_rerunning_the_api_returns_the_stored_results(api_run):
    from kd_jax.experiment import configure, run
    res, workdir, _ = api_run
    again = run(configure(res.config), str(workdir), progress=False)
    assert again.reused and again.students == res.students
