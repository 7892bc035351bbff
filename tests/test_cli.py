"""The command line: exit codes (0 ok, 2 bad input, 1 internal failure) and what stderr says."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import BertConfig, MambaConfig, T5Config

from compress import __version__
from compress.cli import main
from compress.formats.writer import MANIFEST, is_complete
from compress.models.arch import supported_model_types
from tiny_models import run_config


def invoke(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


def write_config(tmp_path, data: dict, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def good(model_dir, text_file, tmp_path):
    """A valid config over a tiny Llama folder; returns (config data, out dir)."""
    out = tmp_path / "out"
    return run_config(model_dir("llama"), text_file, out), out


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"compress, version {__version__}"


def test_schema_is_json_schema_of_the_config():
    res = invoke("schema")
    assert res.exit_code == 0, res.output
    schema = json.loads(res.stdout)
    assert schema["required"] == ["model"]
    assert {"model", "calibration", "quantize", "export", "evaluate"} <= set(schema["properties"])
    for method in ("RTNConfig", "GPTQConfig"):  # one config per registered method
        assert schema["$defs"][method]["properties"]["bits"]["enum"] == [2, 3, 4, 8]
        assert schema["$defs"][method]["additionalProperties"] is False


def test_validate_ok_and_set_applies_before_validation(good, tmp_path):
    data, _ = good
    data["quantize"]["bits"] = 5  # invalid as written; --set repairs it
    path = write_config(tmp_path, data)
    res = invoke("validate", path)
    assert res.exit_code == 2
    assert "quantize.bits: Input should be 2, 3, 4 or 8" in res.stderr
    res = invoke("validate", path, "--set", "quantize.bits=3", "--set", "quantize.group_size=-1")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == "ok: 1 candidate(s): rtn-w3-ch"


@pytest.mark.parametrize("change,message", [
    ({"quantize": {"grop": 64}}, "quantize.grop: unknown key"),
    ({"quantize": {"bits": 5}}, "quantize.bits: Input should be 2, 3, 4 or 8"),
    ({"calibration": {"dataset": "/no/such/calib.txt"}}, "calibration.dataset: text file '/no/such/calib.txt' does not exist"),
    ({"evaluate": {"dataset": "wikipedya"}}, "evaluate.dataset: unknown text source 'wikipedya'"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_config_errors_exit_2_with_key_path(command, change, message, good, tmp_path):
    data, out = good
    for section, values in change.items():
        data[section].update(values)
    res = invoke(command, write_config(tmp_path, data))
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert f"error: {message}" in res.stderr
    assert not out.exists()  # nothing ran


def test_missing_config_file(tmp_path):
    res = invoke("run", str(tmp_path / "nope.yaml"))
    assert res.exit_code == 2
    assert "config file not found" in res.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_model_folder(command, good, tmp_path):
    data, out = good
    data["model"]["source"] = str(tmp_path / "no-such-model")
    res = invoke(command, write_config(tmp_path, data))
    assert res.exit_code == 2
    assert f"error: model.source: {tmp_path / 'no-such-model'} does not exist" in res.stderr
    assert not (out / "rtn-w4-g64").exists()


@pytest.mark.parametrize("config", [
    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128),
    T5Config(d_model=64, num_layers=1, num_heads=2, d_ff=128),
    MambaConfig(hidden_size=64, num_hidden_layers=1),
], ids=lambda c: c.model_type)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_unsupported_architecture_names_supported_types(command, config, good, tmp_path):
    folder = tmp_path / config.model_type
    config.save_pretrained(str(folder))
    data, _ = good
    data["model"]["source"] = str(folder)
    res = invoke(command, write_config(tmp_path, data))
    assert res.exit_code == 2, res.output
    assert f"model_type '{config.model_type}' is not supported" in res.stderr
    assert "supported: " + ", ".join(supported_model_types()) in res.stderr
    assert "llama" in supported_model_types() and "gpt2" in supported_model_types()


def test_inconsistent_head_counts_exit_2_before_any_work(good, model_dir, tmp_path):
    folder = _copy_model(model_dir("llama"), tmp_path / "bad-heads")
    cfg = json.loads((folder / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv = next(k for k in range(2, heads) if heads % k)  # a KV head count that does not divide
    cfg["num_key_value_heads"] = kv
    (folder / "config.json").write_text(json.dumps(cfg))
    data, out = good
    data["model"]["source"] = str(folder)
    res = invoke("run", write_config(tmp_path, data))
    assert res.exit_code == 2, res.output
    assert f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})" in res.stderr
    assert str(folder / "config.json") in res.stderr
    assert not out.exists() or not any(out.iterdir())


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_exit_2_naming_the_file(good, model_dir, tmp_path):
    folder = _copy_model(model_dir("llama"), tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    data, out = good
    data["model"]["source"] = str(folder)
    res = invoke("run", write_config(tmp_path, data))
    assert res.exit_code == 2, res.output
    assert f"error: {weights}: not a valid safetensors file" in res.stderr
    assert not (out / "rtn-w4-g64").exists()


def test_pickled_checkpoint_needs_allow_pickle(good, model_dir, tmp_path):
    folder = _copy_model(model_dir("llama"), tmp_path / "pickled")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    data, out = good
    data["model"]["source"] = str(folder)
    data["evaluate"]["enabled"] = False
    path = write_config(tmp_path, data)
    res = invoke("run", path)
    assert res.exit_code == 2, res.output
    assert "pytorch_model.bin" in res.stderr and "model.allow_pickle: true" in res.stderr
    assert not (out / "rtn-w4-g64").exists()

    res = invoke("run", path, "--set", "model.allow_pickle=true")
    assert res.exit_code == 0, res.output
    assert is_complete(out / "rtn-w4-g64", check_hashes=True)
    manifest = json.loads((out / "rtn-w4-g64" / MANIFEST).read_text())
    assert list(manifest["source"]["files"]) == ["pytorch_model.bin"]


def test_run_then_inspect_then_refuse_to_clobber(good, tmp_path):
    data, out = good
    path = write_config(tmp_path, data)
    res = res_run = CliRunner().invoke(main, ["-q", "run", path, "--set", "quantize.group_size=32", "--output",
                                              str(tmp_path / "elsewhere")])
    assert res.exit_code == 0, res.output
    art = tmp_path / "elsewhere" / "rtn-w4-g32"
    assert is_complete(art, check_hashes=True)
    assert not out.exists()  # --output replaced export.output_dir
    results = json.loads((tmp_path / "elsewhere" / "results.json").read_text())
    assert results["rows"][1]["name"] == "rtn-w4-g32"

    res = invoke("inspect", str(art))
    assert res.exit_code == 0, res.output
    assert "quant_method=compressed-tensors" in res.stdout
    assert "group_0: bits=4, group_size=32, sym=False" in res.stdout and "-> Linear (1 target(s))" in res.stdout
    assert "(model_type llama)" in res.stdout
    # The packed tensors stand for as many weights as the original holds.
    params = [l for l in res.stdout.splitlines() if l.startswith("parameters:")]
    orig = invoke("inspect", data["model"]["source"])
    assert params and params == [l for l in orig.stdout.splitlines() if l.startswith("parameters:")]
    # The end of the run printed the two lines that load the artifact: they do, as printed.
    lines = [l.strip() for l in res_run.stdout.splitlines() if l.startswith("    ")]
    assert len(lines) == 2 and "from_pretrained" in lines[1]
    scope: dict = {}
    exec("\n".join(lines), scope)
    assert type(scope["model"].hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"

    res = invoke("inspect", str(art.parent / "does-not-exist"))
    assert res.exit_code == 2

    # A second run into the same folder is refused before any work, naming the key to change.
    res = invoke("run", path, "--set", "quantize.group_size=32", "--output", str(tmp_path / "elsewhere"))
    assert res.exit_code == 2
    assert "export.output_dir:" in res.stderr and "export.overwrite: true" in res.stderr


def test_inspect_original_folder_says_unquantized(model_dir):
    res = invoke("inspect", str(model_dir("llama")))
    assert res.exit_code == 0, res.output
    assert "quantization:  none (tensor dtypes F32)" in res.stdout


def test_internal_failure_exits_1(good, tmp_path, monkeypatch):
    from compress.stages import export

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export.Exporter, "add_block", boom)
    data, out = good
    res = invoke("run", write_config(tmp_path, data))
    assert res.exit_code == 1, res.output
    assert "failed: RuntimeError: disk on fire" in res.stderr
    assert not (out / "rtn-w4-g64").exists()


_FAILING = textwrap.dedent("""
    import sys
    from compress.stages import load
    def broken(cfg):
        raise RuntimeError("disk on fire")
    load.load_model = broken  # an internal failure right after preflight
    from compress.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("flags,shows_traceback", [(["-vv"], False), (["--debug"], True)])
def test_internal_failure_traceback_only_under_debug(flags, shows_traceback, good, tmp_path):
    data, _ = good
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _FAILING, *flags, "run", write_config(tmp_path, data)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert ("Traceback" in proc.stderr) is shows_traceback, proc.stderr
    assert "failed: RuntimeError: disk on fire" in proc.stderr.strip().splitlines()[-1]


def test_logged_exception_is_one_line_unless_debug():
    from compress.cli import _Formatter

    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("compress", logging.ERROR, __file__, 1, "candidate %s failed", ("a",), sys.exc_info())
    quiet = _Formatter(debug=False).format(record)
    assert quiet == "ERROR compress: candidate a failed\n  ValueError: bad; thing (--debug shows the traceback)"
    record.exc_text = None  # the formatter caches the rendered exception on the record
    assert "Traceback (most recent call last)" in _Formatter(debug=True).format(record)
