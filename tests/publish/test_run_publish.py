"""`compress run` with a `publish:` section pushes the finished artifact to a directory hub."""
from __future__ import annotations

import json

import pytest

from compress.config import parse_config
from compress.formats.writer import sha256_file
from compress.pipeline import run
from compress.publish import PublishInputError
from tiny_models import run_config


def test_run_publishes_the_recommended_candidate(model_dir, text_file, tmp_path):
    hub = tmp_path / "hub"
    cfg = run_config(
        model_dir("llama"), text_file, tmp_path / "out",
        candidates=[{"bits": 8, "group_size": -1}, {"bits": 4, "group_size": 64}],
        select={"max_kl": 1e9},  # any candidate qualifies: the smallest one is recommended
        publish={"to": f"file://{hub}/team/tiny"},
    )
    # A random tiny model predicts its text worse than the text's own unigram frequencies: the
    # sanity guard flags the run, which still writes what it measured but is not published.
    with pytest.raises(PublishInputError, match=r"--force.*publish\.force"):
        run(parse_config(cfg))
    assert not hub.exists()
    sanity = json.loads((tmp_path / "out" / "results.json").read_text())["sanity"]
    assert sanity["flagged"] and sanity["original_perplexity"] > sanity["unigram_perplexity"] == sanity["bound"]

    cfg["publish"]["force"] = True
    cfg["export"]["overwrite"] = True
    ctx = run(parse_config(cfg))
    published = hub / "team" / "tiny" / "revisions" / "main"
    artifact = ctx.candidates["rtn-w4-g64"].artifact
    assert sha256_file(published / "model.safetensors") == sha256_file(artifact / "model.safetensors")
    manifest = json.loads((published / "compress-manifest.json").read_text())
    assert manifest["quantization"]["bits"] == 4
    # write_report sealed the results into the manifest; exactly its files, itself and the card went out.
    assert manifest["outputs"]["compress-results.json"]["sha256"] == sha256_file(artifact / "compress-results.json")
    assert {p.name for p in published.iterdir()} == set(manifest["outputs"]) | {"compress-manifest.json", "README.md"}
    card = (published / "README.md").read_text()
    assert "rtn-w4-g64" in card and "perplexity" in card.lower()
    assert "WARNING: the original model's perplexity" in card and "published with `--force`" in card

    # The same revision again without `overwrite` is refused, and the published files stay.
    with pytest.raises(PublishInputError):
        run(parse_config(cfg))
    assert sha256_file(published / "model.safetensors") == sha256_file(artifact / "model.safetensors")
