"""Config loading: YAML -> `--set` overrides -> validation; every error names its key path."""
from __future__ import annotations

import pytest
import yaml

from compress.config import ConfigError, apply_overrides, load_config, parse_config

BASE = {"model": {"source": "some/folder"}}


def cfg_with(**sections) -> dict:
    return {**BASE, **sections}


@pytest.mark.parametrize("data,message", [
    (cfg_with(quantize={"grop": 64}), "quantize.grop: unknown key"),
    (cfg_with(quantize={"bits": 5}), "quantize.bits: Input should be 2, 3, 4 or 8"),
    (cfg_with(quantize={"group_size": 48}), "quantize.group_size: Value error, must be -1"),
    (cfg_with(quantize={"method": "awq2"}), "quantize.method: unknown method; valid: awq, gptq, rtn, smoothquant (got 'awq2')"),
    (cfg_with(quantize={"method": "rtn", "damp_percent": 0.1}), "quantize.damp_percent: unknown key"),
    (cfg_with(quantize={"method": "gptq", "damp_percent": 2}), "quantize.damp_percent: Input should be less than 1"),
    (cfg_with(quantize={"overrides": [{"pattern": "x", "group_size": 48}]}), "quantize.overrides.0.group_size: Value error"),
    (cfg_with(candidates=[{"group_size": 12}]), "candidates.0.group_size: Value error"),
    (cfg_with(sweep={"group_size": [64, 12]}), "sweep.group_size.1: Value error"),
    (cfg_with(export={"format": "gguf2"}), "export.format: Input should be"),
    (cfg_with(calibration={"nsamples": 0}), "calibration.nsamples: Input should be greater than or equal to 1"),
    (cfg_with(candidates=[{"bits": 4}, {"bitz": 8}]), "candidates.1.bitz: unknown key"),
    (cfg_with(quantize={"overrides": [{"pattern": "(", "bits": 8}]}), "quantize.overrides.0.pattern:"),
    ({"quantize": {"bits": 4}}, "model: required key is missing"),
    (cfg_with(modle={"source": "x"}), "modle: unknown key"),
    ([1, 2], "(top level): the config must be a mapping"),
    ({"model": {"source": "x.gguf", "name": "org/.."}}, "model.name: Value error, 'org/..' is not a Hub id"),
    ({"model": {"source": "x.gguf", "name": "SmolLM2"}}, "model.name: Value error, 'SmolLM2' is not a Hub id"),
])
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_every_error_is_reported_not_just_the_first():
    with pytest.raises(ConfigError) as err:
        parse_config(cfg_with(quantize={"bits": 5, "grop": 1}))
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("quantize.bits:") and lines[1] == "quantize.grop: unknown key"


def test_defaults_are_the_documented_ones():
    cfg = parse_config(BASE)
    assert (cfg.quantize.method, cfg.quantize.bits, cfg.quantize.group_size, cfg.quantize.sym) == ("rtn", 4, 128, None)
    assert (cfg.export.format, cfg.export.dtype, cfg.export.overwrite) == ("compressed-tensors", "float16", False)
    assert cfg.model.allow_pickle is False


def test_unset_sym_is_asymmetric_unless_the_format_holds_only_symmetric_grids():
    from compress.stages.quantize import resolve_plans

    (plan,) = resolve_plans(parse_config(BASE))
    assert (plan.q.sym, plan.name) == (False, "rtn-w4-g128")
    gguf = parse_config({**BASE, "quantize": {"group_size": 32}, "export": {"format": "gguf", "gguf_type": "Q4_0"}})
    assert [(p.q.sym, p.name) for p in resolve_plans(gguf)] == [(True, "rtn-w4-g32-sym")]
    q41 = parse_config({**BASE, "quantize": {"group_size": 32}, "export": {"format": "gguf", "gguf_type": "Q4_1"}})
    assert [p.q.sym for p in resolve_plans(q41)] == [False]
    explicit = parse_config({**BASE, "quantize": {"sym": True}})
    assert [(p.q.sym, p.name) for p in resolve_plans(explicit)] == [(True, "rtn-w4-g128-sym")]
    # a candidate that switches to a symmetric-only method keeps that method's grid
    sq = parse_config({**BASE, "candidates": [{"method": "smoothquant", "bits": 8, "group_size": -1}]})
    assert [(p.q.sym, p.name) for p in resolve_plans(sq)] == [(True, "smoothquant-w8-ch-a8")]


def test_overrides_are_yaml_scalars_applied_before_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg_with(quantize={"bits": 5})))  # invalid as written
    cfg = load_config(path, ["quantize.bits=3", "quantize.sym=false", "quantize.skip=[lm_head, 'q_proj$']",
                             "export.output_dir=runs/x=y"])
    assert cfg.quantize.bits == 3 and cfg.quantize.sym is False
    assert cfg.quantize.skip == ["lm_head", "q_proj$"]
    assert cfg.export.output_dir == "runs/x=y"  # only the first '=' separates key and value
    with pytest.raises(ConfigError, match="quantize.bits: Input should be"):
        load_config(path, ["quantize.bits=6"])
    with pytest.raises(ConfigError, match="quantize.grop: unknown key"):
        load_config(path, ["quantize.bits=4", "quantize.grop=64"])


def test_override_creates_missing_sections_and_refuses_scalars():
    assert apply_overrides({}, ["evaluate.windows=3"]) == {"evaluate": {"windows": 3}}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["quantize.bits"])
    with pytest.raises(ConfigError, match="quantize.bits.x: cannot set a key inside a non-mapping"):
        apply_overrides({"quantize": {"bits": 4}}, ["quantize.bits.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_duplicate_candidate_names():
    with pytest.raises(ConfigError, match="duplicate names"):
        parse_config(cfg_with(candidates=[{"name": "a", "bits": 4}, {"name": "a", "bits": 8}]))


def test_each_method_has_only_its_own_settings():
    from compress.quantizers.gptq import GPTQConfig
    from compress.quantizers.rtn import RTNConfig

    assert type(parse_config(BASE).quantize) is RTNConfig
    q = parse_config(cfg_with(quantize={"method": "gptq", "bits": 3})).quantize
    assert type(q) is GPTQConfig and (q.bits, q.damp_percent, q.desc_act) == (3, 0.05, True)
    # the schema lists one config per registered method, discriminated on `method`
    from compress.config import RunConfig

    schema = RunConfig.model_json_schema()
    assert {"RTNConfig", "GPTQConfig"} <= set(schema["$defs"])
    assert "damp_percent" not in schema["$defs"]["RTNConfig"]["properties"]


def test_candidates_change_method_and_keep_only_the_new_methods_settings():
    from compress.stages.quantize import resolve_plans

    cfg = parse_config(cfg_with(
        quantize={"method": "gptq", "bits": 4, "group_size": 64, "damp_percent": 0.02},
        candidates=[{"method": "rtn", "bits": 8}, {"bits": 3}],
    ))
    rtn8, gptq3 = resolve_plans(cfg)
    assert (rtn8.name, rtn8.q.method, rtn8.q.group_size) == ("rtn-w8-g64", "rtn", 64)
    assert not hasattr(rtn8.q, "damp_percent")
    assert (gptq3.name, gptq3.q.damp_percent) == ("gptq-w3-g64", 0.02)
    bad = parse_config(cfg_with(candidates=[{"bits": 8}, {"method": "rtn", "desc_act": True}]))
    with pytest.raises(ValueError, match="candidates.1.desc_act: not a setting of method 'rtn'"):
        resolve_plans(bad)


def test_sweep_drops_settings_a_method_lacks():
    from compress.sweep import sweep_candidates

    cfg = parse_config(cfg_with(sweep={"method": ["rtn", "gptq"], "mse_clip": [True, False], "bits": [4]}))
    names = [c.name for c in sweep_candidates(cfg)]
    assert names == ["rtn-w4-g128", "gptq-w4-g128-mse", "gptq-w4-g128"]  # one RTN, not two twins
