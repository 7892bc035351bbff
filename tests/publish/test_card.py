"""Model card: front matter the Hub reads, loading instructions per format, measurements table."""
from __future__ import annotations

import json
import re

import yaml
from artifact_fixture import build_artifact

from compress.publish.card import render_card


def _split(card: str):
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def _load(tmp_path, **kw):
    root = build_artifact(tmp_path / "a", **kw)
    manifest = json.loads((root / "compress-manifest.json").read_text())
    results = json.loads((root / "compress-results.json").read_text()) if (root / "compress-results.json").exists() else None
    config = json.loads((root / "config.json").read_text())
    return manifest, results, config


def test_front_matter_for_a_gptq_model(tmp_path):
    manifest, results, config = _load(tmp_path, license_="apache-2.0")
    meta, body = _split(render_card(manifest, results, config, "org/tiny-w4"))
    assert meta == {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "base_model_relation": "quantized",
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["compress", "quantized", "gptq", "rtn", "4-bit"],
    }
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-w4"' in body
    assert 'LLM(model="org/tiny-w4")' in body  # vLLM serves gptq checkpoints
    assert "abab" * 16 in body  # calibration windows hash


def test_license_is_omitted_when_unknown_and_local_source_is_not_a_base_model(tmp_path):
    manifest, results, config = _load(tmp_path)
    manifest["source"]["model"] = str(tmp_path / "a")  # a local folder, not a Hub id
    meta, body = _split(render_card(manifest, results, config, "org/x"))
    assert "license" not in meta and "base_model" not in meta


def test_license_is_read_from_a_local_source_model_card(tmp_path):
    manifest, results, config = _load(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: llama3.2\ntags: [x]\n---\n# model\n")
    manifest["source"]["model"] = str(src)
    meta, _ = _split(render_card(manifest, results, config, "org/x"))
    assert meta["license"] == "llama3.2"


def test_user_text_is_escaped_in_yaml_and_markdown(tmp_path):
    manifest, results, config = _load(tmp_path, license_='other: "see | LICENSE"\n- evil: true')
    manifest["quantization"]["method"] = "rtn\n---\nx: 1"
    results["rows"][1]["name"] = "w4 | <b>bold</b>"
    results["this"] = "w4 | <b>bold</b>"
    meta, body = _split(render_card(manifest, results, config, "org/x"))
    assert meta["license"] == 'other: "see | LICENSE"\n- evil: true'  # survived the round trip as one string
    assert "rtn\n---\nx: 1" in meta["tags"]
    row = next(line for line in body.splitlines() if "bold" in line)
    assert row.startswith("| **w4 \\| \\<b\\>bold\\</b\\>** (this model) |")
    assert row.count(" | ") == 8  # name + 8 measurement columns, no extra cell from the user's '|'


def test_evaluation_table_renders_what_is_there(tmp_path):
    manifest, results, config = _load(tmp_path)
    results["rows"] = [{"name": "rtn-w4-g64", "perplexity": 25.1}, {"name": "only-name"}]
    _, body = _split(render_card(manifest, results, config, "org/x"))
    assert "Protocol: **wikipedia-eval-nonoverlap**." in body
    assert "| Model | Perplexity |" in body and "KL div." not in body
    assert "| **rtn-w4-g64** (this model) | 25.100 |" in body and "| only-name | – |" in body


def test_card_without_results_or_quantization_sections(tmp_path):
    manifest, _, config = _load(tmp_path, results=False)
    for key in ("quantization", "calibration", "packages", "created"):
        manifest.pop(key)
    meta, body = _split(render_card(manifest, None, config, "org/x"))
    assert "gptq" in meta["tags"]  # the format falls back to config.json's quantization_config
    assert "No measurements were recorded" in body


def test_onnx_format_gets_onnxruntime_instructions(tmp_path):
    manifest, results, config = _load(tmp_path)
    manifest["quantization"]["format"] = "onnx"
    meta, body = _split(render_card(manifest, results, config, "org/x"))
    assert meta["library_name"] == "onnxruntime"
    assert "ORTModelForCausalLM" in body and "vllm" not in body.lower()


def test_gguf_format_gets_llama_cpp_instructions(tmp_path):
    manifest, results, config = _load(tmp_path)
    manifest["quantization"]["format"] = "gguf"
    meta, body = _split(render_card(manifest, results, config, "org/x"))
    assert "gguf" in meta["tags"] and "llama-cli -hf org/x" in body
    assert 'from_pretrained("org/x", gguf_file="model.gguf")' in body and "vllm" not in body.lower()


def test_card_table_uses_the_run_tables_columns():
    """Every figure of a results row is shown with the header and format of the one column
    model, the serving RSS included (its key is the run table's, not a card-only one)."""
    from compress.publish.card import _evaluation

    row = {"name": "c", "perplexity": 25.1234, "bytes": 114_523_776, "serving_peak_rss_mb": 612.4,
           "decode_tokens_per_s": 31.25}
    body = "\n".join(_evaluation({"rows": [row], "this": "c"}))
    assert "| Model | Perplexity | Size (MB) | Decode tok/s | Peak RSS (MB) |" in body
    assert "| **c** (this model) | 25.123 | 114.5 | 31.2 | 612 |" in body
