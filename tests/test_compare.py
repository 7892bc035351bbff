"""Pareto fronts, the budget recommendation, the config sections and the sweep expansion."""
from __future__ import annotations

import itertools
import random

import pytest

from compress.compare import pareto_front, recommend, within_budget
from compress.config import ConfigError, SelectConfig, parse_config
from compress.sweep import with_sweep


def _dominated_slow(rows, x, y):
    """Independent reference: sort by x, sweep keeping the running minimum of y."""
    pts = sorted((r for r in rows if not r.get("error")), key=lambda r: (r[x], r[y]))
    front, best = [], float("inf")
    for r in pts:
        if r[y] < best:
            front.append(r["name"])
            best = r[y]
    return front


def test_pareto_small_example():
    rows = [
        {"name": "a", "bytes": 100, "perplexity": 10.0},
        {"name": "b", "bytes": 50, "perplexity": 11.0},
        {"name": "c", "bytes": 60, "perplexity": 12.0},  # bigger and worse than b
        {"name": "d", "bytes": 30, "perplexity": 20.0},
        {"name": "e", "bytes": 20, "error": "failed"},  # failed: takes no part
        {"name": "f", "bytes": 50, "perplexity": 11.5},  # ties b on size, worse
    ]
    assert pareto_front(rows) == ["d", "b", "a"]


def test_pareto_matches_reference_on_random_points():
    rng = random.Random(0)
    for _ in range(50):
        rows = [{"name": str(i), "bytes": rng.randint(1, 30), "kl_divergence": rng.random()} for i in range(12)]
        assert pareto_front(rows, "bytes", "kl_divergence") == _dominated_slow(rows, "bytes", "kl_divergence")


ORIGINAL = {"name": "original", "perplexity": 10.0, "kl_divergence": 0.0, "bytes": 1000}
ROWS = [
    {"name": "w8", "bytes": 500, "perplexity": 10.05, "kl_divergence": 0.001, "top1_agreement": 0.99},
    {"name": "w4", "bytes": 300, "perplexity": 10.15, "kl_divergence": 0.03, "top1_agreement": 0.95},
    {"name": "w3", "bytes": 250, "perplexity": 11.0, "kl_divergence": 0.2, "top1_agreement": 0.85},
    {"name": "w2", "bytes": 200, "error": "ValueError: boom"},
]


@pytest.mark.parametrize("select, expect", [
    ({"max_ppl_increase": "2%"}, "w4"),      # +1.5% passes, +10% does not
    ({"max_ppl_increase": "1%"}, "w8"),
    ({"max_ppl_increase": 0.2}, "w3"),
    ({"max_kl": 0.05}, "w4"),
    ({"max_kl": 0.0001}, None),
    ({"max_kl": 0.05, "min_top1": 0.97}, "w8"),
    ({}, None),
])
def test_recommend_smallest_within_budget(select, expect):
    rec = recommend(ROWS, ORIGINAL, SelectConfig(**select))
    assert rec.name == expect
    if expect:
        assert rec.line.startswith(f"select: {expect} ")
    assert "w2" not in (rec.name or "")  # a failed candidate is never recommended


def test_recommend_explains_a_miss():
    rec = recommend(ROWS, ORIGINAL, SelectConfig(max_kl=0.0001))
    assert "no candidate within budget" in rec.line and "w8" in rec.line
    assert within_budget(ROWS[2], ORIGINAL, SelectConfig(max_ppl_increase="5%")) == (False, "perplexity +10.0% > +5.0%")


@pytest.mark.parametrize("value, expect", [("2%", 0.02), (" 0.5% ", 0.005), (0.02, 0.02), (0, 0.0)])
def test_select_percent_parsing(value, expect):
    assert SelectConfig(max_ppl_increase=value).max_ppl_increase == pytest.approx(expect)


@pytest.mark.parametrize("value", [2, "2", "two%", -0.1, True])
def test_select_rejects_ambiguous_values_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"select\.max_ppl_increase"):
        parse_config({"model": {"source": "x"}, "select": {"max_ppl_increase": value}})


def test_unknown_keys_in_new_sections_are_errors():
    for section, body in (("select", {"max_ppl": 1}), ("serving", {"ctx": 10}), ("sweep", {"bit": [4]})):
        with pytest.raises(ConfigError, match=rf"{section}\.\w+: unknown key"):
            parse_config({"model": {"source": "x"}, section: body})
    with pytest.raises(ConfigError, match=r"sweep\.group_size"):
        parse_config({"model": {"source": "x"}, "sweep": {"group_size": [100]}})


def test_sweep_is_the_cartesian_product_over_quantize():
    cfg = parse_config({
        "model": {"source": "x"}, "quantize": {"sym": True},
        "sweep": {"method": ["rtn", "gptq"], "bits": [8, 4, 3], "group_size": [-1, 64]},
    })
    cands = with_sweep(cfg).candidates
    combos = list(itertools.product(["rtn", "gptq"], [8, 4, 3], [-1, 64]))
    assert [(c.method, c.bits, c.group_size) for c in cands] == combos
    assert cands[0].name == "rtn-w8-ch-sym"  # quantize.sym: true carries into every candidate


def test_sweep_gptq_only_keys_do_not_duplicate_rtn():
    cfg = parse_config({"model": {"source": "x"}, "quantize": {"method": "gptq", "static_groups": False},
                        "sweep": {"method": ["rtn", "gptq"], "desc_act": [False, True]}})
    assert [c.name for c in with_sweep(cfg).candidates] == ["rtn-w4-g128", "gptq-w4-g128", "gptq-w4-g128-act"]


def test_sweep_after_explicit_candidates_and_name_clash():
    base = {"model": {"source": "x"}, "sweep": {"bits": [4]}}
    cfg = parse_config({**base, "candidates": [{"name": "mine", "bits": 8}]})
    assert [c.name for c in with_sweep(cfg).candidates] == ["mine", "rtn-w4-g128"]
    with pytest.raises(ConfigError, match="also produced by sweep"):
        with_sweep(parse_config({**base, "candidates": [{"name": "rtn-w4-g128", "bits": 4}]}))
