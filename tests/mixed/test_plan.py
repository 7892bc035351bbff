"""The bytes model: each format's layout arithmetic equals the bytes of the tensors it writes;
the options and budget a target gives."""
from __future__ import annotations

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.formats.registry import Format, get_format
from compress.mixed.plan import option_grid
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import RTNConfig


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (256, 64)])
@pytest.mark.parametrize("bits,group_size,sym", [(2, 32, True), (3, 64, True), (4, -1, False), (8, 32, False), (3, -1, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bytes_equal_the_written_tensors(fmt, shape, bits, group_size, sym, bias):
    f = get_format(fmt)
    spec = QuantSpec(bits, group_size, sym)
    if f.check("x", spec, shape, False) is not None:
        pytest.skip("not a layout this format holds")
    for dtype in (torch.float16, torch.float32):
        # Format.linear_bytes (the base class) writes a dummy layer through linear_tensors.
        assert f.linear_bytes(shape, spec, bias, dtype) == Format.linear_bytes(f, shape, spec, bias, dtype)


def test_default_options_are_the_plans_group_and_per_channel_for_every_bits_plus_float():
    grid = option_grid(RTNConfig(bits=4, group_size=64))
    assert [None if s is None else (s.bits, s.group_size) for s in grid] == [
        (2, 64), (2, -1), (3, 64), (3, -1), (4, 64), (4, -1), (8, 64), (8, -1), None]
    grid = option_grid(RTNConfig(group_size=64, target_options={"bits": [4], "group_sizes": [32], "unquantized": False}))
    assert [(s.bits, s.group_size) for s in grid] == [(4, 32)]


def _cfg(quantize):
    return parse_config({"model": {"source": "x"}, "quantize": quantize})


@pytest.mark.parametrize("target,message", [
    ({}, "quantize.target: Value error, give exactly one of max_bytes, bits_per_weight, gpu (got none)"),
    ({"max_bytes": 10, "bits_per_weight": 4}, "give exactly one of max_bytes, bits_per_weight, gpu"),
    ({"bits_per_weight": 4, "batch": 2}, "context_length and batch go with gpu only"),
    ({"bits_per_weight": -1}, "quantize.target.bits_per_weight: Input should be greater than 0"),
    ({"max_byte": 10}, "quantize.target.max_byte: unknown key"),
])
def test_target_errors_name_the_key(target, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg({"method": "gptq", "target": target})


@pytest.mark.parametrize("options,message", [
    ({"bits": [4, 4]}, "quantize.target_options.bits: Value error, duplicate entries"),
    ({"bits": [7]}, "quantize.target_options.bits.0: Input should be 2, 3, 4, 5, 6 or 8"),
    ({"group_sizes": [48]}, "quantize.target_options.group_sizes.0: Value error, must be -1"),
    ({"bits": []}, "quantize.target_options.bits: List should have at least 1 item"),
])
def test_target_options_errors_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        _cfg({"target_options": options})


def test_gpu_target_parses_and_names_its_candidate():
    from compress.stages.quantize import resolve_plans

    cfg = _cfg({"method": "rtn", "target": {"gpu": "RTX 4060", "context_length": 8192}})
    assert cfg.quantize.target.gpu == "RTX 4060"
    assert [p.name for p in resolve_plans(cfg)] == ["rtn-w4-g128-gpu"]


def test_bits_5_and_6_are_gguf_k_quant_options_only():
    from compress.formats.registry import get_format

    spec = RTNConfig(group_size=64).spec(5, 64, False)
    assert get_format("compressed-tensors").target_spec(spec, (64, 128), None) is None
    assert get_format("gptq").target_spec(spec, (64, 128), None) is None
