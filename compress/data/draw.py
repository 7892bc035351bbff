"""Draw the token windows of a run in a child process.

Reading and tokenizing the text (gensim's Wikipedia parser, the tokenizer itself, the
concatenated token ids) leaves tens of megabytes resident that the quantizing process would
then carry through every block. A short-lived child does it instead and hands back two small
int64 tensors, so the parent never loads a tokenizer. A ValueError in the child (e.g. a split
too short for the windows asked) is bad input: it comes back as a ConfigError whose message
names the config key (the child prefixes `calibration.dataset:` / `evaluate.dataset:` /
`model.source:` to messages that name none). The child dies with the parent
(compress/children.py), and its files live in a ``.partial-`` folder of `work_dir` (the run's
output folder), removed when it is done or, after a kill, by a later run.

    python -m compress.data.draw SPEC.json   (written by `draw_windows`; not a user command)
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from compress.children import die_with_parent, run_child
from compress.owner import make_partial

log = logging.getLogger(__name__)

_VALUE_ERROR = 3  # exit status of the child for a ValueError (its message on the last line of stderr)


def draw_windows(
    tokenizer_dir: Path, calibration: Optional[dict], evaluation: Optional[dict],
    trust_remote_code: bool = False, work_dir: Optional[Path] = None, gguf: Optional[Path] = None,
) -> dict[str, torch.Tensor]:
    """`calibration`: calibration_windows' keyword arguments (source_spec, nsamples, seqlen,
    seed, chat_template) plus `bos` ("auto", "true", "false"; default auto); `evaluation`:
    evaluation_windows' (source_spec, n_windows, seqlen) plus `bos`. `work_dir`: where the
    exchange files go (the system's temporary folder when None). `gguf`: a GGUF file whose
    vocabulary the tokenizer must read as llama.cpp does (tokenizer_check.against_gguf).
    The tokenizer is checked first (a round trip of a probe text, for every model).
    Returns {"calibration": ..., "evaluation": ...} for those asked, for each the BOS id its
    windows start with as "calibration_bos" / "evaluation_bos" (a 0-dim tensor, -1: none), and
    with calibration "calibration_text": int64 [documents, tokens] of the text its windows were
    drawn from."""
    from safetensors.torch import load_file

    if work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="compress-windows-"))
    else:
        tmp = make_partial(Path(work_dir), ".compress-windows.partial-")
    try:
        spec = {
            "tokenizer": str(tokenizer_dir), "trust_remote_code": trust_remote_code,
            "gguf": str(gguf) if gguf else None,
            "calibration": calibration, "evaluation": evaluation, "out": str(tmp / "windows.safetensors"),
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = run_child([sys.executable, "-m", "compress.data.draw", str(spec_path)])
        if proc.returncode == _VALUE_ERROR:
            from compress.config import ConfigError

            raise ConfigError(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0:  # a failure of ours: its traceback goes to the debug log only
            log.debug("the window-drawing child's stderr:\n%s", proc.stderr)
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"drawing the token windows failed (exit {proc.returncode}): {last}")
        return load_file(spec["out"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(spec_path: str) -> int:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from compress.data.windows import calibration_draw, evaluation_windows

    spec = json.loads(Path(spec_path).read_text())
    out = {}
    try:
        key = "model.source"
        try:
            tok = AutoTokenizer.from_pretrained(spec["tokenizer"], trust_remote_code=spec["trust_remote_code"])
        except (OSError, ValueError) as e:  # no or broken tokenizer files in the model folder
            raise ValueError(f"{spec['tokenizer']}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
        key = "model.tokenizer"
        _check_tokenizer(tok, spec["tokenizer"], spec["gguf"])
        if spec["calibration"]:
            key = "calibration.dataset"
            args = dict(spec["calibration"])
            bos = _bos_id(tok, args.pop("bos", "auto"), "calibration.bos")
            drawn = calibration_draw(tok, **args, bos_id=bos)
            out["calibration"] = drawn.windows
            out["calibration_bos"] = torch.tensor(-1 if bos is None else bos)
            # what the windows were drawn from, for the log and the manifest
            out["calibration_text"] = torch.tensor([drawn.documents, drawn.tokens], dtype=torch.int64)
        if spec["evaluation"]:
            key = "evaluate.dataset"
            args = dict(spec["evaluation"])
            bos = _bos_id(tok, args.pop("bos", "auto"), "evaluate.bos")
            out["evaluation"] = evaluation_windows(tok, **args, bos_id=bos)
            out["evaluation_bos"] = torch.tensor(-1 if bos is None else bos)
    except ValueError as e:
        msg = " ".join(str(e).split())
        section = key.split(".")[0] + "."
        print(msg if msg.startswith((section, key)) else f"{key}: {msg}", file=sys.stderr)
        return _VALUE_ERROR
    save_file({k: v.contiguous() for k, v in out.items()}, spec["out"])
    return 0


def _check_tokenizer(tok, where: str, gguf: Optional[str]) -> None:
    from compress.models.tokenizer_check import against_gguf, problem_message, round_trip

    problem = round_trip(tok)
    if problem is None and gguf:
        from compress.models.gguf_vocab import read_vocab

        vocab = read_vocab(Path(gguf))
        problem = against_gguf(tok, vocab) if vocab else None
    if problem:
        raise ValueError(problem_message(f"the tokenizer of {where}", problem))


def _bos_id(tok, mode: str, key: str) -> Optional[int]:
    """The token each window starts with: the tokenizer's BOS where it adds one by default
    (auto), always (true; an error if it has none) or never (false)."""
    from compress.models.tokenizer_check import adds_bos

    if mode == "false":
        return None
    if mode == "true":
        if tok.bos_token_id is None:
            raise ValueError(f"{key}: true, but the tokenizer has no BOS token; use auto or false")
        return tok.bos_token_id
    return adds_bos(tok)


if __name__ == "__main__":
    die_with_parent()
    sys.exit(_main(sys.argv[1]))
