"""Spec strings: parsing, canonical form, presets, and errors at parse time."""

import pytest

from quada.approx import (
    ComposedConfig,
    LayerSelection,
    NoiseConfig,
    SmoothQuantConfig,
    TealConfig,
    as_spec,
    list_specs,
    parse_spec,
    parse_technique,
    spec_label,
)
from quada.errors import QuadaError, QuadaWarning

CANONICAL = [
    "noise:site=up,dist=gaussian,std=0.075,layers=0:4",
    "noise:site=down,dist=laplace,scale=0.049",
    "noise:site=norm_all,dist=truncated,threshold=0.04,layers=[0,2,5]",
    "noise:site=act,dist=gaussian,std=0.01,layers=-4:",
    "teal:sparsity=0.5",
    "cats:sparsity=0.7,layers=3",
    "smoothquant:bits=4,alpha=0.8",
    "smoothquant:weight_bits=8",
    "omniquant:bits=4,steps=5",
    "bolt",
    "bolt:frac_bits=none",
    "bumblebee:frac_bits=10",
    "bumblebee2",
    "nexus",
    "puma",
    "iron:frac_bits=8",
    "bolt + teal:sparsity=0.25 + smoothquant",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_strings_round_trip(text):
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec


def test_spec_strings_build_the_typed_configs():
    assert parse_spec("noise:site=up,dist=gaussian,std=0.075,layers=0:4") == NoiseConfig(
        site="up", dist="gaussian", std=0.075, layers=range(0, 4)
    )
    assert parse_spec("teal:sparsity=0.5") == TealConfig(sparsity=0.5)
    assert parse_spec(" smoothquant : bits = 4 , alpha = 0.8 ") == SmoothQuantConfig(bits=4, alpha=0.8)
    # Defaults are left out of the canonical form, so equal configs have one key.
    assert str(parse_spec("smoothquant:bits=8,alpha=0.5")) == "smoothquant"
    assert str(SmoothQuantConfig(alpha=1)) == "smoothquant:alpha=1.0"


def test_lists_compose_and_flatten():
    spec = as_spec(["paper:bolt", TealConfig(sparsity=0.5)])
    assert isinstance(spec, ComposedConfig)
    assert [c.name for c in spec.parts()] == ["noise", "noise", "teal"]
    assert as_spec([TealConfig(sparsity=0.5)]) == TealConfig(sparsity=0.5)


TABLE_1 = {
    "iron": (0.064, 0.049),
    "bolt": (0.042, 0.036),
    "bumblebee": (0.026, 0.018),
    "nexus": (0.031, 0.014),
    "smoothquant-a8": (0.027, 0.019),
    "smoothquant-a4": (0.035, 0.024),
    "omniquant-a8": (0.029, 0.028),
    "omniquant-a4": (0.036, 0.037),
}
TEAL_ROWS = {"teal-10": (0.04, 0.003), "teal-25": (0.11, 0.007), "teal-50": (0.24, 0.017), "teal-90": (0.57, 0.055)}


@pytest.mark.parametrize("row", sorted(TABLE_1))
def test_paper_presets_carry_table_1_noise(row):
    up, down = parse_spec(f"paper:{row}").parts()
    assert (up.site, up.dist, up.std) == ("up", "gaussian", TABLE_1[row][0])
    assert (down.site, down.dist, down.scale) == ("down", "laplace", TABLE_1[row][1])


def test_tables_name_a_preset_by_its_name_and_anything_else_by_its_spec():
    assert spec_label(str(parse_spec("paper:bolt"))) == "paper:bolt"
    assert spec_label(str(parse_spec("paper:teal-50"))) == "paper:teal-50"
    noise = str(parse_spec("noise:site=up,dist=gaussian,std=0.1"))
    assert spec_label(noise) == noise
    assert spec_label("none") == "none"


@pytest.mark.parametrize("row", sorted(TEAL_ROWS))
def test_paper_teal_presets_zero_below_table_1_thresholds(row):
    up, down = parse_spec(f"paper:{row}").parts()
    assert (up.site, up.dist, up.threshold) == ("up", "truncated", TEAL_ROWS[row][0])
    assert (down.site, down.dist, down.threshold) == ("down", "truncated", TEAL_ROWS[row][1])


def test_list_specs_names_every_technique_and_preset_once():
    names = [name for name, _ in list_specs()]
    assert len(names) == len(set(names))
    expected = {"noise", "teal", "cats", "smoothquant", "omniquant", "bolt", "bumblebee", "bumblebee2", "nexus", "puma", "iron"}
    assert expected | {f"paper:{row}" for row in {**TABLE_1, **TEAL_ROWS}} == set(names)
    assert all(description and "\n" not in description for _, description in list_specs())
    for name in names:  # every listed name parses, with its required options where it has some
        parse_spec({"noise": "noise:site=up,dist=gaussian,std=0.1", "teal": "teal:sparsity=0.5", "cats": "cats:sparsity=0.5"}.get(name, name))


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("sparsify:level=3", "unknown approximation 'sparsify:level=3'"),
        ("paper:llama", "unknown approximation"),
        ("noise:site=up,dist=gaussian,std=-0.1", "non-negative"),
        ("noise:site=up,dist=laplace,scale=-1", "non-negative"),
        ("noise:site=middle,dist=gaussian,std=0.1", "unknown noise site"),
        ("noise:site=up,dist=uniform,std=0.1", "unknown noise dist"),
        ("noise:site=up,dist=laplace,std=0.1", "takes scale="),
        ("noise:site=up,dist=gaussian", "needs std="),
        ("noise:dist=gaussian,std=0.1", "needs the option(s) site"),
        ("teal:sparsity=1.0", "[0, 1)"),
        ("teal:sparsity=-0.1", "[0, 1)"),
        ("cats:sparsity=1.5", "[0, 1)"),
        ("teal", "teal:sparsity=0.5"),
        ("smoothquant:bits=1", "bits must be between 2 and 16"),
        ("omniquant:weight_bits=1", "weight_bits"),
        ("smoothquant:alpha=2", "alpha"),
        ("smoothquant:bits=four", "must be a finite int"),
        ("teal:sparsity=nan", "finite float"),
        ("teal:sparsity=0.5,speed=fast", "unknown option 'speed' for teal; valid options"),
        ("teal:sparsity=0.5,sparsity=0.2", "given twice"),
        ("teal:sparsity", "key=value"),
        ("bolt:frac_bits=0", "frac_bits"),
        ("iron:frac_bits=none", "fixed-point"),
        ("noise:site=up,dist=gaussian,std=0.1,layers=4:2", "empty layer slice"),
        ("noise:site=up,dist=gaussian,std=0.1,layers=a:b", "bad layer selection"),
        ("", "empty approximation spec"),
        ("noise:site=up,dist=gaussian,std=inf", "finite float"),
        ("+", "empty part around '+'"),
        ("noise:site=up,dist=gaussian,std=0.1+", "empty part around '+'"),
        ("bolt + + teal:sparsity=0.5", "empty part around '+'"),
    ],
)
def test_bad_specs_fail_at_parse_time_with_a_clear_message(text, fragment):
    with pytest.raises(QuadaError) as err:
        parse_spec(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize("layers", ["0:40", "[0,24]", "24", "-25:"])
def test_layers_out_of_range_fail_at_parse_time_given_the_depth(layers):
    text = f"noise:site=up,dist=gaussian,std=0.1,layers={layers}"
    parse_spec(text)  # the depth is unknown: only the syntax is checked
    with pytest.raises(QuadaError, match="out of range for a model with 24 decoder layers"):
        parse_spec(text, num_layers=24)


def test_layer_selections_resolve_like_python_slices():
    assert LayerSelection.parse("0:4").resolve(24) == (0, 1, 2, 3)
    assert LayerSelection.parse("-4:").resolve(24) == (20, 21, 22, 23)
    assert LayerSelection.parse("[5,1,-1]").resolve(24) == (1, 5, 23)
    assert LayerSelection.coerce(range(2, 5)).resolve(24) == (2, 3, 4)
    assert LayerSelection.coerce([3]) == LayerSelection.parse("3")
    with pytest.raises(QuadaError, match="cannot read"):
        LayerSelection.coerce(2.5)


def _magnitudes():
    """Floats over the whole finite range: fixed landmarks and seeded random draws."""
    import random
    import sys

    rng = random.Random(0)
    landmarks = [0.0, 1e-30, 2.5e-7, 0.075, 1.0, 123456.789, 1e15, 1e16, 1.5e16, 1e17, 1e100, 1e308,
                 sys.float_info.max, sys.float_info.min, 5e-324]
    return landmarks + [rng.uniform(1, 10) * 10.0 ** rng.randint(-30, 307) for _ in range(200)]


def test_any_finite_float_survives_its_canonical_form():
    for value in _magnitudes():
        spec = parse_spec(f"noise:site=up,dist=gaussian,std={value!r}")
        assert spec.std == value
        assert parse_spec(str(spec)) == spec, str(spec)
        composed = parse_spec(f"{spec} + teal:sparsity=0.5")
        assert parse_spec(str(composed)) == composed and len(composed.parts()) == 2


def test_an_exponent_sign_is_not_a_composition():
    assert parse_spec("noise:site=up,dist=gaussian,std=1e+16").std == 1e16
    assert parse_spec("noise:site=up,dist=gaussian,std=2.E+3 + teal:sparsity=0.5").parts()[0].std == 2000.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_configs_reject_non_finite_numbers(value):
    with pytest.raises(QuadaError, match="must be a finite number"):
        NoiseConfig(site="up", dist="gaussian", std=value)
    with pytest.raises(QuadaError, match="must be a finite number"):
        SmoothQuantConfig(alpha=value)


def test_two_polynomial_activations_cannot_share_a_layer():
    with pytest.raises(QuadaError) as err:
        parse_spec("bolt + iron", num_layers=4)
    assert "bolt and iron cannot be composed on layer 0" in str(err.value)
    assert "replaced only once" in str(err.value) and "neither SiLU nor GELU" not in str(err.value)
    with pytest.raises(QuadaError, match="cannot be composed on layer 2"):
        parse_spec("bolt:layers=0:3 + puma:layers=2:", num_layers=4)
    parse_spec("bolt:layers=0:2 + iron:layers=2:", num_layers=4)  # disjoint layers compose
    with pytest.warns(QuadaWarning, match="fixed order"):  # composed, with the order they apply in told
        parse_spec("bolt + teal:sparsity=0.5 + noise:site=up,dist=gaussian,std=0.1", num_layers=4)


def test_a_part_given_twice_is_refused_in_any_spelling():
    for text in ("paper:bolt + paper:bolt", "teal:sparsity=0.5+teal:sparsity=0.50", "paper:bolt + noise:site=up,dist=gaussian,std=0.042"):
        with pytest.raises(QuadaError, match="twice; give each part once"):
            parse_spec(text)
    with pytest.raises(QuadaError, match="applies teal:sparsity=0.5 twice"):
        as_spec(["teal:sparsity=0.5", "teal:sparsity=0.5"])
    parse_spec("teal:sparsity=0.5,layers=0:2 + teal:sparsity=0.5,layers=2:")  # other layers: two parts


def test_two_techniques_on_one_layer_are_told_the_fixed_order_they_apply_in(recwarn):
    with pytest.warns(QuadaWarning, match=r"teal:sparsity=0.5 \+ bolt: teal and bolt both change layer 0, .* module swaps "
                                          r"first, then the others as written, .*: here bolt, then teal:sparsity=0.5\."):
        parse_spec("teal:sparsity=0.5 + bolt", num_layers=4)
    for quiet in ("paper:bolt", "bolt:layers=0:2 + teal:sparsity=0.5,layers=2:"):  # one technique; disjoint layers
        parse_spec(quiet, num_layers=4)
    assert not [w for w in recwarn if issubclass(w.category, QuadaWarning)]


def test_a_technique_is_completed_once_then_derived_by_replacing_one_number():
    teal = parse_technique("teal:layers=0:2", "sparsity", 0.5)
    assert teal == parse_spec("teal:sparsity=0.5,layers=0:2")
    assert str(teal.with_option("sparsity", 0.25)) == "teal:sparsity=0.25,layers=0:2"
    bits = parse_spec("smoothquant").with_option("bits", 4.0).bits
    assert bits == 4 and isinstance(bits, int)  # a whole float sets an int option, as the text "4" would
    with pytest.raises(QuadaError, match="sparsity must be in"):
        teal.with_option("sparsity", 1.5)  # checked again like a parsed spec
    with pytest.raises(QuadaError, match="leave sparsity= out"):
        parse_technique("teal:sparsity=0.5", "sparsity", 0.5)
    with pytest.raises(QuadaError, match="unknown option 'strength' for teal"):
        parse_technique("teal", "strength", 0.5)
