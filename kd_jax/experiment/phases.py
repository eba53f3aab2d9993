"""The phases of an experiment: the teacher (trained, reused or loaded) and the student passes.

A :class:`Session` holds what one invocation shares between phases: the configuration, the
mesh, the data (loaded when a phase first trains), the writers and the teacher.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from kd_jax import checkpoint, data, loop, models, objectives, parallel, pretrained, train
from kd_jax.experiment.config import ConfigError, ExperimentConfig
from kd_jax.experiment.plan import (key_hash, split_passes, student_jobs, student_objective,
                                    students_key, teacher_key)
from kd_jax.experiment.workdir import read_json, read_json_or_none, write_json
from kd_jax.writers import JsonlWriter, write_texts

__all__ = ["Session", "TimeEstimate"]

# SHA-256 of the published test split as TFDS 3.0.2 reads it (pixels, then labels as uint8),
# recorded by ../shared/cifar10/build.py. The JPEG copy in ../shared/tfds differs from it, and
# published teachers lose about 10 points there.
_PUBLISHED_TEST_SHA256 = {
    "cifar10": "ebbcc0390e6bba8e08807359d9ece1a6c1cfd874f8c50bef779aa91a28f558b0"}
_NOT_PUBLISHED_NOTE = (
    "note: this {dataset} test split is not the published one (its SHA-256 differs; the JPEG "
    "copy in ../shared/tfds is such a copy): published teachers lose about 10 points on the "
    "JPEG copy, so judge a teacher on the published data.")


def differs_from_published(dataset: str, images, labels) -> bool:
    """Whether a whole test split differs from the published one (False where unknown)."""
    import hashlib

    import numpy as np
    expected = _PUBLISHED_TEST_SHA256.get(dataset)
    if expected is None:
        return False
    got = hashlib.sha256(np.ascontiguousarray(images).tobytes()
                         + np.asarray(labels).astype(np.uint8).tobytes()).hexdigest()
    return got != expected


class TimeEstimate:
    """A periodic hook: after the first timed interval of the phase's first student (the one
    before includes compilation), tells the time left in the phase and in the whole run."""

    def __init__(self, say, *, phase: str, student: str, total_steps: int, batch_size: int,
                 passes_left: int = 0):
        self.say, self.phase, self.student = say, phase, student
        self.total_steps, self.batch_size, self.passes_left = total_steps, batch_size, passes_left
        self.intervals = 0

    def __call__(self, record: dict) -> None:
        if self.intervals < 0 or record.get("kind") != "step" or record["student"] != self.student:
            return
        self.intervals += 1
        if self.intervals < 2:
            return
        self.intervals = -1
        rate = record["images_per_s"]
        left = (self.total_steps - record["step"]) * self.batch_size / rate
        whole = left + self.passes_left * self.total_steps * self.batch_size / rate
        self.say(f"time estimate: {self.phase} about {_duration(left)} more at {rate:.0f} img/s"
                 + (f"; the whole run about {_duration(whole)} more" if self.passes_left else ""))


class Session:
    """One invocation of an experiment over its workdir."""

    def __init__(self, config: ExperimentConfig, workdir: str, *, writers, hooks=(),
                 progress: bool = True, jsonl: JsonlWriter | None = None):
        self.c = config
        self.workdir = workdir
        self.writers = list(writers)
        self.hooks = list(hooks)
        self.progress = progress
        self.jsonl = jsonl
        self.mesh = parallel.make_mesh()
        self.devices = jax.device_count()
        self.platform = jax.devices()[0].platform
        self.device_kind = jax.devices()[0].device_kind
        dtype = config.run.dtype if config.run.dtype != "auto" else (
            "float32" if self.platform == "cpu" else "bfloat16")
        self.dtype = jnp.dtype(dtype)
        self.spec = data.spec(config.data.dataset)
        self.num_classes = self.spec.num_classes
        self.host = self.spec.host_augmented  # decoded and augmented in host workers
        size = config.data.image_size or self.spec.image_size
        self.image_shape = (size, size, 3)
        workers = config.data.workers
        self.workers = max(0, (os.cpu_count() or 1) - 1) if workers is None else workers
        self.checkpoint_bytes = 0  # of the phase running, for a full disk's message
        self._data = None
        self.teacher_model = self.teacher_variables = None
        self.teacher_preprocess = None  # the teacher's own normalisation, if not the dataset's

    def say(self, text: str) -> None:
        write_texts(self.writers, 0, {"log": text})

    # ------------------------------------------------------------------ shared parts
    @property
    def data(self):
        """(train images, train labels, test images, test labels), loaded on first use; for
        host-decoded datasets (train source, train labels, val source, None)."""
        if self._data is None and self.host:
            from kd_jax import hostdata
            c = self.c
            t0 = time.perf_counter()
            try:
                train_src = hostdata.open_source(c.data.dataset, "train", data_dir=c.data.data_dir)
                val_src = hostdata.open_source(c.data.dataset, "val", data_dir=c.data.data_dir)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--dataset {c.data.dataset}: {_squash(err, 300)}") from err
            if c.data.batch_size > len(train_src):
                raise ConfigError(f"--batch-size {c.data.batch_size} is larger than the "
                                  f"{len(train_src)} training images; lower it.")
            self._data = (train_src, getattr(train_src, "labels", None), val_src, None)
            self.say(f"data: {c.data.dataset} train {len(train_src)} val {len(val_src)} "
                     f"({time.perf_counter() - t0:.1f}s), decoded by {self.workers} worker(s)")
        if self._data is None:
            c = self.c
            t0 = time.perf_counter()
            train_x, train_y = _load_split(c, "train", c.data.train_subset, self.num_classes)
            test_x, test_y = _load_split(c, "test", c.data.test_subset, self.num_classes)
            if c.data.batch_size > len(train_x):
                raise ConfigError(f"--batch-size {c.data.batch_size} is larger than the "
                                  f"{len(train_x)} training images; lower it.")
            self._data = (train_x, train_y, test_x, test_y)
            self.say(f"data: {c.data.dataset} train {len(train_x)} test {len(test_x)} "
                     f"({time.perf_counter() - t0:.1f}s)")
        return self._data

    def model(self, arch: str, shortcut=None):
        return models.create(arch, self.num_classes, dtype=self.dtype, shortcut=shortcut)

    def optimizer(self, epochs: int, steps_per_epoch: int, objective=None):
        """The optimiser (the objective's own where it declares one, e.g. DOT) and the
        learning-rate schedule it applies over a phase of ``epochs`` epochs."""
        kw = dict(batch_size=self.c.data.batch_size, steps_per_epoch=steps_per_epoch,
                  epochs=epochs, objective=objective)
        return (train.make_optimizer(self.c.optim, **kw),
                train.objective_schedule(self.c.optim, **kw))

    def loader(self):
        train_x, train_y, _, _ = self.data
        if self.host:
            from kd_jax import hostdata
            return hostdata.HostLoader(train_x, batch_size=self.c.data.batch_size,
                                       seed=self.c.run.seed, mesh=self.mesh,
                                       image_size=self.image_shape[0], workers=self.workers)
        return data.TrainLoader(train_x, train_y, batch_size=self.c.data.batch_size,
                                seed=self.c.run.seed, mesh=self.mesh)

    def evaluator(self, preprocess=None):
        _, _, test_x, test_y = self.data
        batch = max(self.devices, self.c.data.eval_batch_size // self.devices * self.devices)
        batches = None
        if self.host:
            from kd_jax import hostdata

            source, test_x = test_x, None

            def batches():
                return hostdata.eval_batches(source, batch_size=batch, mesh=self.mesh,
                                             image_size=self.image_shape[0],
                                             workers=self.workers)
        return loop.make_evaluator(self.mesh, images=test_x, labels=test_y, batch_size=batch,
                                   dataset=self.c.data.dataset, preprocess=preprocess,
                                   batches=batches)

    def _fit(self, states, step_fn, *, loader, epochs, names, phase, run_dir, schedule, meta,
             passes_left=0):
        self.checkpoint_bytes = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(states)))
        ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
        run_id = os.path.basename(run_dir)
        if self.jsonl is not None:  # records past the checkpoint are written again
            self.jsonl.drop_after(phase, ckpt.latest_step() or 0, run_id)
        estimate = TimeEstimate(self.say, phase=phase, student=names[0],
                                total_steps=epochs * loader.steps_per_epoch,
                                batch_size=self.c.data.batch_size, passes_left=passes_left)
        try:
            return loop.fit(states, step_fn, loader=loader, epochs=epochs,
                            evaluate=self.evaluator(), names=names, phase=phase,
                            checkpointer=ckpt, lr_fn=schedule, log_every=self.c.run.log_every,
                            writers=self.writers, hooks=[estimate, *self.hooks],
                            context={"run": run_id}, progress=self.progress, meta=meta)
        finally:
            ckpt.close()

    # ------------------------------------------------------------------- the teacher
    def teacher_dir(self) -> str:
        return os.path.join(self.workdir,
                            f"teacher_{self.c.run.teacher}_{key_hash(teacher_key(self.c))}")

    def stored_teacher(self) -> dict | None:
        """The summary of this configuration's trained teacher, if it finished."""
        if self.c.run.teacher_checkpoint:
            return None
        return read_json_or_none(os.path.join(self.teacher_dir(), "result.json"), self.say)

    def teacher_phase(self) -> dict:
        """Trains the teacher (or reuses or loads it); returns its summary."""
        c = self.c
        if c.run.teacher_checkpoint:
            return self._load_teacher(c.run.teacher_checkpoint)
        tdir = self.teacher_dir()
        final = os.path.join(tdir, "final")
        summary = self.stored_teacher()
        if summary is not None:
            try:
                loaded = self._load_teacher(final, summary=summary)
            except ConfigError as err:
                # final/ and result.json are derived from checkpoints/: rebuild them.
                self.say(f"warning: the trained teacher in {final} is unreadable ({err}); "
                         "recomputing it from its checkpoints")
                shutil.rmtree(final, ignore_errors=True)
            else:
                self.say(f"teacher: {c.run.teacher} already trained "
                         f"({summary['test_accuracy']:.4f}), reusing {final}")
                return loaded
        model = self.model(c.run.teacher)
        loader = self.loader()
        tx, schedule = self.optimizer(c.teacher_epochs_, loader.steps_per_epoch)
        state = train.create_train_state(model, tx, init_seed=c.run.seed, data_seed=c.run.seed,
                                         image_shape=self.image_shape)
        states = loop.replicate((state,), self.mesh)
        step = loop.make_supervised_step(self.mesh, dataset=c.data.dataset)
        result = self._fit(states, step, loader=loader, epochs=c.teacher_epochs_,
                           names=[c.run.teacher], phase="teacher", run_dir=tdir,
                           schedule=schedule, meta={"arch": c.run.teacher})
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
        if jax.process_index() == 0:
            write_json(os.path.join(tdir, "history.json"), hist)
            write_json(os.path.join(tdir, "result.json"), summary)
        self.teacher_model, self.teacher_variables = model, variables
        return summary

    def _load_teacher(self, spec: str, summary: dict | None = None) -> dict:
        """Loads a teacher checkpoint (trained here, converted or shipped) with its own input
        preprocessing; without a stored ``summary``, measures its test accuracy in this run
        (cached in the workdir by the checkpoint's content digest)."""
        import optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        c = self.c
        try:
            meta = pretrained.teacher_meta(spec)
            if meta.get("arch") != c.run.teacher or meta.get("num_classes") != self.num_classes:
                raise ValueError(
                    f"holds a {meta.get('arch')} with {meta.get('num_classes')} classes, but "
                    f"this run's teacher is {c.run.teacher} with {self.num_classes} classes "
                    f"({c.data.dataset}); pass --teacher {meta.get('arch')} and the matching "
                    "--dataset, or another checkpoint.")
            loaded = pretrained.load_teacher(spec, dtype=self.dtype,
                                             sharding=NamedSharding(self.mesh, P()))
        except ValueError as err:
            raise ConfigError(f"--teacher-checkpoint {err}" if str(err).startswith("'") else
                              f"--teacher-checkpoint {spec!r} {err}") from err
        self.teacher_model, self.teacher_variables = loaded.model, loaded.variables
        self.teacher_preprocess = loaded.preprocess
        if summary is not None:
            return summary
        digest = loaded.digest
        data_dir = os.path.abspath(c.data.data_dir) if c.data.data_dir else None
        cache = os.path.join(self.workdir, "teacher_eval_" + key_hash(dict(
            digest=digest, dataset=c.data.dataset, test_subset=c.data.test_subset,
            data_dir=data_dir)) + ".json")
        if os.path.exists(cache):
            measured = read_json(cache)
        else:
            t0 = time.perf_counter()
            state = train.TrainState.create(apply_fn=loaded.model.apply,
                                            params=loaded.variables["params"],
                                            batch_stats=loaded.variables["batch_stats"],
                                            tx=optax.identity())
            (ev,) = self.evaluator(preprocess=self.teacher_preprocess)([state])
            measured = {"test_accuracy": ev["test_accuracy"], "test_loss": ev["test_loss"],
                        "eval_time_s": time.perf_counter() - t0}
            if jax.process_index() == 0:
                write_json(cache, measured)
        meta = loaded.meta
        summary = {"arch": meta["arch"], "shortcut": meta.get("shortcut"),
                   "test_accuracy": measured["test_accuracy"],
                   "params": meta.get("params"), "train_time_s": meta.get("train_time_s"),
                   "source": spec, "checkpoint_sha256": digest,
                   "published_accuracy": meta.get("published_accuracy"),
                   "origin": (meta.get("source") or {}).get("origin"),
                   "normalization": (meta.get("normalization") or {}).get("name",
                                                                          c.data.dataset)}
        published = summary["published_accuracy"]
        self.say(f"teacher: {meta['arch']} from {spec}: test accuracy "
                 f"{100 * measured['test_accuracy']:.2f}% measured here"
                 + (f" (published {100 * published:.2f}%)" if published else ""))
        if published and c.data.test_subset is None and differs_from_published(
                c.data.dataset, self.data[2], self.data[3]):
            self.say(_NOT_PUBLISHED_NOTE.format(dataset=c.data.dataset))
        return summary

    # ------------------------------------------------------------------ the students
    def pass_dir(self, teacher_summary: dict, group) -> str:
        key = students_key(self.c, teacher_summary, group)
        return os.path.join(self.workdir, f"students_{self.c.run.student}_{key_hash(key)}")

    def student_phase(self, teacher_summary: dict) -> list[dict]:
        c = self.c
        passes = split_passes(student_jobs(c), c.run.max_parallel_students)
        results = []
        for i, group in enumerate(passes):
            names = [f"{m}/seed{s}" for m, s in group]
            pdir = self.pass_dir(teacher_summary, group)
            done = os.path.join(pdir, "result.json")
            stored = read_json_or_none(done, self.say)
            if stored is not None:
                self.say(f"students pass {i + 1}/{len(passes)} ({', '.join(names)}) "
                         "already trained")
                results += stored
                continue
            self.say(f"students pass {i + 1}/{len(passes)}: {len(group)} x {c.run.student} "
                     f"({', '.join(names)}) from {c.run.teacher}")
            results += self._student_pass(group, names, pdir, f"students{i + 1}",
                                          passes_left=len(passes) - i - 1)
            if jax.process_index() == 0:
                write_json(done, results[-len(group):])
        return results

    def _student_pass(self, group, names, pdir, phase, passes_left) -> list[dict]:
        c = self.c
        loader = self.loader()
        objs = [student_objective(m, c) for m, _ in group]
        schedules = []  # each student's (a first stage has its own rate)
        train_labels = self.data[1]
        states, models_ = [], []
        for (method, seed), obj in zip(group, objs):
            model = objectives.prepare_student(
                self.model(c.run.student, shortcut=c.run.student_shortcut), obj,
                self.teacher_model, image_shape=self.image_shape)
            models_.append(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    aux_state = objectives.init_state(
                        obj, num_examples=len(self.data[0]), train_labels=train_labels,
                        seed=seed, teacher=self.teacher_model,
                        teacher_variables=self.teacher_variables)
                except ValueError as err:  # a term set up from this teacher (OFD) cannot be
                    if not obj.set_up_from_teacher:
                        raise
                    raise ConfigError(f"--method {method}: {err}") from err
            for w in dict.fromkeys(str(w.message) for w in caught):  # one line each
                self.say(f"warning: {method}/seed{seed}: {w}")
            # Each student its own optimiser: an objective may declare one (DOT).
            try:
                tx, lr = self.optimizer(c.schedule.epochs, loader.steps_per_epoch, obj)
            except ValueError as err:
                raise ConfigError(f"--method {method}: {err}") from err
            state = train.create_train_state(model, tx, init_seed=seed, data_seed=c.run.seed,
                                             aux_state=aux_state, image_shape=self.image_shape)
            if any(t.spec.head_from_teacher is not None for t in obj.all_terms):
                try:  # SimKD's head holds a copy of the teacher's classifier
                    state = state.replace(params=objectives.heads_from_teacher(
                        obj, state.params, self.teacher_variables))
                except ValueError as err:
                    raise ConfigError(f"--method {method}: {err}") from err
            states.append(state)
            schedules.append(lr)
        states = loop.replicate(tuple(states), self.mesh)
        # The supervised step takes one gradient; an objective with its own optimiser (DOT's
        # two gradients) goes through the distillation step.
        if any(o.needs_teacher or o.optimizer != "default" for o in objs):
            # The frozen teacher runs with its BatchNorm folded into its convolutions.
            step = loop.make_distill_step(self.mesh, objectives=objs,
                                          teacher_apply=models.folded_apply(self.teacher_model),
                                          dataset=c.data.dataset,
                                          steps_per_epoch=loader.steps_per_epoch,
                                          teacher_preprocess=self.teacher_preprocess)
            tvars = self.teacher_variables
            step_fn = lambda s, b: step(s, tvars, b)  # noqa: E731
        else:
            step_fn = loop.make_supervised_step(self.mesh, dataset=c.data.dataset)
        result = self._fit(states, step_fn, loader=loader, epochs=c.schedule.epochs,
                           names=names, phase=phase, run_dir=pdir,
                           schedule=lambda step: [f(step) for f in schedules],
                           meta={"jobs": group}, passes_left=passes_left)
        out = []
        for (method, seed), obj, state, hist, model in zip(group, objs, result.states,
                                                           result.history, models_):
            # The distilled student alone (no heads), loadable like any kd_jax checkpoint
            # (e.g. as --teacher-checkpoint): <pass dir>/students/<method>_seed<seed>.
            exported = objectives.backbone_variables(
                model, {"params": state.params, "batch_stats": state.batch_stats})
            checkpoint.save_variables(
                os.path.join(pdir, "students", f"{method}_seed{seed}"), exported,
                {"arch": c.run.student, "shortcut": c.run.student_shortcut, "method": method,
                 "seed": seed, "objective": obj.as_dict(),
                 **({"deployed": f"backbone + head_{obj.predicting_term.name} (predicts)"}
                    if obj.predicting_term is not None else {}),
                 "test_accuracy": hist[-1]["test_accuracy"], "num_classes": self.num_classes,
                 "dataset": c.data.dataset})
            out.append({"arch": c.run.student, "method": method, "seed": seed,
                        "test_accuracy": hist[-1]["test_accuracy"],
                        "best_test_accuracy": max(h["test_accuracy"] for h in hist),
                        "params": objectives.deployed_params(model, state.params),
                        "train_time_s": result.train_time_s, "images_per_s": _steady_rate(hist),
                        "students_in_pass": len(group), "history": hist})
        return out


def _load_split(c: ExperimentConfig, split: str, subset: int | None, num_classes: int):
    """``data.load_arrays`` of the class-balanced ``subset`` (the first subset/classes images
    of each class; only those are decoded), with a damaged prepared copy reported in one line."""
    per_class, flag = None, f"--{split}-subset"
    if subset:
        per_class = subset // num_classes
        if per_class < 1:
            raise ConfigError(f"{flag} {subset} is smaller than the {num_classes} classes; use "
                              f"at least {num_classes}.")
    dataset, data_dir = c.data.dataset, c.data.data_dir
    try:
        return data.load_arrays(dataset, split, data_dir=data_dir, per_class=per_class)
    except data.DataNotFoundError:
        raise
    except ValueError as err:
        if per_class is None:
            raise
        raise ConfigError(f"{flag} {subset}: {err}") from err
    except Exception as err:  # noqa: BLE001 — array_record/TFDS raise many kinds
        import glob
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        files = sorted(glob.glob(os.path.join(os.path.expanduser(where), dataset, "*",
                                              f"{dataset}-{split}.*")))
        raise ConfigError(
            f"could not read the {split} split of {dataset} from {', '.join(files) or where} "
            f"({type(err).__name__}: {_squash(err, 200)}); its prepared files are damaged: "
            f"delete {os.path.join(where, dataset)} and prepare it again (pip install -e "
            "\".[prepare]\" with network), or pass --data-dir with an intact copy.") from err


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _squash(err: BaseException, limit: int) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _steady_rate(hist) -> float:
    """Training images/s per student: the median epoch after the first (which compiles)."""
    rates = [h["images_per_s"] for h in hist]
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))

