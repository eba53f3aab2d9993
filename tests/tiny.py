"""A tiny CIFAR-shaped network and a learnable toy dataset, for fast engine tests.

``TinyNet`` has the interface of ``kd_jax.models`` (``train``, ``return_features`` with
``stem``/``stage1``/``stage2``/``pooled``) at a fraction of the compile and run time.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class TinyNet(nn.Module):
    num_classes: int = 10
    width: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,  # noqa: E731
                                       epsilon=1e-5, dtype=self.dtype, name=name)
        x = x.astype(self.dtype)
        stem = bn("bn0")(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x))
        h = nn.relu(stem)
        s1 = bn("bn1")(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(h))
        h = nn.relu(s1 + h)
        s2 = bn("bn2")(nn.Conv(2 * self.width, (3, 3), strides=2, use_bias=False,
                               dtype=self.dtype)(h))
        h = nn.relu(s2)
        pooled = jnp.mean(h, axis=(1, 2)).astype(jnp.float32)
        logits = nn.Dense(self.num_classes)(pooled).astype(jnp.float32)
        if return_features:
            return logits, {"stem": stem, "stage1": s1, "stage2": s2, "pooled": pooled}
        return logits


def toy_data(n=64, num_classes=10, seed=0):
    """Images whose class sets the colour: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    colours = rng.integers(40, 216, (num_classes, 3))
    noise = rng.integers(-40, 40, (n, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels
