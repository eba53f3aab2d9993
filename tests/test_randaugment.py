"""Tests for kd_jax/data/_randaugment.py: ops against NumPy references, then the batch function."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.data import _randaugment as ra

H = W = 32
B = 16
_op = jax.jit(ra._apply_op)  # the op index is traced: one compile serves every op
_cutout = jax.jit(ra._cutout)
_augment = jax.jit(ra.rand_augment, static_argnames="num_ops")


def _images(seed, n=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (H, W, 3) if n is None else (n, H, W, 3), dtype=np.uint8)


def _smooth_image(seed):
    """A low-contrast image (a narrow, correlated range per channel), unlike uniform noise."""
    rng = np.random.default_rng(seed)
    ramp = np.cumsum(rng.integers(0, 3, (H, W, 3)), axis=1) // 2 + rng.integers(0, 100, 3)
    return ramp.clip(0, 255).astype(np.uint8)


def apply(name, image, v=0.5):
    out = _op(ra.OPS.index(name), image, np.float32(v))
    chex.assert_type(out, jnp.uint8)
    return np.asarray(out).astype(np.int64)


# ------------------------------------------------------------------ NumPy references


def np_gray(x):
    x = x.astype(np.int64)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) >> 16


def np_blend(degenerate, x, f, *, fused=False):
    """PIL's float32 ``floor(d + f (x - d))``; ``fused``: one rounding, as a multiply-add."""
    f = np.float32(f)
    d = degenerate.astype(np.float32)
    if fused:  # exact in float64 (a float32 times a 9-bit integer), then rounded once
        out = (d.astype(np.float64) + np.float64(f) * (x.astype(np.float64) - d)).astype(np.float32)
    else:
        out = d + f * (x.astype(np.float32) - d)
    return np.clip(np.floor(out), 0, 255).astype(np.int64)


def assert_blend(out, degenerate, x, f):
    """Each pixel is PIL's result or the fused multiply-add's, which XLA may emit instead."""
    ok = (out == np_blend(degenerate, x, f)) | (out == np_blend(degenerate, x, f, fused=True))
    assert ok.all(), f"{(~ok).sum()} pixels are neither rounding of the blend"


def np_equalize_channel(c):
    hist = [int((c == i).sum()) for i in range(256)]
    nonzero = [h for h in hist if h]
    step = (sum(nonzero) - nonzero[-1]) // 255
    if step == 0:
        return c.astype(np.int64)
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += hist[i]
    return np.asarray(lut)[c]


def np_affine_nearest(x, a, b, c, d, e, f):
    """Output (x, y) reads input floor(A (x + 0.5, y + 0.5) + t), 0 outside; float64."""
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    sx = np.floor(a * xs + b * ys + c).astype(int)
    sy = np.floor(d * xs + e * ys + f).astype(int)
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    return np.where(inside[..., None], x[sy.clip(0, H - 1), sx.clip(0, W - 1)], 0)


def np_cutout(x, side, cx, cy):
    out = x.copy()
    if side > 0:
        x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        x1, y1 = int(min(W, x0 + side)), int(min(H, y0 + side))
        out[y0:y1 + 1, x0:x1 + 1] = ra.CUTOUT_FILL
    return out


# ------------------------------------------------------------------ single ops


@pytest.mark.parametrize("v", [4.0, 5.5, 6.99, 7.2])
def test_posterize_keeps_top_int_v_bits(v):
    x = _images(0).astype(np.int64)
    bits = int(v)
    np.testing.assert_array_equal(apply("Posterize", x.astype(np.uint8), v), x & (0xFF << (8 - bits)) & 0xFF)


@pytest.mark.parametrize("threshold", [0.0, 37.5, 128.0, 255.0, 256.0])
def test_solarize_inverts_pixels_at_or_above_threshold(threshold):
    x = _images(1).astype(np.int64)
    np.testing.assert_array_equal(apply("Solarize", x.astype(np.uint8), threshold),
                                  np.where(x >= threshold, 255 - x, x))


def test_autocontrast_stretches_each_channel_and_keeps_a_flat_one():
    x = _smooth_image(2)
    x[..., 2] = 77  # a flat channel is left as it is
    lo, hi = x.min(axis=(0, 1)).astype(np.int64), x.max(axis=(0, 1)).astype(np.int64)
    expected = (x - lo) * 255 // np.maximum(hi - lo, 1)
    expected[..., 2] = 77
    out = apply("AutoContrast", x)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[..., :2].min(axis=(0, 1)), [0, 0])
    np.testing.assert_array_equal(out[..., :2].max(axis=(0, 1)), [255, 255])


@pytest.mark.parametrize("factor", [0.05, 0.5, 0.93])
def test_enhance_ops_blend_with_their_degenerate_image(factor):
    x = _images(3)
    gray = np_gray(x)
    mean = int(gray.mean() + 0.5)
    assert_blend(apply("Brightness", x, factor), np.zeros_like(x), x, factor)
    assert_blend(apply("Color", x, factor), np.repeat(gray[..., None], 3, -1), x, factor)
    assert_blend(apply("Contrast", x, factor), np.full_like(x, mean), x, factor)


def test_sharpness_blends_with_the_13_smoothing_kernel_keeping_borders():
    x = _images(4)
    xi = x.astype(np.int64)
    smooth = xi.copy()
    for i in range(1, H - 1):
        for j in range(1, W - 1):
            window = xi[i - 1:i + 2, j - 1:j + 2].sum(axis=(0, 1)) + 4 * xi[i, j]
            smooth[i, j] = np.floor(window / 13 + 0.5)
    assert_blend(apply("Sharpness", x, 0.3), smooth, x, 0.3)


def test_equalize_on_a_fixed_image():
    x = np.zeros((H, W, 3), np.uint8)
    x[..., 0] = np.repeat([10, 10, 20, 30], 8)[:, None]  # 512, 256, 256 pixels: step 3
    x[..., 1] = 90  # one value: step 0, unchanged
    x[..., 2] = np.arange(H * W).reshape(H, W) // 4  # 4 of each value: step 4, lut = identity
    out = apply("Equalize", x)
    # (step // 2 + pixels below) // step, clipped: (1 + 0) // 3, (1 + 512) // 3, (1 + 768) // 3.
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(np.repeat([0, 0, 171, 255], 8)[:, None], (H, W)))
    np.testing.assert_array_equal(out[..., 1], 90)
    np.testing.assert_array_equal(out[..., 2], x[..., 2])


@pytest.mark.parametrize("make", [_images, _smooth_image])
def test_equalize_matches_the_numpy_reference(make):
    x = make(5)
    expected = np.stack([np_equalize_channel(x[..., c]) for c in range(3)], -1)
    np.testing.assert_array_equal(apply("Equalize", x), expected)


def test_translate_moves_content_by_whole_pixels_and_fills_zero():
    x = _images(6)
    # v W = 3.2: output column j reads floor(j + 0.5 + 3.2) = j + 3.
    right = apply("TranslateX", x, 0.1)
    np.testing.assert_array_equal(right[:, :29], x[:, 3:])
    np.testing.assert_array_equal(right[:, 29:], 0)
    down = apply("TranslateY", x, -0.1)  # floor(i + 0.5 - 3.2) = i - 3
    np.testing.assert_array_equal(down[3:], x[:-3])
    np.testing.assert_array_equal(down[:3], 0)


@pytest.mark.parametrize("v", [-0.25, 0.125, 0.3])
def test_shear_index_mapping(v):
    x = _images(7)
    np.testing.assert_array_equal(apply("ShearX", x, v), np_affine_nearest(x, 1, v, 0, 0, 1, 0))
    np.testing.assert_array_equal(apply("ShearY", x, v), np_affine_nearest(x, 1, 0, 0, v, 1, 0))


def test_rotate_is_counter_clockwise_about_the_centre():
    x = _images(8)
    np.testing.assert_array_equal(apply("Rotate", x, 90.0), np.rot90(x))
    np.testing.assert_array_equal(apply("Rotate", x, 0.0), x)


def test_identity_returns_the_input():
    x = _images(9)
    np.testing.assert_array_equal(apply("Identity", x, 0.7), x)


@pytest.mark.parametrize("side, cx, cy", [(0.0, 10.0, 10.0), (0.3, 2.0, 29.5), (5.7, 3.0, 30.0),
                                          (15.9, 31.9, 1.2), (12.0, 16.0, 16.0)])
def test_cutout_matches_the_reference_rectangle(side, cx, cy):
    x = _images(10)
    out = np.asarray(_cutout(x, np.float32(side), np.float32(cx), np.float32(cy)))
    np.testing.assert_array_equal(out, np_cutout(x, side, cx, cy))


# ------------------------------------------------------------------ against Pillow itself


def _pil(name, image, v):
    from PIL import Image, ImageEnhance, ImageOps
    im = Image.fromarray(image)
    affine = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * W, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * H)}
    if name in affine:
        out = im.transform(im.size, Image.AFFINE, affine[name])
    elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
        out = getattr(ImageEnhance, name)(im).enhance(v)
    else:
        out = {"AutoContrast": lambda: ImageOps.autocontrast(im), "Identity": lambda: im,
               "Equalize": lambda: ImageOps.equalize(im), "Rotate": lambda: im.rotate(v),
               "Posterize": lambda: ImageOps.posterize(im, int(v)),
               "Solarize": lambda: ImageOps.solarize(im, v)}[name]()
    return np.asarray(out).astype(np.int64)


@pytest.mark.parametrize("name", ra.OPS)
def test_op_matches_pillow(name):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(11)
    lo, hi = ra.RANGES[ra.OPS.index(name)]
    for seed in range(4):
        x = _images(seed) if seed % 2 else _smooth_image(seed)
        v = np.float32(lo + (hi - lo) * rng.random())
        diff = np.abs(apply(name, x, v) - _pil(name, x, float(v)))
        if name in ("AutoContrast", "Brightness", "Color", "Contrast", "Sharpness"):
            # AutoContrast: PIL's double arithmetic; blends: a fused multiply-add (docstring).
            share = 0.2 if name == "AutoContrast" else 0.01
            assert diff.max() <= 1 and (diff > 0).mean() < share, f"{name} v={v}"
        else:
            np.testing.assert_array_equal(diff, 0, err_msg=f"{name} v={v}")


def test_cutout_matches_pillow_rectangle():
    ImageDraw = pytest.importorskip("PIL.ImageDraw")
    from PIL import Image
    x = _images(12)
    for side, cx, cy in [(0.3, 2.0, 29.5), (7.4, 20.6, 5.1), (15.9, 31.9, 31.0)]:
        im = Image.fromarray(x)
        x0, y0 = int(max(0, cx - side / 2.)), int(max(0, cy - side / 2.))
        ImageDraw.Draw(im).rectangle((x0, y0, min(W, x0 + side), min(H, y0 + side)), ra.CUTOUT_FILL)
        out = np.asarray(_cutout(x, np.float32(side), np.float32(cx), np.float32(cy)))
        np.testing.assert_array_equal(out, np.asarray(im))


# ------------------------------------------------------------------ the batch function


def test_output_dtype_shape_and_determinism():
    x = _images(13, B)
    key = jax.random.key(0)
    out = _augment(key, x)
    chex.assert_shape(out, (B, H, W, 3))
    chex.assert_type(out, jnp.uint8)
    np.testing.assert_array_equal(out, _augment(key, x))
    assert not np.array_equal(out, _augment(jax.random.key(1), x))


def test_image_i_uses_the_ith_split_key():
    x = _images(14, B)
    key = jax.random.key(3)
    batch = np.asarray(_augment(key, x, num_ops=2))
    one = jax.jit(ra._augment_one, static_argnums=2)  # unbatched: a real switch, not a select
    for i, k in enumerate(jax.random.split(key, B)[:4]):
        np.testing.assert_array_equal(batch[i], one(k, x[i], 2))


def test_each_image_gets_its_own_draws():
    x = np.repeat(_images(15)[None], B, axis=0)
    out = np.asarray(_augment(jax.random.key(4), x))
    assert len({o.tobytes() for o in out}) >= B - 2  # identical inputs, (nearly) all different


def test_cutout_alone_fills_one_square_of_at_most_16_pixels_a_side():
    x = _images(16, B)
    hits = 0
    for seed in range(4):
        out = np.asarray(_augment(jax.random.key(seed), x, num_ops=0))
        for image, original in zip(out, x):
            changed = (image != original).any(-1)
            if not changed.any():
                continue
            hits += 1
            rows, cols = np.nonzero(changed)
            box = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            np.testing.assert_array_equal(box, np.broadcast_to(ra.CUTOUT_FILL, box.shape))
            assert box.shape[0] <= 16 and box.shape[1] <= 16
    assert hits >= 4 * B - 2  # the side is 0 only with probability ~0


def test_bad_inputs_name_the_argument():
    x = _images(17, 2)
    with pytest.raises(ValueError, match="uint8"):
        ra.rand_augment(jax.random.key(0), x.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        ra.rand_augment(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="num_ops"):
        ra.rand_augment(jax.random.key(0), x, num_ops=-1)
