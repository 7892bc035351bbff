"""A run whose original model scored an absurd perplexity is published only with --force, and its
card says so; a run that passed the check (or predates it) publishes as before."""
from __future__ import annotations

import torch
from artifact_fixture import build_artifact
from click.testing import CliRunner

from compress.evaluate.sanity import check_original, unigram_perplexity
from compress.publish.command import publish


def test_unigram_perplexity_is_exp_entropy_of_the_scored_targets():
    # Window 0 scores [1, 1, 2], window 1 scores [2, 3, 3]; first tokens (5, 9) are never targets.
    ids = torch.tensor([[5, 1, 1, 2], [9, 2, 3, 3]])
    p = torch.tensor([2 / 6, 2 / 6, 2 / 6])
    assert abs(unigram_perplexity(ids) - float(torch.exp(-(p * p.log()).sum()))) < 1e-9  # = 3.0
    assert abs(unigram_perplexity(ids) - 3.0) < 1e-9


def test_check_flags_a_model_worse_than_the_texts_unigram_or_uniform():
    ids = torch.tensor([[5, 1, 1, 2], [9, 2, 3, 3]])  # unigram perplexity 3
    assert not check_original(2.9, ids, vocab_size=100)["flagged"]
    bad = check_original(3.1, ids, vocab_size=100)
    assert bad["flagged"] and abs(bad["bound"] - 3.0) < 1e-9 and "unigram model of the evaluation text" in bad["message"]
    # A vocabulary smaller than the unigram perplexity: uniform guessing is the bound.
    assert check_original(2.5, ids, vocab_size=2)["bound"] == 2.0
    assert check_original(float("nan"), ids, vocab_size=100)["flagged"]


def test_publish_refuses_a_flagged_run_without_force(tmp_path):
    ids = torch.tensor([[5, 1, 1, 2], [9, 2, 3, 3]])
    artifact = build_artifact(tmp_path / "a", sanity=check_original(57088.0, ids, vocab_size=262144))
    hub = tmp_path / "hub" / "org" / "gemma"
    runner = CliRunner()
    refused = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}"])
    assert refused.exit_code == 2
    assert "57,088.0" in refused.output and "--force" in refused.output
    assert not hub.exists()

    forced = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}", "--force"])
    assert forced.exit_code == 0, forced.output
    card = (hub / "revisions" / "main" / "README.md").read_text()
    assert "WARNING: the original model's perplexity 57,088.0" in card and "--force" in card


def test_publish_of_a_sane_run_needs_no_force(tmp_path):
    ids = torch.tensor([[5, 1, 1, 2], [9, 2, 3, 3]])
    artifact = build_artifact(tmp_path / "a", sanity=check_original(2.0, ids, vocab_size=100))
    hub = tmp_path / "hub" / "org" / "ok"
    result = CliRunner().invoke(publish, [str(artifact), "--to", f"file://{hub}"])
    assert result.exit_code == 0, result.output
    assert "WARNING" not in (hub / "revisions" / "main" / "README.md").read_text()
