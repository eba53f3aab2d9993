"""Published CIFAR teachers shipped with kd_jax, and loading of any converted checkpoint.

    from kd_jax import pretrained
    model, variables, preprocess = pretrained.load("resnet56", dataset="cifar100")
    logits = model.apply(variables, preprocess(images_uint8_BxHxWx3), train=False)

Shipped (converted with :mod:`kd_jax.convert` from the authors' PyTorch files, byte-identical
to their releases; logits checked against PyTorch in ``tests/test_pretrained.py``, accuracy on
the published test sets in ``experiments/eval_pretrained.py``):

=========================  ==========  ========  =======================  =============  =========
name                       dataset     shortcut  input normalisation      published top-1  source
=========================  ==========  ========  =======================  =============  =========
``cifar10/resnet20``       CIFAR-10    A         ImageNet mean/std        91.73 %        akamaster
``cifar10/resnet56``       CIFAR-10    A         ImageNet mean/std        93.39 %        akamaster
``cifar100/resnet56``      CIFAR-100   B         CIFAR-100 mean/std       72.63 %        chenyaofo
=========================  ==========  ========  =======================  =============  =========

akamaster/pytorch_resnet_cifar10 is BSD-2-Clause, chenyaofo/pytorch-cifar-models BSD-3-Clause;
their notices ship beside the weights (``LICENSE-akamaster``, ``LICENSE-chenyaofo``).

Each teacher keeps its own input normalisation: ``preprocess`` maps uint8 ``[B, H, W, 3]`` RGB
pixels to what the model was trained on, ``(x / 255 - mean) / std``. A student distilled from it
keeps kd_jax's dataset statistics; the distillation step normalises one augmented view each
model's own way (see :func:`kd_jax.train.distill_step`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Normalize", "Pretrained", "SCHEME", "Teacher", "available", "checkpoint_digest",
           "info", "load", "load_checkpoint", "load_teacher", "path", "resolve", "teacher_dir",
           "teacher_meta"]

SCHEME = "pretrained:"
_ROOT = os.path.dirname(os.path.abspath(__file__))
_SHIPPED = ("cifar10/resnet20", "cifar10/resnet56", "cifar100/resnet56")


@dataclasses.dataclass(frozen=True)
class Normalize:
    """``(images / 255 - mean) / std`` per RGB channel, float32; ``images`` uint8 ``[..., 3]``.

    Hashable, so it can be bound as a static argument of a jitted step.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images):
        import jax.numpy as jnp
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


class Pretrained(NamedTuple):
    """A loaded teacher: the Flax module, its variables and its input preprocessing."""

    model: Any
    variables: Any
    preprocess: Normalize


def available() -> list[str]:
    """Names of the shipped teachers, ``"<dataset>/<arch>"``."""
    return list(_SHIPPED)


def path(arch: str, *, dataset: str) -> str:
    """The directory of the shipped teacher ``arch`` trained on ``dataset``."""
    name = f"{dataset}/{arch}"
    if name not in _SHIPPED:
        raise ValueError(f"no shipped teacher {name!r}; shipped: {', '.join(_SHIPPED)}.")
    return os.path.join(_ROOT, dataset, arch)


def resolve(spec: str) -> str:
    """A checkpoint path for ``spec``: ``"pretrained:<dataset>/<arch>"`` or a path, unchanged."""
    if not spec.startswith(SCHEME):
        return spec
    name = spec[len(SCHEME):]
    dataset, _, arch = name.partition("/")
    return path(arch, dataset=dataset)


def info(arch: str, *, dataset: str) -> dict[str, Any]:
    """The metadata of a shipped teacher: architecture, shortcut, normalisation, source file
    and SHA-256, licence, published accuracy (no arrays are read)."""
    from kd_jax import checkpoint
    return checkpoint.load_meta(path(arch, dataset=dataset))


def preprocess_of(meta: dict[str, Any], dataset: str | None = None) -> Normalize:
    """The input preprocessing recorded in ``meta``; without one, ``dataset``'s statistics
    (kd_jax's own normalisation, what teachers trained by kd_jax use)."""
    norm = meta.get("normalization")
    if norm is None:
        from kd_jax import data
        spec = data.DATASETS[dataset or meta["dataset"]]
        return Normalize(tuple(spec.mean), tuple(spec.std))
    return Normalize(tuple(float(x) for x in norm["mean"]), tuple(float(x) for x in norm["std"]))


def load_checkpoint(directory: str, *, dtype=None, sharding=None) -> Pretrained:
    """Loads a kd_jax variables checkpoint (converted or trained) with its model and
    preprocessing, building the model from the recorded ``arch``/``shortcut``/``num_classes``
    (initialised at the recorded ``image_size``, default 32). ``sharding`` places every
    array (e.g. replicated over a mesh)."""
    import jax
    import jax.numpy as jnp

    from kd_jax import checkpoint, models

    directory = resolve(directory)
    meta = checkpoint.load_meta(directory)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = models.create(meta["arch"], meta["num_classes"], shortcut=meta.get("shortcut"),
                          **kwargs)
    size = int(meta.get("image_size", 32))  # 224 for converted torchvision ResNets
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, size, size, 3)), train=False))
    target = {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          target)
    variables, meta = checkpoint.load_variables(directory, target)
    return Pretrained(model, variables, preprocess_of(meta))


def load(arch: str, *, dataset: str, dtype=None) -> Pretrained:
    """The shipped teacher ``arch`` for ``dataset``: ``(model, variables, preprocess)``.

    ``load("resnet56", dataset="cifar100")``; ``preprocess`` takes uint8 NHWC images.
    """
    return load_checkpoint(path(arch, dataset=dataset), dtype=dtype)


# ------------------------------------------------------------------ teachers by spec

class Teacher(NamedTuple):
    """A teacher named by a spec (:func:`load_teacher`): the Flax module, its variables, its
    own input preprocessing (``None``: the dataset's normalisation, as for teachers trained
    by kd_jax), its metadata, its checkpoint directory and the SHA-256 of its content."""

    model: Any
    variables: Any
    preprocess: Normalize | None
    meta: dict[str, Any]
    path: str
    digest: str


def teacher_dir(spec: str) -> str:
    """The checkpoint directory of a teacher spec: ``"pretrained:<dataset>/<arch>"``, a
    directory written by ``python -m kd_jax.convert``, a kd_jax variables checkpoint, or a
    trained teacher's directory holding ``final/``. Raises ``ValueError`` (message starting
    with the spec) for an unknown shipped name."""
    try:
        where = resolve(spec)
    except ValueError as err:
        raise ValueError(f"{spec!r}: {err}") from err
    if os.path.isdir(os.path.join(where, "final")):
        where = os.path.join(where, "final")
    return where


def teacher_meta(spec: str) -> dict[str, Any]:
    """The metadata of the teacher checkpoint ``spec`` (no arrays are read); ``ValueError``
    when ``spec`` names no teacher checkpoint (e.g. a students checkpoint)."""
    from kd_jax import checkpoint
    where = teacher_dir(spec)
    try:
        meta = checkpoint.load_meta(where)
    except (OSError, ValueError) as err:
        raise ValueError(f"{spec!r} is not a teacher checkpoint (no readable meta); use "
                         "pretrained:<dataset>/<arch>, a directory written by python -m "
                         "kd_jax.convert, or <workdir>/teacher_*/final.") from err
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise ValueError(f"{spec!r} is not a teacher checkpoint (its meta names no arch and "
                         "num_classes; a students checkpoint?); use "
                         "pretrained:<dataset>/<arch> or <workdir>/teacher_*/final.")
    return meta


def checkpoint_digest(directory: str) -> str:
    """SHA-256 over the relative names and contents of every file under ``directory``: the
    identity of a checkpoint's content, whatever its path."""
    import hashlib
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, directory).encode() + b"\0")
            with open(full, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def load_teacher(spec: str, *, dtype=None, sharding=None) -> Teacher:
    """The teacher named by ``spec`` (see :func:`teacher_dir`), checked and loaded: its
    metadata must name an architecture and classes, its arrays must fill that model exactly
    (else one ``ValueError`` naming the spec). A converted teacher keeps its authors'
    normalisation (``preprocess``); one trained by kd_jax uses the dataset's (``None``)."""
    where = teacher_dir(spec)
    meta = teacher_meta(spec)
    try:
        loaded = load_checkpoint(where, dtype=dtype, sharding=sharding)
    except Exception as err:  # noqa: BLE001 — any unreadable array is the user's file
        text = " ".join(str(err).split())
        text = text if len(text) <= 160 else text[:157] + "..."
        raise ValueError(f"{spec!r}: its arrays cannot be read as a {meta.get('arch')} "
                         f"({type(err).__name__}: {text}); convert it again or point at "
                         "another checkpoint.") from err
    preprocess = loaded.preprocess if meta.get("normalization") else None
    return Teacher(loaded.model, loaded.variables, preprocess, meta, where,
                   checkpoint_digest(where))
