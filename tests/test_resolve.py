"""A preset resolved for a run (kd_jax.objectives.resolve) and the per-term declarations it and
the argument checks read (register_term's shorthands= and checks=).

resolve is compared with the experiment's earlier student_objective (copied below) over every
preset and a grid of settings: the objectives, hence the runs' results, must be identical.
"""

import dataclasses
import itertools
import types

import pytest

from kd_jax import objectives
from kd_jax.objectives import METHODS, Objective, Term


@pytest.fixture
def clean_registry():
    """Restores the term registry and METHODS after a test that registers its own."""
    registry, methods = dict(objectives.terms._REGISTRY), dict(objectives.METHODS)
    yield
    objectives.terms._REGISTRY.clear()
    objectives.terms._REGISTRY.update(registry)
    objectives.METHODS.clear()
    objectives.METHODS.update(methods)


def _student_objective(method, c):
    """experiments/cifar_kd.py's student_objective before resolve (the reference)."""
    obj = objectives.METHODS[method]
    names = {t.name for t in obj.all_terms}
    if obj.stage is not None:  # issue 24: a first stage keeps its share, as the warm-ups
        e = obj.stage.epochs
        obj = dataclasses.replace(obj, stage=dataclasses.replace(
            obj.stage, epochs=min(e, e * c.schedule.epochs / 240)))
    if c.objective.temperature is not None:
        for name in ("kd", "dkd", "dist", "lskd", "mlkd"):
            if name in names:
                obj = obj.replace_term(name, temperature=c.objective.temperature)
    if c.objective.alpha is not None and method == "kd":
        obj = obj.replace_term("ce", weight=1.0 - c.objective.alpha)
        obj = obj.replace_term("kd", weight=c.objective.alpha)
    for t in obj.terms:
        if t.warmup_epochs > 0:
            obj = obj.replace_term(t.name, warmup_epochs=min(
                t.warmup_epochs, t.warmup_epochs * c.schedule.epochs / 240))
        if t.name == "ctkd":  # issue 24: CTKD's curriculum keeps its share, as the warm-ups
            e = t.arguments["lambda_epochs"]
            obj = obj.replace_term(t.name, lambda_epochs=min(e, e * c.schedule.epochs / 240))
    mine = [a for a in c.objective.terms if objectives.parse_override(a)[0] in names]
    return obj.override(*mine)


def _config(epochs, temperature, alpha, terms):
    return types.SimpleNamespace(
        schedule=types.SimpleNamespace(epochs=epochs),
        objective=types.SimpleNamespace(temperature=temperature, alpha=alpha, terms=terms))


OVERRIDES = [(), ("kd.temperature=5", "crd.num_negatives=32", "ce.weight=0.3"),
             ("dkd.warmup_epochs=1", "reviewkd.weight=2", "fitnet.stage='stage1'")]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resolve_equals_the_experiments_earlier_student_objective(method):
    for epochs, temperature, alpha, terms in itertools.product(
            (1, 2, 7, 240, 300), (None, 2.0, 8), (None, 0.3), OVERRIDES):
        expected = _student_objective(method, _config(epochs, temperature, alpha, terms))
        got = objectives.resolve(method, epochs=epochs, temperature=temperature, alpha=alpha,
                                 terms=terms)
        where = (method, epochs, temperature, alpha, terms)
        assert got == expected, where
        assert got.as_dict() == expected.as_dict(), where  # the recorded JSON too


@pytest.mark.parametrize("method", ["dkd", "reviewkd"])
def test_warmup_keeps_mdistillers_share_of_240_epochs(method):
    short = objectives.resolve(method, epochs=2)
    assert short.term(method).warmup_epochs == 20.0 * 2 / 240  # 1/6 of an epoch
    assert short.term("ce").warmup_epochs == 0.0
    assert objectives.resolve(method, epochs=240).term(method).warmup_epochs == 20.0
    assert objectives.resolve(method, epochs=1000).term(method).warmup_epochs == 20.0  # not longer
    assert objectives.resolve(method, epochs=24, reference_epochs=48) \
        .term(method).warmup_epochs == 10.0
    # An override comes after the scaling: it is the run's warm-up as written.
    assert objectives.resolve(method, epochs=2, terms=(f"{method}.warmup_epochs=1",)) \
        .term(method).warmup_epochs == 1.0


def test_temperature_shorthand_sets_the_logit_terms_not_crds():
    for method, term in (("kd", "kd"), ("dkd", "dkd"), ("dist", "dist"), ("lskd", "lskd")):
        obj = objectives.resolve(method, epochs=240, temperature=3.0)
        assert obj.term(term).arguments["temperature"] == 3.0, method
    crd = objectives.resolve("crd", epochs=240, temperature=3.0)
    assert crd == METHODS["crd"] and crd.term("crd").arguments["temperature"] == 0.07
    assert objectives.resolve("at", epochs=240, temperature=3.0) == METHODS["at"]
    # An explicit override wins over the shorthand.
    obj = objectives.resolve("kd", epochs=240, temperature=3.0, terms=("kd.temperature=5",))
    assert obj.term("kd").arguments["temperature"] == 5.0


def test_temperature_shorthand_follows_each_terms_declaration(clean_registry):
    # A method mixing a logit term and CRD: only the logit term's temperature changes.
    objectives.register_method("kd_crd", Objective((Term.of("ce"), Term.of("kd", 0.9),
                                                    Term.of("crd", 0.8))))
    obj = objectives.resolve("kd_crd", epochs=240, temperature=2.0)
    assert obj.term("kd").arguments["temperature"] == 2.0
    assert obj.term("crd").arguments["temperature"] == 0.07

    # User terms: with shorthands=("temperature",) the shorthand reaches them, without not.
    def fn(x, *, temperature):
        return 0.0

    objectives.register_term("test_logit_t", fn, defaults={"temperature": 1.0},
                             shorthands=("temperature",))
    objectives.register_term("test_other_t", fn, defaults={"temperature": 1.0})
    objectives.register_method("test_t", Objective((Term.of("test_logit_t"),
                                                    Term.of("test_other_t"))))
    obj = objectives.resolve("test_t", epochs=240, temperature=2.0)
    assert obj.term("test_logit_t").arguments == {"temperature": 2.0}
    assert obj.term("test_other_t").arguments == {"temperature": 1.0}


def test_alpha_is_kds_weight_for_kd_only():
    obj = objectives.resolve("kd", epochs=240, alpha=0.3)
    assert obj.term("kd").weight == 0.3 and obj.term("ce").weight == 1.0 - 0.3
    for method in ("lskd", "dkd", "none", "crd"):  # lskd also weights CE by 0.1: untouched
        assert objectives.resolve(method, epochs=240, alpha=0.3) == METHODS[method], method


def test_overrides_apply_only_to_methods_that_have_the_term():
    terms = ("kd.temperature=5", "crd.num_negatives=32")
    assert objectives.resolve("kd", epochs=240, terms=terms).term("kd").arguments == \
        {"temperature": 5.0}
    crd = objectives.resolve("crd", epochs=240, terms=terms).term("crd")
    assert crd.arguments["num_negatives"] == 32
    assert objectives.resolve("none", epochs=240, terms=terms) == METHODS["none"]
    assert objectives.resolve("dkd", epochs=240, terms=terms) == objectives.resolve("dkd",
                                                                                    epochs=240)
    # Those of the method's own terms are still checked.
    with pytest.raises(ValueError, match="temperature must be > 0"):
        objectives.resolve("kd", epochs=240, terms=("kd.temperature=0",))
    with pytest.raises(ValueError, match="TERM.KEY=VALUE"):
        objectives.resolve("kd", epochs=240, terms=("temperature=5",))


def test_resolve_leaves_the_presets_unchanged():
    before = dict(METHODS)
    objectives.resolve("kd", epochs=2, temperature=2.0, alpha=0.5, terms=("ce.weight=0.2",))
    objectives.resolve("dkd", epochs=2)
    assert METHODS == before


def test_unknown_method_and_bad_epochs_raise_naming_the_fix():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; choose from none, kd, dkd"):
        objectives.resolve("nope", epochs=2)
    with pytest.raises(ValueError, match="epochs and reference_epochs must be > 0"):
        objectives.resolve("dkd", epochs=0)


# ------------------------------------------------------------------ declared checks

# Today's constraints, each declared by its term: > 0 for these, [0, 1] for CRD's momentum.
POSITIVE = [("kd", "temperature"), ("dkd", "temperature"), ("dist", "gamma"),
            ("dist", "temperature"), ("lskd", "temperature"), ("at", "p"), ("vid", "init_var"),
            ("vid", "eps"), ("cc", "gamma"), ("crd", "dim"), ("crd", "num_negatives"),
            ("crd", "temperature"), ("reviewkd", "max_mid_channels"), ("kdsvd", "k"),
            ("ctkd", "temperature_min"), ("ctkd", "temperature_range"),
            ("ctkd", "lambda_epochs"), ("ab", "margin"), ("ft", "p"), ("ft", "channel_power"),
            ("mlkd", "temperature")]
NONNEGATIVE = [("dkd", "alpha"), ("dkd", "beta"), ("dist", "beta"), ("rkd", "distance_weight"),
               ("rkd", "angle_weight"), ("cc", "order"), ("ctkd", "lambda_min"),
               ("ctkd", "lambda_max")]


def _zero(name, key):
    return type(objectives.registered_terms()[name].defaults[key])(0)


@pytest.mark.parametrize("name, key", POSITIVE)
def test_declared_positive_arguments_reject_zero(name, key):
    with pytest.raises(ValueError, match=f"term '{name}': {key} must be > 0, got 0"):
        Term.of(name, **{key: _zero(name, key)})


@pytest.mark.parametrize("name, key", NONNEGATIVE)
def test_other_numeric_arguments_take_zero_and_reject_negatives(name, key):
    assert Term.of(name, **{key: _zero(name, key)}).arguments[key] == 0
    with pytest.raises(ValueError, match=f"term '{name}': {key} must be >= 0, got -1"):
        Term.of(name, **{key: _zero(name, key) - 1})


def test_every_numeric_argument_of_the_library_has_a_check():
    declared = {(n, k): c for n, s in objectives.registered_terms().items()
                for k, c in s.checks.items()}
    assert declared == {**{a: "positive" for a in POSITIVE}, **{a: "nonnegative" for a in
                                                                NONNEGATIVE},
                        ("crd", "momentum"): "unit"}
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got -0.1"):
        Term.of("crd", momentum=-0.1)
    assert Term.of("crd", momentum=1).arguments["momentum"] == 1.0


def test_a_user_term_without_checks_gets_the_fallback(clean_registry):
    def fn(x, *, scale, temperature, mode):
        return 0.0

    objectives.register_term("test_plain", fn, defaults={"scale": 1.0, "temperature": 1.0,
                                                         "mode": "a"}, replace=True)
    assert Term.of("test_plain", scale=0).arguments["scale"] == 0.0
    # No global table: a user term's "temperature" is not a library term's.
    assert Term.of("test_plain", temperature=0.0).arguments["temperature"] == 0.0
    for value, message in ((-1.0, "scale must be >= 0"), (float("nan"), "finite number"),
                           ("2", "finite number"), (True, "finite number")):
        with pytest.raises(ValueError, match=message):
            Term.of("test_plain", scale=value)
    with pytest.raises(ValueError, match="mode must be a str like its default 'a'"):
        Term.of("test_plain", mode=1)


def test_a_user_term_declares_its_own_checks(clean_registry):
    def fn(x, *, rate, size):
        return 0.0

    objectives.register_term("test_checked", fn, defaults={"rate": 0.5, "size": 3},
                             checks={"rate": "unit", "size": "positive"})
    with pytest.raises(ValueError, match=r"term 'test_checked': rate must be in \[0, 1\]"):
        Term.of("test_checked", rate=1.5)
    with pytest.raises(ValueError, match="size must be > 0"):
        Term.of("test_checked", size=0)
    with pytest.raises(ValueError, match="size must be an integer"):
        Term.of("test_checked", size=2.5)
    assert Term.of("test_checked", rate=1, size=1).arguments == {"rate": 1.0, "size": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"checks": {"nope": "positive"}}, "checks names 'nope'"),
    ({"checks": {"rate": "odd"}}, "the check of rate must be one of"),
    ({"checks": {"mode": "positive"}}, "checks apply to numeric arguments"),
    ({"checks": {"rate": "positive"}, "defaults": {"rate": 0.0, "mode": "a"}},
     "rate must be > 0, got 0.0"),
    ({"shorthands": ("alpha",)}, "shorthands must be arguments"),
    ({"shorthands": ("temperature",)}, "shorthands must be arguments"),  # it has none
])
def test_registration_mistakes_raise_before_registering(clean_registry, kwargs, message):
    kwargs = {"defaults": {"rate": 0.5, "mode": "a"}, **kwargs}
    with pytest.raises(ValueError, match=message):
        objectives.register_term("test_bad", lambda x, **_: 0.0, **kwargs)
    assert "test_bad" not in objectives.registered_terms()
