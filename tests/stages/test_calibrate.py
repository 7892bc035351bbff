"""Which documents calibration draws from, and what the manifest says it drew."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from compress.config import parse_config
from compress.pipeline import run
from compress.stages.calibrate import calibration_split
from tiny_models import corpus, run_config


@pytest.mark.parametrize("calib,evaluate,expected", [
    ("auto", {}, "calibration"),                          # evaluation reads the same file
    ("auto", {"enabled": False}, "all"),                  # nothing is evaluated
    ("auto", {"dataset": "random-tokens"}, "all"),        # evaluation reads another source
    ("all", {}, "all"),
    ("held-out", {"dataset": "random-tokens"}, "calibration"),
])
def test_calibration_split_follows_the_evaluation_source(calib, evaluate, expected, model_dir, text_file, tmp_path):
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path, calibration={"split": calib},
                                  evaluate=evaluate))
    assert calibration_split(cfg) == expected


def test_same_file_by_another_path_is_the_same_source(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(text_file.parent)
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path,
                                  evaluate={"dataset": f"./{text_file.name}"}))
    assert calibration_split(cfg) == "calibration"


def test_manifest_counts_the_whole_calibration_file(model_dir, text_file, tmp_path):
    """A user's own file, with nothing evaluated on it, is used whole, and the manifest's
    document and token counts are the file's."""
    model = model_dir("llama")
    out = tmp_path / "out"
    cfg = parse_config(run_config(model, text_file, out, quantize={"method": "gptq"},
                                  evaluate={"enabled": False}))
    ctx = run(cfg)
    manifest = json.loads((ctx.candidates["gptq-w4-g64"].artifact / "compress-manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(model)
    docs = corpus()
    calib = manifest["calibration"]
    assert calib["split"] == "all"
    assert calib["documents"] == len(docs)
    assert calib["tokens"] == sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
    assert manifest["runtime"]["torch_threads"] >= 1
