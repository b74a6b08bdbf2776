"""Offer filters: both input forms, the CLI grammar and conversions, errors, query, ranking."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from ponos_tasks.offers import (
    FIELD_ALIASES,
    OFFER_FIELDS,
    OfferFilterError,
    build_query,
    describe_filters,
    explain_offers,
    offer_matches,
    parse_filters,
    rank_offers,
)

# ------------------------------------------------------------------ the two forms

# What the vastai 1.9.1 CLI parser makes of these strings, adapted: operands typed instead of
# strings, and a wildcard kept as {} (removes the default) instead of the key disappearing.
REFERENCE_EXAMPLES = [
    (
        "gpu_name=RTX_4090 num_gpus=1 reliability>0.98 dph<0.5",
        {
            "gpu_name": {"eq": "RTX 4090"},
            "num_gpus": {"eq": 1},
            "reliability": {"gt": 0.98},
            "dph_total": {"lt": 0.5},
        },
    ),
    (
        "gpu_ram>=24 cpu_ram>16 duration>7 disk_space>=50",
        {
            "gpu_ram": {"gte": 24000},
            "cpu_ram": {"gt": 16000},
            "duration": {"gt": 604800},
            "disk_space": {"gte": 50},
        },
    ),
    (
        'gpu_name in ["RTX 4090", "RTX 3090"] geolocation notin [CN,VN]',
        {"gpu_name": {"in": ["RTX 4090", "RTX 3090"]}, "geolocation": {"notin": ["CN", "VN"]}},
    ),
    (
        "verified=any rented=False cuda_vers>=12.1 driver_version>=535.86.05",
        {
            "verified": {},
            "rented": {"eq": False},
            "cuda_max_good": {"gte": 12.1},
            "driver_version": {"gte": 535086005},
        },
    ),
]


@pytest.mark.parametrize(("text", "expected"), REFERENCE_EXAMPLES)
def test_reference_examples(text, expected):
    assert parse_filters(text) == expected


@pytest.mark.parametrize(("text", "expected"), REFERENCE_EXAMPLES)
def test_object_form_of_the_examples_is_its_own_normal_form(text, expected):
    assert parse_filters(expected) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"gpu_ram": {"gte": 24000}}, {"gpu_ram": {"gte": 24000}}),
        # No unit conversion in the object form: it is already in server units.
        ({"gpu_ram": {"gte": 24}}, {"gpu_ram": {"gte": 24}}),
        # String operands are coerced to the field's type.
        ({"gpu_ram": {"gte": "24000"}}, {"gpu_ram": {"gte": 24000}}),
        ({"reliability": {"gt": "0.98"}}, {"reliability": {"gt": 0.98}}),
        ({"verified": {"eq": "false"}}, {"verified": {"eq": False}}),
        ({"rentable": {"eq": 1}}, {"rentable": {"eq": True}}),
        # Shorthands: scalar means eq, list means in, wildcard string means any.
        ({"gpu_name": "RTX 4090"}, {"gpu_name": {"eq": "RTX 4090"}}),
        ({"gpu_name": ["RTX 4090", "A100 SXM4"]}, {"gpu_name": {"in": ["RTX 4090", "A100 SXM4"]}}),
        ({"verified": "any"}, {"verified": {}}),
        ({"verified": {"eq": "*"}}, {"verified": {}}),
        ({"verified": {}}, {"verified": {}}),
        # Operator spellings and aliases are accepted in the object form too.
        ({"dph": {"<=": 0.5}}, {"dph_total": {"lte": 0.5}}),
        ({"cuda_vers": {"not in": [11.8]}}, {"cuda_max_good": {"notin": [11.8]}}),
        ({"dph": {"lt": 1}, "dph_total": {"gt": 0.1}}, {"dph_total": {"lt": 1, "gt": 0.1}}),
        # Underscores are not touched in the object form (it is literal).
        ({"mobo_name": "X570_AORUS"}, {"mobo_name": {"eq": "X570_AORUS"}}),
        ({"driver_version": {"gte": "535.86.05"}}, {"driver_version": {"gte": 535086005}}),
        ({"geolocation": {"in": ["us", "de"]}}, {"geolocation": {"in": ["US", "DE"]}}),
        ({"external": None}, {"external": {"eq": None}}),
        ({"num_gpus": {"gte": 1, "lte": 8}}, {"num_gpus": {"gte": 1, "lte": 8}}),
        ({}, {}),
    ],
)
def test_object_form(spec, expected):
    assert parse_filters(spec) == expected


def test_empty_string_means_no_filters():
    assert parse_filters("   ") == {}
    assert parse_filters("") == {}


# ------------------------------------------------------------------ every operator


@pytest.mark.parametrize(
    ("spelling", "op"),
    [
        ("=", "eq"),
        ("==", "eq"),
        (" eq ", "eq"),
        ("!=", "neq"),
        (" neq ", "neq"),
        (" noteq ", "neq"),
        (" not eq ", "neq"),
        (">", "gt"),
        (" gt ", "gt"),
        (">=", "gte"),
        (" gte ", "gte"),
        ("<", "lt"),
        (" lt ", "lt"),
        ("<=", "lte"),
        (" lte ", "lte"),
        # spaces around symbolic operators are allowed, word operators are case-blind
        (" >= ", "gte"),
        (" GTE ", "gte"),
        (" not  eq ", "neq"),
    ],
)
def test_scalar_operator_spellings(spelling, op):
    assert parse_filters(f"reliability{spelling}0.9") == {"reliability": {op: 0.9}}


@pytest.mark.parametrize(
    ("spelling", "op"),
    [(" in ", "in"), (" notin ", "notin"), (" nin ", "notin"), (" not in ", "notin")],
)
@pytest.mark.parametrize(
    ("value", "items"),
    [
        ("[RTX_4090,RTX_3090]", ["RTX 4090", "RTX 3090"]),
        ('["RTX 4090", "RTX 3090"]', ["RTX 4090", "RTX 3090"]),
        ("RTX_4090,RTX_3090", ["RTX 4090", "RTX 3090"]),
        ("[RTX_4090]", ["RTX 4090"]),
        ("RTX_4090", ["RTX 4090"]),
        ("[ RTX_4090 , , RTX_3090, ]", ["RTX 4090", "RTX 3090"]),
    ],
)
def test_list_operator_spellings_and_list_syntax(spelling, op, value, items):
    assert parse_filters(f"gpu_name{spelling}{value}") == {"gpu_name": {op: items}}


def test_list_items_are_typed():
    assert parse_filters("compute_cap in [800,890] verified in [true,False]") == {
        "compute_cap": {"in": [800, 890]},
        "verified": {"in": [True, False]},
    }


def test_list_directly_after_word_operator():
    assert parse_filters("gpu_name in[A40,L40]") == {"gpu_name": {"in": ["A40", "L40"]}}


# ------------------------------------------------------------ aliases and conversions


@pytest.mark.parametrize(
    ("alias", "field", "value", "expected"),
    [
        ("cuda_vers", "cuda_max_good", "12.1", 12.1),
        ("display_active", "gpu_display_active", "false", False),
        ("dlperf_usd", "dlperf_per_dphtotal", "100", 100),
        ("dph", "dph_total", "0.5", 0.5),
        ("flops_usd", "flops_per_dphtotal", "55.5", 55.5),
        ("ubuntu_version", "os_version", "22.04", "22.04"),
    ],
)
def test_aliases(alias, field, value, expected):
    assert parse_filters(f"{alias}={value}") == {field: {"eq": expected}}
    assert set(FIELD_ALIASES) == {
        "cuda_vers",
        "display_active",
        "dlperf_usd",
        "dph",
        "flops_usd",
        "ubuntu_version",
    }


def test_alias_and_canonical_name_merge():
    assert parse_filters("dph>0.1 dph_total<0.9") == {"dph_total": {"gt": 0.1, "lt": 0.9}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu_ram>=24", {"gpu_ram": {"gte": 24000}}),
        ("gpu_ram>=24.576", {"gpu_ram": {"gte": 24576}}),
        ("duration>2.3", {"duration": {"gt": 198720}}),  # not 198719.99999999997
        ("cpu_ram<=0.5", {"cpu_ram": {"lte": 500}}),
        ("gpu_total_ram>80", {"gpu_total_ram": {"gt": 80000}}),
        ("duration>=2.5", {"duration": {"gte": 216000}}),
        ("gpu_ram in [16,24]", {"gpu_ram": {"in": [16000, 24000]}}),
        # fields without a multiplier keep the user's number
        ("disk_space>=50", {"disk_space": {"gte": 50}}),
        ("compute_cap>=890", {"compute_cap": {"gte": 890}}),
    ],
)
def test_unit_conversions(text, expected):
    parsed = parse_filters(text)
    assert parsed == expected
    # whole numbers come out as ints (24000, not 24000.0)
    for condition in parsed.values():
        for value in condition.values():
            for item in value if isinstance(value, list) else [value]:
                assert type(item) is int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("535.86.05", 535086005),
        ("550.54.15", 550054015),
        ("1.2.3", 1002003),
        ("535.86", 535086000),  # extension: patch 0
        ("535", 535000000),  # extension: a bare major version
        ("535086005", 535086005),  # already packed
    ],
)
def test_driver_version(value, expected):
    assert parse_filters(f"driver_version>={value}") == {"driver_version": {"gte": expected}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu_name=RTX_A6000", {"gpu_name": {"eq": "RTX A6000"}}),
        ('gpu_name="H100 SXM"', {"gpu_name": {"eq": "H100 SXM"}}),
        ('gpu_name="H100_SXM"', {"gpu_name": {"eq": "H100 SXM"}}),  # CLI: quotes too
        ("verified=true", {"verified": {"eq": True}}),
        ("verified=True", {"verified": {"eq": True}}),
        ("rentable=false", {"rentable": {"eq": False}}),
        ("static_ip=False", {"static_ip": {"eq": False}}),
        ("external=null", {"external": {"eq": None}}),
        ("external=None", {"external": {"eq": None}}),
        ("gpu_arch!=null", {"gpu_arch": {"neq": None}}),
        ("has_avx=true", {"has_avx": {"eq": 1}}),
        ("has_avx=0", {"has_avx": {"eq": 0}}),
        ("geolocation=us", {"geolocation": {"eq": "US"}}),
        ("num_gpus=[1]", {"num_gpus": {"eq": 1}}),  # CLI strips brackets from any value
        ('dph<"0.5"', {"dph_total": {"lt": 0.5}}),
        ("reliability>9e-1", {"reliability": {"gt": 0.9}}),
        ("os_version=22.04", {"os_version": {"eq": "22.04"}}),  # strings stay strings
        ("gpu_name=true", {"gpu_name": {"eq": "true"}}),
    ],
)
def test_value_processing(text, expected):
    assert parse_filters(text) == expected


def test_numbers_are_numbers_in_the_output():
    parsed = parse_filters("num_gpus=1 reliability>0.98 dph<1.0 disk_space>=50.0")
    assert type(parsed["num_gpus"]["eq"]) is int
    assert type(parsed["reliability"]["gt"]) is float
    assert parsed["dph_total"]["lt"] == 1 and type(parsed["dph_total"]["lt"]) is int
    assert type(parsed["disk_space"]["gte"]) is int


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_gpus>=1 num_gpus<=4", {"num_gpus": {"gte": 1, "lte": 4}}),
        ("dph<0.9 dph<0.5", {"dph_total": {"lt": 0.5}}),  # last one wins, as in the CLI
        ("verified=true verified=any", {"verified": {}}),
        ("verified=any verified=false", {"verified": {"eq": False}}),
        ("gpu_name=*", {"gpu_name": {}}),
        ("gpu_name=?", {"gpu_name": {}}),
        ('gpu_name="any"', {"gpu_name": {"eq": "any"}}),  # quoted: a literal, not a wildcard
    ],
)
def test_repeats_and_wildcards(text, expected):
    assert parse_filters(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "reliability > 0.98   dph<0.5",
        "  reliability>0.98 dph < 0.5  ",
        'reliability >0.98 dph<"0.5"',
    ],
)
def test_whitespace_is_free(text):
    assert parse_filters(text) == {"reliability": {"gt": 0.98}, "dph_total": {"lt": 0.5}}


# ------------------------------------------------------------------------ errors


def _error(spec) -> str:
    with pytest.raises(OfferFilterError) as caught:
        parse_filters(spec)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gpu_nme=RTX_4090", "unknown offer field 'gpu_nme' (did you mean 'gpu_name'"),
        ("reliabilty>0.9", "unknown offer field 'reliabilty' (did you mean 'reliability'"),
        ("cuda_ver>=12", "unknown offer field 'cuda_ver' (did you mean 'cuda_vers'"),
        ({"gpu_rma": {"gte": 1}}, "unknown offer field 'gpu_rma' (did you mean 'gpu_ram'"),
        ("zzz=1", "unknown offer field 'zzz'; known fields: bw_nvlink"),
        ("order=score", "'order' is not an offer filter"),
        ({"limit": 10}, "'limit' is not an offer filter"),
    ],
)
def test_unknown_field(spec, expected):
    assert expected in _error(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("dph=>0.5", "unknown operator '=>' for offer field 'dph' (did you mean '>='?)"),
        ("dph=<0.5", "unknown operator '=<' for offer field 'dph' (did you mean '<='?)"),
        ("dph<>0.5", "unknown operator '<>' for offer field 'dph' (did you mean '!='?)"),
        ("dph!0.5", "unknown operator '!' for offer field 'dph'"),
        ("gpu_name like RTX_4090", "unknown operator 'like' for offer field 'gpu_name'"),
        ("gpu_name nott [A40]", "unknown operator 'nott' for offer field 'gpu_name'"),
        ("dph:0.5", "unknown operator ':' after offer field 'dph'"),
        ({"dph": {"lessthan": 1}}, "unknown operator 'lessthan' for offer field 'dph'"),
        ({"dph": {"gtee": 1}}, "unknown operator 'gtee' for offer field 'dph' (did you mean"),
    ],
)
def test_unknown_operator(spec, expected):
    assert expected in _error(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("reliability>abc", "offer field 'reliability' needs a number, got 'abc'"),
        ("dph<nan", "offer field 'dph_total' needs a number, got 'nan'"),
        ("gpu_ram>=inf", "offer field 'gpu_ram' needs a number, got 'inf'"),
        ("num_gpus in [1,x]", "offer field 'num_gpus' needs a number, got 'x'"),
        ({"reliability": {"gt": True}}, "offer field 'reliability' needs a number, got True"),
        ("verified=yes", "offer field 'verified' needs true or false, got 'yes'"),
        ("geolocation=California", "offer field 'geolocation' compares 2-letter country codes"),
        ("geolocation in [US,USA]", "got 'USA'"),
        ("driver_version>=535.x", "offer field 'driver_version' needs a version like 535.86.05"),
        ("driver_version>=1.2.3.4", "needs a version like 535.86.05, got '1.2.3.4'"),
        ({"os_version": 22.04}, "offer field 'os_version' needs a string, got 22.04"),
        ({"gpu_name": {"in": "RTX 4090"}}, "'in' for offer field 'gpu_name' needs a list"),
        ({"gpu_name": {"notin": []}}, "empty list for offer field 'gpu_name'"),
        ({"gpu_name": {"eq": ["A40"]}}, "a list for offer field 'gpu_name' needs 'in' or 'notin'"),
        ("gpu_name in []", "empty list for offer field 'gpu_name'"),
        ("gpu_name=A40,L40", "several values (A40,L40) for offer field 'gpu_name' need 'in'"),
        ("verified>true", "operator '>' makes no sense for offer field 'verified'"),
        ("geolocation<=US", "operator '<=' makes no sense for offer field 'geolocation'"),
        ("has_avx>0", "operator '>' makes no sense for offer field 'has_avx'"),
        ("reliability>null", "null for offer field 'reliability' only makes sense with = or !="),
        ("gpu_name=[]", "missing value for offer field 'gpu_name'"),
        ("dph<", "missing value after dph< in 'dph<'"),
        (42, "offer filters must be a string or a mapping, not int"),
        ({1: {"eq": 1}}, "offer field names must be strings"),
    ],
)
def test_bad_values(spec, expected):
    assert expected in _error(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gpu_name>any", "wildcard for offer field 'gpu_name' only makes sense with '='"),
        ("verified!=*", "wildcard for offer field 'verified' only makes sense with '=' (got '!=')"),
        ({"verified": {"neq": "any"}}, "wildcard for offer field 'verified' only makes sense"),
    ],
)
def test_wildcard_misuse(spec, expected):
    assert expected in _error(spec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu_name=RTX 4090", "unconsumed text '4090' in offer filters 'gpu_name=RTX 4090'"),
        ("gpu_name=RTX 4090 dph<1", "Did you forget to quote a value with spaces?"),
        ("gpu_name=Tesla V100 num_gpus=1", "unconsumed text 'V100'"),
        ("dph<1 & reliability>0.9", "unconsumed text '& reliability>0.9' at position 6"),
        ("-dph<1", "unconsumed text '-dph<1' at position 0"),
        ('gpu_name="RTX 4090', "unterminated quoted value for offer field 'gpu_name'"),
        ("gpu_name in [RTX_4090, RTX_3090", "unterminated list for offer field 'gpu_name'"),
    ],
)
def test_syntax_errors(text, expected):
    assert expected in _error(text)


@pytest.mark.parametrize(
    "spec",
    [
        "num_gpus=2",
        "num_gpus>1",
        "num_gpus>=2",
        "num_gpus<1",
        "num_gpus!=1",
        "num_gpus in [2,4]",
        "num_gpus notin [1]",
        "num_gpus=null",
        {"num_gpus": {"gte": 1, "lte": 0}},
        {"num_gpus": 8},
    ],
)
def test_num_gpus_excluding_one_is_refused(spec):
    message = _error(spec)
    assert "excludes 1" in message and "exactly one GPU" in message


@pytest.mark.parametrize(
    "spec",
    [
        "num_gpus=1",
        "num_gpus>=1",
        "num_gpus<=8",
        "num_gpus in [1,2]",
        "num_gpus!=2",
        "num_gpus=any",
    ],
)
def test_num_gpus_admitting_one_is_accepted(spec):
    assert "num_gpus" in parse_filters(spec)


# ------------------------------------------------------------------ normal form


@pytest.mark.parametrize(
    "text",
    [text for text, _ in REFERENCE_EXAMPLES]
    + [
        "gpu_ram>=24.576 duration>0.0115 gpu_total_ram<=640",
        'gpu_name notin ["RTX 3060", A40] external=null has_avx=1 static_ip!=false',
        "driver_version in [535.86.05,550] geolocation=de os_version=22.04",
        "verified=any rentable=any",
    ],
)
def test_describe_round_trips_and_parse_is_idempotent(text):
    parsed = parse_filters(text)
    assert parse_filters(parsed) == parsed
    assert parse_filters(describe_filters(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "gpu_name=RTX_4090 num_gpus=1 reliability>0.98 dph<0.5",
            "gpu_name=RTX_4090 num_gpus=1 reliability>0.98 dph_total<0.5",
        ),
        ({"gpu_ram": {"gte": 24000}, "verified": "any"}, "gpu_ram>=24 verified=any"),
        ("geolocation notin [cn,vn]", "geolocation notin [CN,VN]"),
        ("driver_version>=535.86.05", "driver_version>=535.86.5"),
        ("external=null", "external=null"),
        ({"gpu_name": "any "}, "gpu_name=any"),
        ({"gpu_name": {"eq": "null"}}, 'gpu_name="null"'),
        ({}, ""),
    ],
)
def test_describe_filters(spec, expected):
    assert describe_filters(spec) == expected


SDK_FILTER_FIELDS = [
    "num_gpus", "gpu_name", "gpu_ram", "gpu_total_ram", "cuda_max_good", "compute_cap",
    "cpu_cores", "cpu_ram", "disk_space", "disk_bw", "dph_total", "dlperf",
    "dlperf_per_dphtotal", "flops_per_dphtotal", "total_flops", "inet_down", "inet_up",
    "reliability", "verified", "rentable", "rented", "external", "datacenter", "geolocation",
    "static_ip", "direct_port_count", "pcie_bw", "pci_gen", "driver_version", "ubuntu_version",
    "min_bid", "machine_id", "host_id", "storage_cost",
]  # fmt: skip


def test_field_table_is_consistent():
    assert set(FIELD_ALIASES.values()) <= set(OFFER_FIELDS)
    assert not set(FIELD_ALIASES) & set(OFFER_FIELDS)


@pytest.mark.parametrize("name", SDK_FILTER_FIELDS)
def test_fields_of_the_reference_are_usable(name):
    # the offer fields the vastai SDK 1.9.1 filters on: a validator of offer_filters accepts them
    assert parse_filters({name: "any"}) == {FIELD_ALIASES.get(name, name): {}}


# ------------------------------------------------------------------------ query

DEFAULTS = {
    "verified": {"eq": True},
    "rentable": {"eq": True},
    "rented": {"eq": False},
    "external": {"eq": False},
}


def test_build_query_defaults():
    assert build_query("", disk_gb=20) == {
        **DEFAULTS,
        "num_gpus": {"eq": 1},
        "order": [["dph_total", "asc"], ["reliability", "desc"]],
        "type": "on-demand",
        "allocated_storage": 20.0,
        "limit": 64,
    }


def test_build_query_with_filters_price_cap_and_limit():
    query = build_query(
        "gpu_name=RTX_4090 reliability>0.98 gpu_ram>=24", disk_gb=12.5, max_dph=0.8, limit=10
    )
    assert query["gpu_name"] == {"eq": "RTX 4090"}
    assert query["reliability"] == {"gt": 0.98}
    assert query["gpu_ram"] == {"gte": 24000}
    assert query["dph_total"] == {"lte": 0.8}
    assert query["allocated_storage"] == 12.5 and type(query["allocated_storage"]) is float
    assert query["limit"] == 10
    assert all(query[field] == cond for field, cond in DEFAULTS.items())


@pytest.mark.parametrize(
    ("filters", "max_dph", "expected"),
    [
        ("dph<=0.5", 0.8, {"lte": 0.5}),  # the user's bound is stricter
        ("dph<=0.9", 0.8, {"lte": 0.8}),  # the cap is stricter
        ("dph<0.5", 0.8, {"lt": 0.5, "lte": 0.8}),
        ("dph>0.1", None, {"gt": 0.1}),
        ("dph=any", 0.3, {"lte": 0.3}),  # a wildcard does not lift the configured cap
        ("", None, None),
    ],
)
def test_build_query_price_bound(filters, max_dph, expected):
    assert build_query(filters, disk_gb=10, max_dph=max_dph).get("dph_total") == expected


@pytest.mark.parametrize(
    ("filters", "field", "expected"),
    [
        ("verified=false", "verified", {"eq": False}),
        ("verified=any", "verified", None),
        ({"rentable": "*"}, "rentable", None),
        ("rented=true", "rented", {"eq": True}),
        ("rented=any", "rented", None),
        ("external=any", "external", None),
        ("external!=true", "external", {"neq": True}),
    ],
)
def test_build_query_user_overrides_defaults(filters, field, expected):
    query = build_query(filters, disk_gb=10)
    assert query.get(field) == expected
    for other, condition in DEFAULTS.items():
        if other != field:
            assert query[other] == condition


@pytest.mark.parametrize("filters", ["num_gpus>=1", "num_gpus in [1,2,4]", "num_gpus=any", ""])
def test_build_query_forces_one_gpu(filters):
    assert build_query(filters, disk_gb=10)["num_gpus"] == {"eq": 1}


def test_build_query_refuses_more_gpus():
    with pytest.raises(OfferFilterError, match="excludes 1"):
        build_query("num_gpus=2", disk_gb=10)


def test_build_query_does_not_share_state_with_its_input():
    filters = parse_filters("dph<=0.9")
    build_query(filters, disk_gb=10, max_dph=0.5)
    assert filters == {"dph_total": {"lte": 0.9}}
    assert build_query(None, disk_gb=1)["verified"] == {"eq": True}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"disk_gb": 0}, "disk_gb must be a positive number"),
        ({"disk_gb": "10"}, "disk_gb must be a positive number"),
        ({"disk_gb": 10, "limit": 0}, "limit must be a positive integer"),
        ({"disk_gb": 10, "limit": 2.5}, "limit must be a positive integer"),
        ({"disk_gb": 10, "max_dph": -1}, "max_dph must be a positive price"),
    ],
)
def test_build_query_bad_arguments(kwargs, expected):
    with pytest.raises(OfferFilterError, match=expected):
        build_query("", **kwargs)


# ------------------------------------------------------------------------ ranking


@dataclass(frozen=True)
class FakeOffer:
    id: int
    dph_total: float
    reliability: float


def test_rank_offers_cheapest_then_most_reliable_then_lowest_id():
    offers = [
        {"id": 5, "dph_total": 0.40, "reliability": 0.99},
        {"id": 4, "dph_total": 0.30, "reliability": 0.95},
        {"id": 3, "dph_total": 0.30, "reliability": 0.99},
        {"id": 2, "dph_total": 0.30, "reliability": 0.99},
        {"id": 1, "dph_total": 0.50, "reliability": 1.00},
    ]
    assert [o["id"] for o in rank_offers(offers)] == [2, 3, 4, 5, 1]
    assert [o["id"] for o in rank_offers(reversed(offers))] == [2, 3, 4, 5, 1]


def test_rank_offers_accepts_objects_and_missing_values():
    offers = [
        FakeOffer(id=7, dph_total=0.2, reliability=0.9),
        FakeOffer(id=8, dph_total=0.1, reliability=0.5),
        {"id": 9, "dph_total": None, "reliability": 1.0},
        {"id": 10, "dph_total": 0.2, "reliability": None},
    ]
    ranked = rank_offers(offers)
    assert [_id(o) for o in ranked] == [8, 7, 10, 9]
    assert rank_offers([]) == []


def _id(offer):
    return offer["id"] if isinstance(offer, dict) else offer.id


# ------------------------------------------------------------------ local re-check

OFFER = {
    "id": 101,
    "gpu_name": "RTX 4090",
    "num_gpus": 1,
    "gpu_ram": 24564,
    "cpu_ram": 64000,
    "dph_total": 0.42,
    "reliability": 0.991,
    "cuda_max_good": 12.4,
    "driver_version": "550.54.15",
    "geolocation": "California, US",
    "hosting_type": 1,
    "verification": "verified",
    "rentable": True,
    "rented": False,
    "external": None,
    "has_avx": 1,
    "os_version": "22.04",
}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gpu_name=RTX_4090", True),
        ("gpu_name=RTX_3090", False),
        ("gpu_name!=RTX_3090", True),
        ("gpu_name!=RTX_4090", False),
        ("reliability>0.99", True),
        ("reliability>0.991", False),
        ("reliability>=0.991", True),
        ("reliability>=0.992", False),
        ("dph<0.5", True),
        ("dph<0.42", False),
        ("dph<=0.42", True),
        ("dph<=0.41", False),
        ("gpu_name in [RTX_3090,RTX_4090]", True),
        ("gpu_name in [RTX_3090,A40]", False),
        ("gpu_name notin [RTX_3090,A40]", True),
        ("gpu_name notin [RTX_4090]", False),
        ("gpu_ram>=24", True),  # 24564 MB >= 24000
        ("gpu_ram>=25", False),
        ("cpu_ram=64", True),
        ("cuda_vers>=12.4", True),
        ("cuda_vers>12.4", False),
        ("driver_version>=535.86.05", True),
        ("driver_version>=550.54.16", False),
        ("driver_version=550.54.15", True),
        ("geolocation=US", True),
        ("geolocation=us", True),
        ("geolocation!=US", False),
        ("geolocation in [CA,US]", True),
        ("geolocation notin [US]", False),
        ("datacenter=true", True),
        ("datacenter=false", False),
        ("verified=true", True),
        ("verified=false", False),
        ("rentable=true rented=false", True),
        ("rented=true", False),
        ("external=null", True),
        ("external=false", False),  # SQL: null is not false
        ("external!=true", False),  # ... nor different from true
        ("external!=null", False),
        ("gpu_name!=null", True),
        ("has_avx=true", True),
        ("has_avx=0", False),
        ("ubuntu_version=22.04", True),
        ("ubuntu_version=20.04", False),
        ("num_gpus=1 gpu_name=RTX_4090 dph<0.5 reliability>0.98", True),
        ("num_gpus=1 gpu_name=RTX_4090 dph<0.4 reliability>0.98", False),
        ("verified=any gpu_name=*", True),
        ("disk_space>0", False),  # the row has no disk_space: null fails comparisons
        ("", True),
    ],
)
def test_offer_matches(spec, expected):
    assert offer_matches(spec, OFFER) is expected


@pytest.mark.parametrize(
    ("row", "spec", "expected"),
    [
        ({"datacenter": False, "hosting_type": 1}, "datacenter=true", False),  # explicit wins
        ({"hosting_type": 0}, "datacenter=false", True),
        ({"verified": False, "verification": "verified"}, "verified=true", False),
        ({"verification": "deverified"}, "verified=false", True),
        ({"geolocation": ", DE"}, "geolocation=DE", True),
        ({"geolocation": "Bulgaria, BG"}, "geolocation in [BG]", True),
        ({"geolocation": None}, "geolocation notin [CN]", False),
        ({"driver_vers": 535086005}, "driver_version=535.86.05", True),
        ({"driver_version": "535.86.05"}, "driver_version<535.86.10", True),
        ({"reliability": "0.95"}, "reliability>0.9", True),  # string cells are coerced
        ({"reliability": "n/a"}, "reliability>0.9", False),
    ],
)
def test_offer_matches_row_variants(row, spec, expected):
    assert offer_matches(spec, row) is expected


def test_offer_matches_accepts_an_object_with_raw():
    @dataclass(frozen=True)
    class WithRaw:
        raw: dict

    assert offer_matches({"gpu_name": "RTX 4090"}, WithRaw(raw=OFFER)) is True
    assert offer_matches({"gpu_name": "A40"}, WithRaw(raw=OFFER)) is False


def test_offer_matches_validates_its_filters():
    with pytest.raises(OfferFilterError, match="unknown offer field 'gpu_nmae'"):
        offer_matches("gpu_nmae=A40", OFFER)


def test_module_is_pure():
    # The config validator and the CLI import it without the network or Celery stacks.
    code = (
        "import sys, ponos_tasks.offers; "
        "print(sorted(m for m in ('requests', 'celery', 'redis') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------ a task's log


def test_explain_offers_lists_the_candidates_in_the_order_tried():
    offers = [
        {"id": 3, "gpu_name": "A100", "dph_total": 1.2, "reliability": 0.99, "machine_id": 30},
        {"id": 1, "gpu_name": "RTX 4090", "dph_total": 0.4, "reliability": 0.95, "machine_id": 10},
        {"id": 2, "gpu_name": "RTX 4090", "dph_total": 0.4, "reliability": 0.999, "machine_id": 20},
        {"id": 4, "gpu_name": None, "dph_total": None, "reliability": None, "machine_id": 40},
    ]
    line = explain_offers(
        rank_offers(offers), left_out={"on a machine that failed a start": 2, "outside": 0}
    )
    assert line == (
        "4 offer(s) match the filters (left out: 2 on a machine that failed a start); "
        "cheapest first (then most reliable): "
        "offer 2 RTX 4090 $0.400/h reliability 0.999 machine 20; "
        "offer 1 RTX 4090 $0.400/h reliability 0.950 machine 10; "
        "offer 3 A100 $1.200/h reliability 0.990 machine 30; 1 more"
    )
    assert explain_offers([]) == "no offer matches the filters"
    assert explain_offers(rank_offers(offers)[:1], more=True).startswith(
        "at least 1 offer(s) match the filters; cheapest first"
    )
