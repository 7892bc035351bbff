"""Tiny GPTQ artifacts (W4 g64 asymmetric, W8 per channel) of a random Llama, built once."""
from __future__ import annotations

import pytest

from compress.config import parse_config
from compress.pipeline import run
from tiny_models import run_config


@pytest.fixture(scope="session")
def artifacts(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt")
    cands = [{"name": "w4", "bits": 4, "group_size": 64, "sym": False}, {"name": "w8", "bits": 8, "group_size": -1}]
    cfg = parse_config(run_config(model_dir("llama"), text_file, out, candidates=cands,
                                  export={"format": "gptq"}, evaluate={"enabled": False}))
    ctx = run(cfg, out)
    return {n: r.artifact for n, r in ctx.candidates.items()}
