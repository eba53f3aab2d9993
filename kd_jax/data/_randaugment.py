"""RandAugment + Cutout for ``uint8`` CIFAR batches, on device and under ``jit``.

The strong view of MLKD (Jin et al., "Multi-Level Logit Distillation", CVPR 2023) is
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``RandAugment(2, 10)`` + normalise,
where RandAugment is the FixMatch variant of the authors' repository
(github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py``):
``num_ops`` ops drawn uniformly *with replacement* from the 14 below, each with a value
``v ~ U[lo, hi)`` (the magnitude ``m`` is unused), then Cutout. Only the RandAugment + Cutout
part is here; crop/flip is :func:`kd_jax.data.random_crop_flip`.

==============  ==============  ===========================================================
op              v range         result (PIL semantics)
==============  ==============  ===========================================================
AutoContrast    unused          per channel ``(x - lo) * 255 // (hi - lo)``; identity if flat
Brightness      [0.05, 0.95)    blend with black
Color           [0.05, 0.95)    blend with the grayscale image
Contrast        [0.05, 0.95)    blend with the grayscale image's rounded mean
Equalize        unused          per-channel histogram equalisation (``ImageOps.equalize``)
Identity        unused          the input
Posterize       [4, 8)          keep the top ``int(v)`` bits
Rotate          [-30, 30)       ``v`` degrees counter-clockwise about the centre
Sharpness       [0.05, 0.95)    blend with ``ImageFilter.SMOOTH`` (borders kept)
ShearX, ShearY  [-0.3, 0.3)     affine ``(1, v, 0, 0, 1, 0)`` / ``(1, 0, 0, v, 1, 0)``
Solarize        [0, 256)        ``255 - x`` where ``x >= v``
TranslateX/Y    [-0.3, 0.3)     affine ``(1, 0, v W, 0, 1, 0)`` / ``(1, 0, 0, 0, 1, v H)``
==============  ==============  ===========================================================

Blends are ``ImageEnhance``'s ``floor(d + v (x - d))`` in float32, clipped to [0, 255];
grayscale is PIL's ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``; SMOOTH is the kernel
``[[1,1,1],[1,5,1],[1,1,1]] / 13`` rounded to nearest. Geometric ops use PIL's nearest-neighbour
convention: output pixel ``(x, y)`` reads input ``floor(A (x + 0.5, y + 0.5) + t)``, 0 outside.
Cutout, as the reference: side ``s = U[0, 0.5) W``; centre ``c = W - (W - 1) U[0, 1)`` (the
reference's ``np.random.uniform(w)`` draws from ``(1, W]``, not ``[0, W)``); corner
``x0 = int(max(0, c - s / 2))``; PIL's ``rectangle`` fills columns ``x0 .. int(min(W, x0 + s))``
inclusive (likewise rows) with ``(125, 123, 114)``, so at most ``int(s) + 1 <= 16`` pixels a side.

Exact PIL results (for the same draws) for every op but AutoContrast and the blends, and for
Cutout, checked against Pillow 13 on random 32x32 images. Rotate and shears follow PIL's 16.16
fixed-point path, its six coefficients rounded from float32 rather than double (a coefficient
may differ by one 1/65536 unit); translations floor in float32 where PIL uses double.
AutoContrast uses the exact rational floor: PIL's double ``int(x * scale + offset)`` is one
lower where the exact value is an integer, at 12094 of the (lo, hi, x) triples (it maps ``hi``
to 254 for 4852 of the 32640 (lo, hi) pairs), so it can differ from PIL by 1 there. Blends: XLA
may fuse ``d + v (x - d)`` into one multiply-add (it did on the x86 CPU this was tested on),
rounding once where PIL rounds twice, so a pixel whose value lies within a float32 rounding of
an integer can be 1 lower (e.g. ``103 + 0.93 * -100`` gives 9, PIL 10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
    "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
)
# (lo, hi) of v per op, as the reference's augment_list().
RANGES = (
    (0.0, 1.0), (0.05, 0.95), (0.05, 0.95), (0.05, 0.95), (0.0, 1.0), (0.0, 1.0), (4.0, 8.0),
    (-30.0, 30.0), (0.05, 0.95), (-0.3, 0.3), (-0.3, 0.3), (0.0, 256.0), (-0.3, 0.3),
    (-0.3, 0.3),
)
CUTOUT_FILL = (125, 123, 114)


# ------------------------------------------------------------------------------ pixel ops
# Each op maps an int32 image [H, W, 3] with values in [0, 255] and a float32 v to the same.


def _gray(x):
    """PIL's RGB -> L conversion, [H, W] int32."""
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _blend(degenerate, x, factor):
    # XLA may contract this into a fused multiply-add (PIL rounds the product first): see the
    # module docstring.
    out = jnp.floor(degenerate.astype(jnp.float32) + factor * (x - degenerate).astype(jnp.float32))
    return jnp.clip(out, 0, 255).astype(jnp.int32)


def _autocontrast(x, v):
    del v
    lo = x.min(axis=(0, 1))
    hi = x.max(axis=(0, 1))
    stretched = (x - lo) * 255 // jnp.maximum(hi - lo, 1)
    return jnp.where(hi > lo, stretched, x)


def _brightness(x, v):
    return _blend(jnp.zeros_like(x), x, v)


def _color(x, v):
    return _blend(jnp.broadcast_to(_gray(x)[..., None], x.shape), x, v)


def _contrast(x, v):
    g = _gray(x)
    n = g.size
    mean = (2 * g.sum() + n) // (2 * n)  # int(mean + 0.5), exactly
    return _blend(jnp.full_like(x, mean), x, v)


def _equalize_channel(c):
    n = c.size
    hist = jnp.zeros(256, jnp.int32).at[c.reshape(-1)].add(1)
    step = (n - hist[c.max()]) // 255
    before = jnp.cumsum(hist) - hist
    # PIL's point() clips the LUT to 255 (it can exceed it at the top bin).
    lut = jnp.minimum((step // 2 + before) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[c], c)


def _equalize(x, v):
    del v
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(x)


def _identity(x, v):
    del v
    return x


def _posterize(x, v):
    bits = jnp.clip(jnp.floor(v).astype(jnp.int32), 1, 8)
    return x & (256 - (1 << (8 - bits)))


def _smooth(x):
    h, w, _ = x.shape
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    acc = 4 * x + sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3))
    inner = (acc + 6) // 13  # round(acc / 13); acc / 13 is never a half
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    return jnp.where(border, x, inner)


def _sharpness(x, v):
    return _blend(_smooth(x), x, v)


def _affine(x, a, b, c, d, e, f, *, fixed=True):
    """PIL ``Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST)``, fill 0.

    Output ``(x, y)`` reads input ``floor(a X + b Y + c, d X + e Y + f)`` at the pixel centre
    ``(X, Y) = (x + 0.5, y + 0.5)``. ``fixed``: PIL's 16.16 fixed-point path (its choice for a
    small image unless ``b == d == 0``); else its float path (pure scale/translation).
    """
    h, w, _ = x.shape
    cols = jnp.arange(w, dtype=jnp.int32)[None, :]
    rows = jnp.arange(h, dtype=jnp.int32)[:, None]
    if fixed:
        def fix(t):
            return jnp.floor(t * 65536.0 + 0.5).astype(jnp.int32)
        src_x = (fix(c + 0.5 * (a + b)) + cols * fix(a) + rows * fix(b)) >> 16
        src_y = (fix(f + 0.5 * (d + e)) + cols * fix(d) + rows * fix(e)) >> 16
    else:
        src_x = jnp.floor(a * (cols + 0.5) + b * (rows + 0.5) + c).astype(jnp.int32)
        src_y = jnp.floor(d * (cols + 0.5) + e * (rows + 0.5) + f).astype(jnp.int32)
    src_x, src_y = jnp.broadcast_arrays(src_x, src_y)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    out = x[jnp.clip(src_y, 0, h - 1), jnp.clip(src_x, 0, w - 1)]
    return jnp.where(inside[..., None], out, 0)


def _rotate(x, v):
    # img.rotate(v): the inverse map turns output coordinates by -v about the centre.
    h, w, _ = x.shape
    cx, cy = w / 2, h / 2
    t = jnp.radians(v)
    cos, sin = jnp.cos(t), jnp.sin(t)
    return _affine(x, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _shear_x(x, v):
    return _affine(x, 1.0, v, 0.0, 0.0, 1.0, 0.0)


def _shear_y(x, v):
    return _affine(x, 1.0, 0.0, 0.0, v, 1.0, 0.0)


def _solarize(x, v):
    return jnp.where(x >= v, 255 - x, x)


def _translate_x(x, v):
    return _affine(x, 1.0, 0.0, v * x.shape[1], 0.0, 1.0, 0.0, fixed=False)


def _translate_y(x, v):
    return _affine(x, 1.0, 0.0, 0.0, 0.0, 1.0, v * x.shape[0], fixed=False)


_BRANCHES = (
    _autocontrast, _brightness, _color, _contrast, _equalize, _identity, _posterize,
    _rotate, _sharpness, _shear_x, _shear_y, _solarize, _translate_x, _translate_y,
)
assert len(_BRANCHES) == len(OPS) == len(RANGES)


def _apply_op(index: jax.Array, image: jax.Array, value: jax.Array) -> jax.Array:
    """Op ``OPS[index]`` with value ``value`` on one ``uint8`` image ``[H, W, 3]``."""
    x = image.astype(jnp.int32)
    out = jax.lax.switch(index, _BRANCHES, x, jnp.asarray(value, jnp.float32))
    return out.astype(jnp.uint8)


def _cutout(image: jax.Array, side: jax.Array, cx: jax.Array, cy: jax.Array) -> jax.Array:
    """The reference's ``CutoutAbs``: a square of ``side`` pixels about ``(cx, cy)``."""
    h, w, _ = image.shape
    x0 = jnp.floor(jnp.maximum(0.0, cx - side / 2))
    y0 = jnp.floor(jnp.maximum(0.0, cy - side / 2))
    x1 = jnp.floor(jnp.minimum(w, x0 + side))
    y1 = jnp.floor(jnp.minimum(h, y0 + side))
    cols = jnp.arange(w)[None, :]
    rows = jnp.arange(h)[:, None]
    inside = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1) & (side > 0)
    fill = jnp.asarray(CUTOUT_FILL, image.dtype)
    return jnp.where(inside[..., None], fill, image)


def _augment_one(key: jax.Array, image: jax.Array, num_ops: int) -> jax.Array:
    h, w, _ = image.shape
    key_ops, key_values, key_cut = jax.random.split(key, 3)
    indices = jax.random.randint(key_ops, (num_ops,), 0, len(OPS))
    lo, hi = jnp.asarray(RANGES, jnp.float32).T
    u = jax.random.uniform(key_values, (num_ops,))
    values = lo[indices] + (hi[indices] - lo[indices]) * u
    # A scan, not a Python loop: unrolled, XLA fuses one op's 14-way select into the next
    # op's 14 branches, 4-8x slower at num_ops=2 on CPU (under vmap every branch runs).
    image, _ = jax.lax.scan(
        lambda x, op: (_apply_op(op[0], x, op[1]), None), image, (indices, values))
    u_side, u_x, u_y = jax.random.uniform(key_cut, (3,))
    # The reference's np.random.uniform(w) is uniform(low=w, high=1): a centre in (1, w].
    return _cutout(image, 0.5 * u_side * w, w - (w - 1) * u_x, h - (h - 1) * u_y)


def rand_augment(key: jax.Array, images: jax.Array, *, num_ops: int = 2) -> jax.Array:
    """MLKD's RandAugment(``num_ops``) + Cutout, independently per image.

    ``images`` ``uint8`` ``[B, H, W, 3]`` (NHWC, before normalisation); returns ``uint8``
    ``[B, H, W, 3]``. Image ``i`` uses ``jax.random.split(key, B)[i]`` for its op choices,
    values and Cutout; the same ``key`` gives the same output. Jittable (``num_ops`` static).
    The ops, ranges and where this differs from PIL are in the module docstring.

    References:
      Jin et al., "Multi-Level Logit Distillation", CVPR 2023;
      Cubuk et al., "RandAugment", CVPR Workshops 2020; Sohn et al., "FixMatch", NeurIPS 2020.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (NHWC RGB), got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 pixels before normalisation, got {images.dtype}")
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}")
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _augment_one(k, x, num_ops))(keys, images)

