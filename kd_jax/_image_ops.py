"""Image sources and host-side image transforms for :mod:`kd_jax.hostdata` (NumPy and PIL only).

Free of JAX: decode workers (spawned processes) unpickle :class:`DecodeBatch` and its source
from here. Every transform is a pure function of the encoded bytes and, for training, of a
per-example ``numpy.random.Generator``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_AUGMENT_STREAM = 0x6B64  # Keeps the augmentation stream apart from epoch_permutation's.


class ImageDecodeError(ValueError):
    """An image file or record that PIL cannot decode; the message names it."""


# ------------------------------------------------------------------------------ sources


class ImageFolder:
    """The examples of an image-folder split ``root/<class>/<image>``, as torchvision's.

    Classes are the sorted subdirectory names (index = position); the images of a class are
    its files with an extension in ``IMG_EXTENSIONS`` (any case), directory by directory in
    sorted ``os.walk`` order (following symbolic links), sorted by name within a directory:
    torchvision's ``ImageFolder(root)`` order, so example ``i`` is its ``samples[i]``.
    ``read(i) -> (encoded bytes, label, path)``.
    """

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {root} does not exist; expected {root}/<class>/<image> files "
                "(folder:PATH reads PATH/train and PATH/val)"
            )
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class directories in {root}; expected {root}/<class>/")
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            found = [os.path.relpath(os.path.join(dirpath, f), root)
                     for dirpath, _, files in sorted(os.walk(root / name, followlinks=True))
                     for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(
                    f"class directory {root / name} holds no images (extensions "
                    f"{', '.join(IMG_EXTENSIONS)}); remove it or add images"
                )
            paths += found
            labels += [label] * len(found)
        # Fixed-width bytes, not a list of str: ~50 MB for ImageNet, pickled to every worker.
        self._paths = np.array([os.fsencode(p) for p in paths])
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self._paths[i])

    def read(self, i: int) -> tuple[bytes, int, str]:
        path = self.path(i)
        return path.read_bytes(), int(self.labels[i]), str(path)


class TfdsSource:
    """A TFDS split read through its ``array_record`` data source, images left encoded.

    ``read(i) -> (encoded bytes, label, description)``. The data source is opened lazily
    (and again in each worker process) from ``(name, split, data_dir)``.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = None
        source = self._open()
        self._len = len(source)
        self.num_classes = self._builder.info.features["label"].num_classes

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # Deferred: about a second.

            self._builder = tfds.builder(self.name, data_dir=self.data_dir,
                                         file_format="array_record")
            if not self._builder.is_prepared():
                raise FileNotFoundError(
                    f"TFDS {self.name} {self._builder.info.version} is not prepared in "
                    f"{self._builder.data_dir_root}; prepare it from the manual download as TFDS "
                    "documents (tfds build imagenet2012 --manual_dir=DIR "
                    "--file_format=array_record) and pass its data dir"
                )
            try:
                self._source = self._builder.as_data_source(
                    self.split, decoders={"image": tfds.decode.SkipDecoding()})
            except NotImplementedError as err:
                raise FileNotFoundError(
                    f"TFDS {self.name} in {self._builder.data_dir} is not stored as "
                    "array_record; prepare it again with --file_format=array_record"
                ) from err
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_builder": None}

    def __len__(self) -> int:
        return self._len

    def read(self, i: int) -> tuple[bytes, int, str]:
        example = self._open()[int(i)]
        name = example.get("file_name", b"")
        name = name.decode() if isinstance(name, bytes) else str(name)
        where = f"TFDS {self.name} {self.split} example {i}" + (f" ({name})" if name else "")
        return example["image"], int(example["label"]), where


# --------------------------------------------------------------------------- transforms


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation draws of example ``index`` in epoch ``epoch``: a function of the three
    only, so no worker, thread or process count changes them."""
    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, index])


# What PIL raises for undecodable data: UnidentifiedImageError and truncation are OSErrors.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(data: bytes, where: str) -> Image.Image:
    """The image with its header read (size, mode); pixels are decoded by :func:`_rgb`."""
    try:
        return Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as err:
        raise ImageDecodeError(f"cannot decode image {where}: {err}; replace or remove it") from err


def _rgb(image: Image.Image, where: str) -> Image.Image:
    """Decoded RGB pixels (greyscale, palette, CMYK and alpha converted as PIL does)."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except _DECODE_ERRORS as err:
        raise ImageDecodeError(f"cannot decode image {where}: {err}; replace or remove it") from err


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int, *,
                               scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params``: up to ten
    draws of an area fraction ``U(scale)`` and a log-uniform aspect ratio in ``ratio``, the
    first that fits placed uniformly; else the centre crop of the whole image clamped to
    ``ratio``. The draws come from ``rng`` instead of torch's generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draft_scale(image: Image.Image, h: int, w: int, size: int) -> float:
    """Asks libjpeg for the largest 1/2, 1/4 or 1/8 reduced decode that keeps the crop at least
    ``size`` pixels on both sides, so the final resize still only shrinks; returns the scale."""
    s = 1
    while s < 8 and min(h, w) >= 2 * s * size:
        s *= 2
    if s == 1 or image.format != "JPEG":
        return 1.0
    width, height = image.size
    result = image.draft(image.mode, (width // s, height // s))
    return 1.0 if result is None else width / result[1][2]


def train_transform(data: bytes, where: str, rng: np.random.Generator, *, size: int = 224,
                    draft: bool = True) -> np.ndarray:
    """torchvision's ``RandomResizedCrop(size)`` (scale 0.08-1, ratio 3/4-4/3, bilinear) and
    ``RandomHorizontalFlip()`` with the draws from ``rng`` (the flip first, then
    :func:`random_resized_crop_params`); uint8 ``[size, size, 3]``. ``draft``: see
    :func:`resized_crop`."""
    image = _open(data, where)
    flip = rng.random() < 0.5
    box = random_resized_crop_params(rng, *image.size)
    return _resized_crop(image, where, box, flip=flip, size=size, draft=draft)


def resized_crop(data: bytes, where: str, box: tuple[int, int, int, int], *, flip: bool,
                 size: int = 224, draft: bool = False) -> np.ndarray:
    """The crop ``box = (top, left, h, w)`` resized to ``size`` x ``size`` (bilinear) and
    mirrored left-right if ``flip``; uint8 ``[size, size, 3]``.

    Without ``draft`` the pixels are torchvision's ``resized_crop`` (and ``hflip``) of the
    PIL image. With ``draft`` a JPEG whose crop is at least twice ``size`` on both sides is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) and the same box, scaled, is
    resampled from it: the same crop, a slightly different resampling, a fraction of the
    decoding.
    """
    return _resized_crop(_open(data, where), where, box, flip=flip, size=size, draft=draft)


def _resized_crop(image: Image.Image, where: str, box, *, flip: bool, size: int,
                  draft: bool) -> np.ndarray:
    top, left, h, w = box
    s = _draft_scale(image, h, w, size) if draft else 1.0
    image = _rgb(image, where)
    if s == 1.0:
        out = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    else:
        scaled = (left / s, top / s, (left + w) / s, (top + h) / s)
        out = image.resize((size, size), Image.BILINEAR, box=scaled)
    array = np.asarray(out)
    return np.ascontiguousarray(array[:, ::-1]) if flip else array


def eval_transform(data: bytes, where: str, *, size: int = 224,
                   resize_size: int = 256) -> np.ndarray:
    """torchvision's ``Resize(resize_size)`` + ``CenterCrop(size)`` on a PIL image: the shorter
    side scaled to ``resize_size`` (the longer to ``int(resize_size * long / short)``,
    bilinear with PIL's antialiasing), then the centred ``size`` x ``size`` crop; uint8
    ``[size, size, 3]``."""
    image = _rgb(_open(data, where), where)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resize_size * long / short)
    new = (resize_size, new_long) if width <= height else (new_long, resize_size)
    if new != (width, height):
        image = image.resize(new, Image.BILINEAR)
    top = int(round((new[1] - size) / 2.0))
    left = int(round((new[0] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


# -------------------------------------------------------------------------- batch maker


class DecodeBatch:
    """Turns the example indices of one process-local batch into its arrays.

    Called with an int64 ``[b]`` array (``-1``: padding, a zero image with label 0 and mask
    False) and returns ``{"image": uint8[b, size, size, 3], "label": int32[b], "index":
    int32[b], "mask": bool[b]}``. Picklable, so decode workers can run it.
    """

    def __init__(self, source, *, train: bool, seed: int, epoch: int, size: int,
                 resize_size: int, draft: bool):
        self.source, self.train, self.seed, self.epoch = source, train, seed, epoch
        self.size, self.resize_size, self.draft = size, resize_size, draft

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        b = len(indices)
        images = np.zeros((b, self.size, self.size, 3), np.uint8)
        labels = np.zeros((b,), np.int32)
        for row, i in enumerate(indices):
            if i < 0:
                continue
            data, labels[row], where = self.source.read(int(i))
            if self.train:
                rng = example_rng(self.seed, self.epoch, int(i))
                images[row] = train_transform(data, where, rng, size=self.size, draft=self.draft)
            else:
                images[row] = eval_transform(data, where, size=self.size,
                                             resize_size=self.resize_size)
        return {"image": images, "label": labels,
                "index": np.maximum(indices, 0).astype(np.int32), "mask": indices >= 0}
