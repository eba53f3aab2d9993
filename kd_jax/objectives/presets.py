"""The experiment's ``--method`` presets, :func:`from_method` and :func:`resolve`.

:data:`METHODS` follow the CRD benchmark (Tian et al. 2020, RepDistiller
``scripts/run_cifar_distill.sh``), mdistiller's CIFAR configs (DKD, ReviewKD) and each
paper's CIFAR setting; every one adds its term to the cross-entropy with the labels:

============  ==================================================================
``none``      CE (the baseline student)
``kd``        0.1·CE + 0.9·T²·KL, T=4 (Hinton et al. 2015)
``dkd``       CE + min(epoch/20, 1)·(α·TCKD + β·NCKD), α=1, β=8, T=4 (Zhao et al. 2022)
``dist``      CE + DIST(β=1, γ=1, T=4) (Huang et al. 2022)
``lskd``      0.1·CE + 9·KD on standardised logits, T=2 (Sun et al. 2024)
``fitnet``    CE + 100·hint at ``stage2`` through ConvReg (Romero et al. 2015)
``at``        CE + 1000·Σ_stages AT, p=2 (Zagoruyko & Komodakis 2017)
``nst``       CE + 50·Σ_stages NST (Huang & Wang 2017)
``sp``        CE + 3000·SP on the pooled embedding (Tung & Mori 2019)
``rkd``       CE + RKD (distance 25, angle 50) on the pooled embedding (Park et al. 2019)
``pkt``       CE + 30000·PKT on the pooled embedding (Passalis & Tefas 2018)
``vid``       CE + Σ_stages VID, regressors and per-channel variances (Ahn et al. 2019)
``cc``        CE + 100·CC, RBF kernel (γ=0.4, order 2) on the pooled embedding (Peng et al. 2019)
``crd``       CE + 0.8·CRD, 128-d heads, 16,384 negatives, T=0.07 (Tian et al. 2020)
``reviewkd``  CE + min(epoch/20, 1)·HCL through ABF fusion (Chen et al. 2021)
``kdsvd``     CE + KDSVD(k=1) over the stages (Lee et al. 2018; mdistiller, in ``more_terms``)
``ctkd``      0.1·CE + 0.9·KD at a learned T = 1 + 20·σ(θ), reversed gradient (Li et al. 2023)
``dot``       0.1·CE + 0.9·KD (T=4), DOT: momenta 0.9 ∓ 0.075 for CE's and KD's gradients
              (Zhao et al. 2023; mdistiller)
``ofd``       CE + 0.001·Σ_i 2^-(n-1-i)·partial L2 of 1×1 connectors on the pre-ReLU stage
              maps, margins from the teacher's BatchNorm (Heo et al. 2019; mdistiller)
``ab``        first stage (30 epochs): AB on the pre-ReLU maps; then CE (Heo et al. 2019)
``ft``        first stage: the paraphraser; then CE + 200·FT (Kim et al. 2018)
``fsp``       first stage: FSP on the feature layers; then CE (Yim et al. 2017)
``simkd``     SimKD's feature loss; predicts through the teacher's classifier (Chen et al. 2022)
``mlkd``      0.1·CE (both views) + 0.9·MLKD on a weak and a strong view (Jin et al. 2023)
============  ==================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kd_jax.objectives import library  # noqa: F401  (registers the terms the presets use)
from kd_jax.objectives.terms import Objective, Term, parse_override

def _preset(*terms: Term) -> Objective:
    return Objective(terms=terms)


T = Term.of
METHODS: dict[str, Objective] = {
    "none": _preset(T("ce")),
    "kd": _preset(T("ce", 0.1), T("kd", 0.9, temperature=4.0)),
    "dkd": _preset(T("ce"), T("dkd", warmup_epochs=20.0, alpha=1.0, beta=8.0, temperature=4.0)),
    "dist": _preset(T("ce"), T("dist", beta=1.0, gamma=1.0, temperature=4.0)),
    "lskd": _preset(T("ce", 0.1), T("lskd", 9.0, temperature=2.0)),
    "fitnet": _preset(T("ce"), T("fitnet", 100.0)),
    "at": _preset(T("ce"), T("at", 1000.0)),
    "nst": _preset(T("ce"), T("nst", 50.0)),
    "sp": _preset(T("ce"), T("sp", 3000.0)),
    "rkd": _preset(T("ce"), T("rkd", 1.0)),
    "pkt": _preset(T("ce"), T("pkt", 30000.0)),
    "vid": _preset(T("ce"), T("vid", 1.0)),
    "cc": _preset(T("ce"), T("cc", 100.0)),
    "crd": _preset(T("ce"), T("crd", 0.8)),
    "reviewkd": _preset(T("ce"), T("reviewkd", 1.0, warmup_epochs=20.0)),
}
del T


def register_method(name: str, objective: Objective, *, replace: bool = False) -> None:
    """Adds ``objective`` to :data:`METHODS` as ``name`` (the experiment's ``--method``)."""
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} exists; pass replace=True.")
    METHODS[name] = objective


def from_method(method: str, *overrides: str) -> Objective:
    """The preset ``method`` of :data:`METHODS` with ``"term.key=value"`` overrides."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    return METHODS[method].override(*overrides)



def resolve(method: str, *, epochs: float, temperature: float | None = None,
            alpha: float | None = None, terms: Sequence[str] = (),
            reference_epochs: float = 240) -> Objective:
    """The objective of preset ``method`` (:data:`METHODS`) for a run of ``epochs`` epochs, with
    the experiment's shorthands (``--temperature``, ``--alpha``, ``--term``), in this order:

    - ``temperature``, if given, replaces the temperature of every term that declares it a
      shorthand (``register_term(shorthands=("temperature",))``): the logit terms KD, DKD,
      DIST and LSKD, not CRD's contrastive temperature (0.07);
    - ``alpha``, if given, is KD's weight and CE's becomes ``1 - alpha`` (method ``"kd"``
      only; the others keep their weights);
    - each warm-up of ``w`` epochs becomes ``min(w, w · epochs / reference_epochs)``: the
      presets' warm-ups are mdistiller's 20 of 240 epochs, which keep their share of a
      shorter run (2 epochs: 1/6 of an epoch) and are not lengthened in a longer one; so
      does each argument a term declares an epoch count
      (``register_term(epoch_arguments=...)``: CTKD's ``lambda_epochs``, 10 of 240);
    - a first stage of ``e`` epochs (AB, FT, FSP: RepDistiller's 30) becomes
      ``min(e, e · epochs / reference_epochs)`` likewise;
    - the ``"term.key=value"`` overrides of ``terms`` (:meth:`Objective.override`) that name
      a term of this method, in order; the others are skipped, so that one list serves
      several methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if not epochs > 0 or not reference_epochs > 0:
        raise ValueError(f"epochs and reference_epochs must be > 0, got {epochs} and "
                         f"{reference_epochs}.")
    obj = METHODS[method]
    names = {t.name for t in obj.all_terms}
    if temperature is not None:
        for t in obj.terms:
            if "temperature" in t.spec.shorthands:
                obj = obj.replace_term(t.name, temperature=temperature)
    if alpha is not None and method == "kd":
        obj = obj.replace_term("ce", weight=1.0 - alpha)
        obj = obj.replace_term("kd", weight=alpha)
    if obj.stage is not None:
        e = obj.stage.epochs
        obj = dataclasses.replace(obj, stage=dataclasses.replace(
            obj.stage, epochs=min(e, e * epochs / reference_epochs)))
    for t in obj.terms:
        if t.warmup_epochs > 0:
            obj = obj.replace_term(t.name, warmup_epochs=min(
                t.warmup_epochs, t.warmup_epochs * epochs / reference_epochs))
        for key in sorted(t.spec.epoch_arguments):
            value = t.arguments[key]
            obj = obj.replace_term(t.name, **{key: min(value, value * epochs / reference_epochs)})
    return obj.override(*[a for a in terms if parse_override(a)[0] in names])
