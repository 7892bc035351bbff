"""Every supported family: the tokenizer is checked (round trip) before any window is drawn, and
windows start with BOS exactly when the family's tokenizer adds one (`evaluate.bos: auto`), keep
their length, and never score BOS."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from compress.config import ConfigError, parse_config
from compress.data.windows import calibration_windows, evaluation_windows
from compress.pipeline import run
from compress.stages.calibrate import stage_calibrate
from compress.stages.context import RunContext
from compress.stages.load import stage_load
from compress.stages.quantize import resolve_plans
from tiny_models import ADDS_BOS, FAMILIES, family_tokenizer, make_model, make_tokenizer, run_config, save_model


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """`family_dir(family)`: a tiny model of that family saved with its family's BOS convention."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_model(make_model(family), tmp_path_factory.mktemp(f"bos-{family}"), family_tokenizer(family))
        return made[family]

    return get


def _drawn(folder, text_file, tmp_path, **sections) -> RunContext:
    cfg = parse_config(run_config(folder, text_file, tmp_path / "out", quantize={"method": "gptq", "bits": 4, "group_size": 64}, **sections))
    ctx = RunContext(cfg, tmp_path / "out", resolve_plans(cfg))
    (tmp_path / "out").mkdir()
    stage_load(ctx)
    stage_calibrate(ctx)
    return ctx


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_start_with_bos_exactly_when_the_family_tokenizer_adds_one(family, family_dir, text_file, tmp_path):
    ctx = _drawn(family_dir(family), text_file, tmp_path)
    plain_tok = make_tokenizer()  # the same vocabulary, no BOS added
    stream = evaluation_windows(plain_tok, str(text_file), 1, 4 * 32).reshape(-1)  # the text, in order
    assert ctx.eval_ids.shape == (4, 32) and ctx.calib_ids.shape == (4, 32)
    if ADDS_BOS[family]:
        assert ctx.eval_bos == 0 and ctx.calibration.bos_token_id == 0
        assert (ctx.eval_ids[:, 0] == 0).all() and (ctx.calib_ids[:, 0] == 0).all()
        # BOS + 31 tokens of text per window, the text consecutive across windows.
        assert torch.equal(ctx.eval_ids[:, 1:].reshape(-1), stream[: 4 * 31])
        assert torch.equal(ctx.calib_ids, calibration_windows(plain_tok, str(text_file), 4, 32, 0, bos_id=0))
    else:
        assert ctx.eval_bos is None and ctx.calibration.bos_token_id is None
        assert torch.equal(ctx.eval_ids.reshape(-1), stream)
        assert torch.equal(ctx.calib_ids, calibration_windows(plain_tok, str(text_file), 4, 32, 0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bos_true_and_false_override_the_tokenizer(family, family_dir, text_file, tmp_path):
    adds = ADDS_BOS[family]
    ctx = _drawn(family_dir(family), text_file, tmp_path, evaluate={"bos": "false" if adds else "true"},
                 calibration={"bos": "false" if adds else "true"})
    first, calib_first = ctx.eval_ids[:, 0], ctx.calib_ids[:, 0]
    if adds:  # bos: false
        assert ctx.eval_bos is None and ctx.calibration.bos_token_id is None
        assert (first != 0).all() and (calib_first != 0).all()  # id 0 (</s>) is never text
    else:  # bos: true
        assert ctx.eval_bos == 0 and ctx.calibration.bos_token_id == 0
        assert (first == 0).all() and (calib_first == 0).all()


def test_evaluation_scores_every_token_after_bos_and_never_bos(family_dir, text_file, tmp_path):
    """The original's perplexity equals the model's own cross-entropy over positions 1..L-1 of
    each window (BOS, at position 0, is an input only); the protocol name and hash record BOS."""
    from transformers import AutoModelForCausalLM

    folder = family_dir("gemma3_text")
    ctx = run(parse_config(run_config(folder, text_file, tmp_path / "out")))
    ids = ctx.eval_ids
    assert (ids[:, 0] == 0).all() and ctx.protocol.name.endswith("-4x32-bos")
    assert ctx.protocol.bos_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert math.isclose(ctx.original.perplexity, math.exp(float(nll)), rel_tol=1e-4)
    no_bos = run(parse_config(run_config(folder, text_file, tmp_path / "out2", evaluate={"bos": "false"})))
    assert not no_bos.protocol.name.endswith("-bos") and no_bos.protocol.bos_token_id is None
    assert no_bos.protocol.windows_sha256 != ctx.protocol.windows_sha256


def test_a_tokenizer_that_does_not_round_trip_stops_the_run_with_the_fix(family_dir, text_file, tmp_path):
    import yaml

    from compress.cli import main

    broken = tmp_path / "broken"
    save_model(make_model("llama"), broken, family_tokenizer("llama"))
    tok = family_tokenizer("llama")
    tok.backend_tokenizer.decoder = None  # byte-level pieces ("Ġhistory") come back undecoded
    tok.save_pretrained(broken)
    cfg = run_config(broken, text_file, tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    line = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "model.tokenizer:" in line[0] and "does not decode its own encoding" in line[0]
    assert "set model.tokenizer: PATH-or-hub-id" in line[0]

    # The fix: the tokenizer from elsewhere; the artifact carries that tokenizer.
    good = tmp_path / "good-tokenizer"
    family_tokenizer("llama").save_pretrained(good)
    cfg["model"]["tokenizer"] = str(good)
    ctx = run(parse_config(cfg))
    art = ctx.candidates["rtn-w4-g64"].artifact
    assert (art / "tokenizer.json").read_bytes() == (good / "tokenizer.json").read_bytes()
    assert ctx.eval_bos == 0


def test_a_missing_tokenizer_folder_is_a_config_error(family_dir, text_file, tmp_path):
    data = run_config(family_dir("llama"), text_file, tmp_path / "out")
    data["model"]["tokenizer"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model.tokenizer: .*nope is not a tokenizer folder"):
        run(parse_config(data))
    assert not (tmp_path / "out").exists()  # refused in preflight, before any work
