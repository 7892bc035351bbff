"""`compress generate`: streamed text equals a greedy loop over the same decoder, sampling
follows its definition, and bad input exits 2 with one line."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from compress.cli import main
from compress.models.checkpoint import CheckpointError
from compress.runtime.generate import Sampling, TextStream, next_token, prompt_ids
from compress.runtime.kernels import INT4
from compress.runtime.registry import open_decoder

CPU = torch.device("cpu")


def _cli(*args):
    return CliRunner().invoke(main, ["-q", "generate", *args])


def test_greedy_text_is_the_decoders_argmax_continuation(artifacts) -> None:
    path = artifacts["w4"]
    res = _cli(str(path), "--prompt", "the river and the mountain", "--max-new-tokens", "6", "--temperature", "0")
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(str(path))
    dec = open_decoder(path, CPU)
    logits, out = dec.prefill(torch.tensor([tok("the river and the mountain")["input_ids"]])), []
    for _ in range(6):
        t = int(logits.argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
        logits = dec.step(t)
    assert res.stdout == tok.decode(out, skip_special_tokens=True) + "\n"
    assert f"runtime: {INT4} x14" in res.stderr and "decode" in res.stderr


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing", "no such file"),
    (lambda tmp: tmp, "no config.json"),
])
def test_bad_paths_exit_2_with_one_line(tmp_path, make, message) -> None:
    res = _cli(str(make(tmp_path)), "--prompt", "x")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr


def test_chat_uses_the_template_and_refuses_without_one(artifacts, tmp_path) -> None:
    res = _cli(str(artifacts["w4"]), "--prompt", "hi", "--chat")
    assert res.exit_code == 2 and "no chat template" in res.stderr and res.stderr.count("\n") == 1
    folder = shutil.copytree(artifacts["w4"], tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    ids = prompt_ids(tok, "the river", True, "x")
    assert tok.decode(ids) == "<user>the river<assistant>"
    assert prompt_ids(tok, "the river", False, "x") == tok("the river")["input_ids"]
    with pytest.raises(CheckpointError):
        prompt_ids(AutoTokenizer.from_pretrained(str(artifacts["w4"])), "x", True, "x")


def test_sampling_cuts_and_frequencies() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, Sampling(temperature=0), g) == 0
    assert {next_token(logits, Sampling(1.0, top_k=1, top_p=1.0), g) for _ in range(50)} == {0}
    # top-p 0.8: tokens ranked after 0.5 + 0.3 of mass are cut
    assert {next_token(logits, Sampling(1.0, top_k=0, top_p=0.8), g) for _ in range(200)} == {0, 1}
    n = 4000
    counts = torch.bincount(torch.tensor([next_token(logits, Sampling(1.0, 0, 1.0), g) for _ in range(n)]), minlength=4)
    expect = torch.tensor([0.5, 0.3, 0.15, 0.05]) * n
    assert bool(((counts - expect).abs() < 5 * expect.sqrt()).all()), counts


def test_text_stream_adds_up_to_the_decoded_text(artifacts) -> None:
    tok = AutoTokenizer.from_pretrained(str(artifacts["w4"]))
    ids = tok("the ancient city was built on the north river")["input_ids"]
    s = TextStream(tok)
    assert "".join(s.push(i) for i in ids) == tok.decode(ids)
