"""torchvision-layout ImageNet ResNets (kd_jax/models/imagenet_resnet.py) and their converter
(kd_jax/_convert_torchvision.py through kd_jax.convert).

The logit fixture (tests/fixtures/torchvision_logits.npz) was made by
tests/fixtures/make_torchvision_logits.py with torchvision's own modules on the deterministic
weights of tests/torchvision_weights.py; these tests need no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision_weights as tw

from kd_jax import _convert_torchvision, convert, models, pretrained

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_logits.npz"
_KEY = jax.random.PRNGKey(0)


def _init_shapes(model, size=64):
    return jax.eval_shape(lambda: model.init(_KEY, jnp.zeros((1, size, size, 3)), train=False))


@pytest.mark.parametrize("name,count", [("imagenet_resnet18", 11_689_512),
                                        ("imagenet_resnet34", 21_797_672),
                                        ("imagenet_resnet50", 25_557_032)])
def test_param_counts_are_torchvisions(name, count):
    """``sum(p.numel() for p in torchvision.models.<arch>().parameters())``, 1000 classes."""
    assert models.num_params(_init_shapes(models.create(name, 1000))["params"]) == count


@pytest.mark.parametrize("name,widths", [("imagenet_resnet18", (64, 128, 256, 512)),
                                         ("imagenet_resnet50", (256, 512, 1024, 2048))])
def test_features_have_the_cifar_resnets_keys_and_torchvisions_shapes(name, widths):
    """Same keys as the CIFAR ResNets' (the feature terms' contract); stem before the
    max-pool at H/2, stage s at H/2**(s+1); bfloat16 maps, float32 pooled and logits."""
    model = models.create(name, 7, dtype=jnp.bfloat16)
    variables = _init_shapes(model, 224)
    logits, feats = jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((2, 224, 224, 3)), train=False, return_features=True), variables)
    cifar = models.create("resnet18", 7)
    _, cifar_feats = jax.eval_shape(lambda v: cifar.apply(
        v, jnp.zeros((2, 32, 32, 3)), train=False, return_features=True), _init_shapes(cifar, 32))
    assert set(feats) == set(cifar_feats)
    assert feats["stem"].shape == (2, 112, 112, 64)
    for s, (size, width) in enumerate(zip((56, 28, 14, 7), widths), start=1):
        assert feats[f"stage{s}"].shape == (2, size, size, width)
        assert feats[f"stage{s}"].dtype == jnp.bfloat16
    assert feats["pooled"].shape == (2, widths[-1]) and feats["pooled"].dtype == jnp.float32
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_train_mode_updates_batch_stats_only():
    model = models.create("imagenet_resnet18", 5)
    variables = _init_shapes(model)
    _, updated = jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((2, 64, 64, 3)), train=True, mutable=["batch_stats"]), variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(updated["batch_stats"],
                                                  variables["batch_stats"])


def _fixture():
    fixture = np.load(FIXTURE)
    assert int(fixture["seed"]) == tw.SEED and tuple(fixture["image_shape"]) == tw.IMAGE_SHAPE
    return fixture


@pytest.mark.parametrize("arch", list(tw.ARCHS))
def test_converted_logits_equal_torchvisions(arch):
    """torchvision's eval logits on the same weights, within 1e-4 (measured: < 1e-6). A
    "SAME" max-pool or ResNet-50's stride on the first 1x1 (v1) moves them by > 0.03."""
    fixture = _fixture()
    state = tw.random_state_dict(arch)
    checksum = sum(float(v.astype(np.float64).sum()) for v in state.values())
    assert checksum == pytest.approx(float(fixture[f"{arch}_checksum"]), rel=1e-12), \
        "NumPy's generator no longer gives the fixture's weights; rerun the fixture script"
    variables, info = convert.convert_state_dict(state)
    assert info == {"arch": tw.KD_JAX_NAME[arch], "shortcut": None, "num_classes": 10}
    model = models.create(info["arch"], info["num_classes"])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, tw.fixture_images())
    np.testing.assert_allclose(np.asarray(logits), fixture[arch], atol=1e-4, rtol=0)


@pytest.fixture
def without_torch(monkeypatch):
    """``import torch`` fails: the path that must work without it."""
    monkeypatch.setitem(sys.modules, "torch", None)


def test_convert_command_on_a_torchvision_file(tmp_path, capsys, without_torch):
    """``python -m kd_jax.convert resnet18.pth out/`` with no other argument: a torch.save
    zip file read without torch, recognised as torchvision's ResNet-18 with 10 classes,
    ImageNet normalisation and the 256/224 eval transform recorded, and the loaded teacher
    gives torchvision's logits."""
    src, dst = tmp_path / "resnet18.pth", tmp_path / "out"
    tw.write_torch_zip(src, tw.random_state_dict("resnet18"))
    assert convert.main([str(src), str(dst)]) == 0
    assert "imagenet_resnet18" in capsys.readouterr().out
    meta = pretrained.teacher_meta(str(dst))
    assert meta["arch"] == "imagenet_resnet18" and meta["num_classes"] == 10
    assert meta["normalization"] == {"name": "imagenet", "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225]}
    assert meta["image_size"] == 224
    assert meta["eval_transform"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                      "antialias": True}
    assert meta["params"] == 11_689_512 - 1000 * 513 + 10 * 513
    teacher = pretrained.load_teacher(str(dst))
    logits = jax.jit(lambda v, x: teacher.model.apply(v, x, train=False))(
        teacher.variables, tw.fixture_images())
    np.testing.assert_allclose(np.asarray(logits), _fixture()["resnet18"], atol=1e-4, rtol=0)


def test_recognition_and_clear_errors():
    state = tw.random_state_dict("resnet18")
    assert _convert_torchvision.is_torchvision_resnet(state)
    cifar_stem = {**state, "conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}
    assert not _convert_torchvision.is_torchvision_resnet(cifar_stem)
    with pytest.raises(convert.ConversionError, match="'fc.bias'"):
        convert.convert_state_dict({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(convert.ConversionError, match="layer4.1.extra.weight"):
        convert.convert_state_dict({**state, "layer4.1.extra.weight": np.zeros(3, np.float32)})
    deeper = {**state, **{k.replace("layer3.1.", "layer3.2."): v for k, v in state.items()
                          if k.startswith("layer3.1.")}}
    with pytest.raises(convert.ConversionError, match=r"BasicBlocks \[2, 2, 3, 2\]"):
        convert.convert_state_dict(deeper)
    with pytest.raises(convert.ConversionError, match="resnet18.*--arch imagenet_resnet34"):
        convert.convert_state_dict(state, arch="imagenet_resnet34")
    with pytest.raises(convert.ConversionError, match="layer1.0.conv1.weight"):
        convert.convert_state_dict({**state, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))})
