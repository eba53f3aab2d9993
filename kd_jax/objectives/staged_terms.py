"""Terms and presets of the methods that need a capability beyond a weighted sum of terms:
a first stage (AB, FT, FSP: RepDistiller's ``init_epochs``), an inference head through the
teacher's classifier (SimKD) and a second, strongly augmented view (MLKD).

Each capability is declared, not special-cased: :class:`~kd_jax.objectives.Stage` for the
first stage, ``Objective.frozen`` for parameters that never train after it,
``register_term(predicts=True, head_from_teacher=...)`` for SimKD's head, and
``register_term(views=2)`` for MLKD's strong view.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.objectives.heads import _batch_norm, _pool_to, _torch_default
from kd_jax.objectives.library import cross_entropy
from kd_jax.objectives.more_terms import _stage_order
from kd_jax.objectives.presets import register_method
from kd_jax.objectives.terms import Objective, Stage, Term, TermInputs, register_term


def _common_stages(student_features, teacher_features) -> list[str]:
    return [k for k in _stage_order(student_features) if k in teacher_features]


def _last_stage(features) -> str:
    return _stage_order(features)[-1]


def _leaky(x):
    return nn.leaky_relu(x, 0.1)


# ------------------------------------------------------------------ AB (first stage)

class ABConnectors(nn.Module):
    """AB's connector per stage (RepDistiller's ``Connector`` of ``ConvReg`` without ReLU):
    nothing where the student's pre-ReLU map has the teacher's shape, else a convolution and
    BatchNorm: 3×3 with stride 2 and padding 1 for a map twice the teacher's size, a 4×4
    transposed convolution with stride 2 and padding 1 for one half its size, and a valid
    ``(1 + H_s - H_t) × (1 + W_s - W_t)`` convolution for one at least as large (1×1 for
    equal sizes). PyTorch's default initialisation."""

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        out = {}
        for k in _common_stages(student_features, teacher_features):
            s, t = student_features[k].astype(jnp.float32), teacher_features[k]
            if s.shape[1:] == t.shape[1:]:
                out[k] = s
                continue
            (sh, sw), (th, tw) = s.shape[1:3], t.shape[1:3]
            if sh == 2 * th:
                y = nn.Conv(t.shape[-1], (3, 3), strides=2, padding=((1, 1), (1, 1)),
                            kernel_init=_torch_default, name=f"{k}_conv")(s)
            elif 2 * sh == th:
                # PyTorch's ConvTranspose2d(4, stride 2, padding 1): 4 - 1 - 1 = 2 on each side
                # of the dilated input; its default init's fan is the output channels' (×16).
                y = nn.ConvTranspose(t.shape[-1], (4, 4), strides=(2, 2),
                                     padding=((2, 2), (2, 2)), name=f"{k}_conv",
                                     kernel_init=nn.initializers.variance_scaling(
                                         1 / 3, "fan_out", "uniform"))(s)
            elif sh >= th and sw >= tw:
                y = nn.Conv(t.shape[-1], (1 + sh - th, 1 + sw - tw), padding="VALID",
                            kernel_init=_torch_default, name=f"{k}_conv")(s)
            else:
                raise ValueError(f"AB at {k}: no connector from the student's {(sh, sw)} map "
                                 f"to the teacher's {(th, tw)} (as RepDistiller's ConvReg: a "
                                 "map twice, half or at least the teacher's size).")
            if y.shape[1:3] != t.shape[1:3]:
                raise ValueError(f"AB at {k}: the connector maps the student's {(sh, sw)} map "
                                 f"to {y.shape[1:3]}, not the teacher's {(th, tw)}.")
            out[k] = _batch_norm(train, f"{k}_bn")(y)
        return out


def _ab(x: TermInputs, *, margin):
    # RepDistiller's ABLoss: stage i of n weighted 2^(i-n+1), the batch mean times 3/1000,
    # on the pre-ReLU maps of both models.
    keys = _common_stages(x.raw_student_features, x.raw_teacher_features)
    n = len(keys)
    total = 0.0
    for i, k in enumerate(keys):
        part = losses.ab_loss(x.head[k], jax.lax.stop_gradient(x.raw_teacher_features[k]),
                              margin=margin).mean()
        total = total + 2.0 ** (i - n + 1) * part * 3 / 1000
    return total


register_term("ab", _ab, uses=("teacher", "features"), defaults={"margin": 1.0},
              checks={"margin": "positive"}, head=lambda **_: ABConnectors(),
              head_inputs="pre_relu")


# ------------------------------------------------------------------ FSP (first stage)

def _fsp(x: TermInputs):
    keys = ["stem"] + _common_stages(x.student_features, x.teacher_features)
    return losses.fsp_loss([x.student_features[k] for k in keys],
                           [jax.lax.stop_gradient(x.teacher_features[k]) for k in keys]).mean()


register_term("fsp", _fsp, uses=("teacher", "features"))


# ------------------------------------------------------------------ FT (first stage)

def _convs(x, widths, train, *, bn: bool, transpose: bool = False, prefix: str = "conv"):
    for i, width in enumerate(widths):
        layer = nn.ConvTranspose if transpose else nn.Conv
        x = layer(width, (3, 3), padding="SAME", kernel_init=_torch_default,
                  name=f"{prefix}{i}")(x)
        if bn:
            x = _batch_norm(train, f"{prefix}{i}_bn")(x)
        x = _leaky(x)
    return x


class Paraphraser(nn.Module):
    """FT's paraphraser of the teacher's last stage map (RepDistiller's ``Paraphraser``,
    no BatchNorm): an encoder of three 3×3 convolutions to ``rate`` × the channels (the
    factor) and a decoder of three transposed ones back, each with LeakyReLU(0.1)."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        t = teacher_features[_last_stage(teacher_features)].astype(jnp.float32)
        c, k = t.shape[-1], int(t.shape[-1] * self.rate)
        factor = _convs(t, (c, k, k), train, bn=False, prefix="encoder")
        rebuilt = _convs(factor, (k, c, c), train, bn=False, transpose=True, prefix="decoder")
        return {"factor": factor, "reconstruction": rebuilt}


class Translator(nn.Module):
    """FT's translator of the student's last stage map (RepDistiller's ``Translator``):
    three 3×3 convolutions with BatchNorm and LeakyReLU(0.1) to ``rate`` × the teacher's
    channels."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        s = student_features[_last_stage(student_features)].astype(jnp.float32)
        k = int(teacher_features[_last_stage(teacher_features)].shape[-1] * self.rate)
        return {"factor": _convs(s, (s.shape[-1], k, k), train, bn=True)}


def _ft_paraphraser(x: TermInputs):
    t = x.teacher_features[_last_stage(x.teacher_features)]
    return losses.hint_loss(x.head["reconstruction"], jax.lax.stop_gradient(t)).mean()


def _ft(x: TermInputs, *, p, channel_power):
    s = x.head["factor"]
    t = jax.lax.stop_gradient(x.heads["ft_paraphraser"]["factor"])
    if s.shape[1] > t.shape[1]:
        s = _pool_to(s, t.shape[1:3])
    elif t.shape[1] > s.shape[1]:
        t = _pool_to(t, s.shape[1:3])
    return losses.factor_transfer_loss(s, t, p=p, channel_power=channel_power).mean()


register_term("ft_paraphraser", _ft_paraphraser, uses=("teacher", "features"),
              head=lambda **_: Paraphraser())
register_term("ft", _ft, uses=("teacher", "features"), defaults={"p": 1.0, "channel_power": 2.0},
              checks={"p": "positive", "channel_power": "positive"},
              head=lambda **_: Translator())


# ------------------------------------------------------------------ SimKD (inference head)

class SimKDHead(nn.Module):
    """SimKD's projector and the teacher's classifier (Chen et al. 2022): the student's last
    stage map, pooled to the teacher's size if larger, through 1×1 (to half the teacher's
    channels), 3×3 and 1×1 (to the teacher's channels) convolutions without bias, each with
    BatchNorm and ReLU; ``"logits"`` are the ``classifier`` on its global average. The
    classifier is a copy of the teacher's (set at set-up, frozen): the student as deployed."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, student_features, teacher_features, train: bool = False):
        s = student_features[_last_stage(student_features)].astype(jnp.float32)
        t = teacher_features[_last_stage(teacher_features)]
        if s.shape[1] > t.shape[1]:
            s = _pool_to(s, t.shape[1:3])
        c = t.shape[-1]
        x = s
        for i, (width, size) in enumerate(((c // 2, 1), (c // 2, 3), (c, 1))):
            # PyTorch's default Conv2d init, as the authors' projector has (no init of its own).
            x = nn.Conv(width, (size, size), padding="SAME", use_bias=False,
                        kernel_init=_torch_default, name=f"conv{i}")(x)
            x = nn.relu(_batch_norm(train, f"bn{i}")(x))
        logits = nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))
        return {"feature": x, "logits": logits}


def _simkd_from_teacher(head_params, teacher_variables):
    source = teacher_variables["params"].get("classifier")
    own = head_params["classifier"]
    if source is None or jax.tree.map(jnp.shape, dict(source)) != jax.tree.map(jnp.shape,
                                                                                dict(own)):
        raise ValueError("SimKD reuses the teacher's classifier: the teacher needs a "
                         "'classifier' layer taking its last stage's channels, with the "
                         "student's classes.")
    # A copy: the student's state is donated to its step, the teacher's variables are not.
    return {**head_params, "classifier": jax.tree.map(lambda x: jnp.array(x, copy=True),
                                                      dict(source))}


def _simkd(x: TermInputs):
    t = x.teacher_features[_last_stage(x.teacher_features)]
    s = x.head["feature"]
    if t.shape[1] > s.shape[1]:
        t = _pool_to(t, s.shape[1:3])
    return losses.simkd_loss(s, jax.lax.stop_gradient(t)).mean()


register_term("simkd", _simkd, uses=("teacher", "features"),
              head=lambda *, num_classes=10, **_: SimKDHead(num_classes),
              predicts=True, head_from_teacher=_simkd_from_teacher)


# ------------------------------------------------------------------ MLKD (a second view)

def _below_median(values):
    """The fraction of ``values`` at most their median (NumPy's linear percentile 50)."""
    return jnp.mean(values <= jnp.percentile(values, 50.0))


def _mlkd(x: TermInputs, *, temperature):
    # The authors' KD_ours on the weak view (the batch) and the strong view (x.views[0]).
    # Their masks multiply already-reduced losses, so each weak-view term is scaled by the
    # fraction of examples (classes, for the class term) whose teacher confidence is at most
    # the median; the strong view's T = 2, 6 instance terms read the weak view's logits.
    (s_strong, t_strong), = x.views
    s_weak, t_weak = x.student_logits, jax.lax.stop_gradient(x.teacher_logits)
    t_strong = jax.lax.stop_gradient(t_strong)
    prob = jax.nn.softmax(t_weak.astype(jnp.float32), axis=-1)
    m_b = jax.lax.stop_gradient(_below_median(jnp.max(prob, axis=-1)))
    m_c = jax.lax.stop_gradient(_below_median(jnp.sum(prob, axis=0)))
    temps = (temperature, 3.0, 5.0, 2.0, 6.0)
    weak = (losses.mlkd_loss(s_weak, t_weak, temperatures=temps, instance_weight=1.0,
                             batch_weight=1.0, class_weight=0.0) * m_b
            + losses.mlkd_loss(s_weak, t_weak, temperatures=temps, instance_weight=0.0,
                               batch_weight=0.0, class_weight=1.0) * m_c)
    strong = (losses.mlkd_loss(s_strong, t_strong, temperatures=(temperature, 3.0, 5.0),
                               instance_weight=1.0, batch_weight=0.0, class_weight=0.0)
              + losses.mlkd_loss(s_weak, t_weak, temperatures=(2.0, 6.0), instance_weight=1.0,
                                 batch_weight=0.0, class_weight=0.0))
    return weak + strong


def _ce_views(x: TermInputs):
    return sum(cross_entropy(s, x.labels).mean() for s, _ in x.views)


register_term("mlkd", _mlkd, uses=("teacher",), defaults={"temperature": 4.0},
              checks={"temperature": "positive"}, shorthands=("temperature",), views=2)
register_term("ce_views", _ce_views, uses=(), views=2)


# ------------------------------------------------------------------ presets

T = Term.of
# RepDistiller (train_student.py, scripts/run_cifar_distill.sh -a 0 -b 1): 30 epochs of AB
# training the connectors and the student's feature layers, then the cross-entropy alone.
register_method("ab", Objective((T("ce"),), stage=Stage(30.0, (T("ab", margin=1.0),),
                                                        trains=("backbone", "head_ab"))))
# RepDistiller (-a 0 -b 200): 30 epochs training the paraphraser alone to rebuild the
# teacher's last map (MSE, lr 0.01 for the CIFAR ResNets and WRNs: 0.2 x 0.05), then CE +
# 200 x FT through the translator, the paraphraser frozen; factors p1 = 2, p2 = 1.
register_method("ft", Objective((T("ce"), T("ft", 200.0, p=1.0, channel_power=2.0)),
                                stage=Stage(30.0, (T("ft_paraphraser"),),
                                            trains=("head_ft_paraphraser",), lr_factor=0.2),
                                frozen=("head_ft_paraphraser",)))
# RepDistiller (-a 0): 30 epochs training the student's feature layers on FSP (stem and
# stage maps after their ReLU), then the cross-entropy alone.
register_method("fsp", Objective((T("ce"),), stage=Stage(30.0, (T("fsp"),),
                                                         trains=("backbone",))))
# SimKD (run_distill.sh -c 0 -d 0 -b 1): the feature loss alone; the deployed student is the
# backbone, the projector and the teacher's (frozen) classifier.
register_method("simkd", Objective((T("simkd"),), frozen=("head_simkd/classifier",)))
# MLKD (configs/cifar100/ours: CE 0.1, KD 0.9, T = 4): CE on both views, the multi-level
# terms on the weak and strong (RandAugment) views.
register_method("mlkd", Objective((T("ce", 0.1), T("ce_views", 0.1),
                                   T("mlkd", 0.9, temperature=4.0))))
del T

