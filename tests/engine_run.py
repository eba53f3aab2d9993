"""Runs a small teacher + three-student distillation (KD, FitNets, CRD) end to end; used by test_train.py in
subprocesses (fake device counts, two processes, SIGKILL and resume).

Writes the final student parameters (flattened) and test accuracies to ``--out`` (.npz).
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--workdir", default=None)
p.add_argument("--devices", type=int, default=None, help="use only the first N devices")
p.add_argument("--kill-at-step", type=int, default=None)
p.add_argument("--coordinator", default=None)
p.add_argument("--num-processes", type=int, default=None)
p.add_argument("--process-id", type=int, default=None)
p.add_argument("--from-environment", action="store_true",
               help="start as under a cluster launcher: parallel.maybe_initialize_distributed() "
                    "with no arguments reads the environment")
p.add_argument("--batch-size", type=int, default=16)
args = p.parse_args()

import jax  # noqa: E402

if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
elif args.from_environment:
    from kd_jax import parallel  # noqa: E402

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert parallel.maybe_initialize_distributed(initialization_timeout=120)
    print("initialized", jax.process_index(), jax.process_count(), flush=True)

import numpy as np  # noqa: E402

from kd_jax import checkpoint, data, loop, objectives, parallel, train  # noqa: E402
from tiny import TinyNet, toy_data  # noqa: E402

devices = jax.devices()[:args.devices] if args.devices else None
mesh = parallel.make_mesh(devices)
images, labels = toy_data(64)
test_x, test_y = toy_data(40, seed=1)
loader = data.TrainLoader(images, labels, batch_size=args.batch_size, seed=0, mesh=mesh)
evaluate = loop.make_evaluator(mesh, images=test_x, labels=test_y, batch_size=16,
                               dataset="cifar10")
spe = loader.steps_per_epoch


def ckpt(name):
    if args.workdir is None:
        return None
    return checkpoint.Checkpointer(os.path.join(args.workdir, name))


def kill_hook(record):
    if (args.kill_at_step is not None and record["phase"] == "students"
            and record["step"] >= args.kill_at_step):
        os.kill(os.getpid(), signal.SIGKILL)


teacher = TinyNet(width=8)
tx = train.make_optimizer(train.OptimConfig(lr=0.02, lr_batch_size=16, nesterov=True),
                          batch_size=args.batch_size, steps_per_epoch=spe, epochs=3)
state = train.create_train_state(teacher, tx, init_seed=0, data_seed=0)
result = loop.fit(loop.replicate((state,), mesh),
                  loop.make_supervised_step(mesh, dataset="cifar10"), loader=loader,
                  epochs=3, evaluate=evaluate, names=["teacher"], phase="teacher",
                  checkpointer=ckpt("teacher"), progress=False, log_every=1)
tvars = {"params": result.states[0].params, "batch_stats": result.states[0].batch_stats}

# KD; FitNets (a trained head); CRD (heads plus a memory bank indexed by example ids, so
# resume, device counts and processes are checked on non-trainable state too).
objs = [objectives.from_method("kd"), objectives.from_method("fitnet", "fitnet.weight=10"),
        objectives.from_method("crd", "crd.num_negatives=32")]
states = []
for seed, obj in enumerate(objs, start=1):
    model = objectives.prepare_student(TinyNet(width=4), obj, teacher)
    aux = objectives.init_state(obj, num_examples=len(labels), train_labels=labels, seed=seed)
    states.append(train.create_train_state(model, tx, init_seed=seed, data_seed=0,
                                           aux_state=aux))
step = loop.make_distill_step(mesh, objectives=objs, teacher_apply=teacher.apply,
                              dataset="cifar10", steps_per_epoch=spe)
result = loop.fit(loop.replicate(tuple(states), mesh), lambda s, b: step(s, tvars, b),
                  loader=loader, epochs=3, evaluate=evaluate, names=["kd", "fitnet", "crd"],
                  phase="students", checkpointer=ckpt("students"), progress=False,
                  log_every=1, hooks=[kill_hook])

if jax.process_index() == 0:
    flat = {}
    for k, s in enumerate(result.states):
        for path, leaf in jax.tree_util.tree_leaves_with_path(
                {"params": s.params, "batch_stats": s.batch_stats, "aux_state": s.aux_state}):
            flat[f"{k}/{jax.tree_util.keystr(path)}"] = np.asarray(jax.device_get(leaf))
    for k, h in enumerate(result.history):
        flat[f"{k}/test_accuracy"] = np.array([r["test_accuracy"] for r in h])
        flat[f"{k}/train_loss"] = np.array([r["train_loss"] for r in h])
    np.savez(args.out, **flat)
print("resumed_from", result.resumed_from_step)
