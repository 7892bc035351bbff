"""An interrupted run leaves nothing that looks like an artifact, and a rerun succeeds.

Interruptions at block 1 of 2: an exception, Ctrl-C (KeyboardInterrupt) and SIGKILL of a
real `compress run` process (no Python cleanup at all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from compress.config import parse_config
from compress.formats.writer import MANIFEST, is_complete
from compress.pipeline import preflight, run
from compress.stages import export as export_stage
from tiny_models import run_config

NAME = "rtn-w4-g64"


def fail_at_block_1(monkeypatch, exc: BaseException) -> list[int]:
    """Make the exporter raise `exc` when block 1 arrives; returns the blocks it received."""
    seen: list[int] = []
    add_block = export_stage.Exporter.add_block

    def flaky(self, i, block, qweights):
        seen.append(i)
        if i == 1:
            raise exc
        return add_block(self, i, block, qweights)

    monkeypatch.setattr(export_stage.Exporter, "add_block", flaky)
    return seen


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize("exc", [RuntimeError("boom at block 1"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_run_leaves_no_artifact_and_rerun_succeeds(exc, model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = parse_config(run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False}))
    seen = fail_at_block_1(monkeypatch, exc)
    with pytest.raises(type(exc)):
        run(cfg)
    assert seen == [0, 1]  # block 0 was written before the failure
    assert not (out / NAME).exists()
    # The temporary folder is removed too: Ctrl-C cleans up like any other failure.
    assert [n for n in leftovers(out) if ".partial-" in n] == []

    monkeypatch.undo()
    ctx = run(cfg)
    assert ctx.candidates[NAME].artifact == out / NAME
    assert is_complete(out / NAME, check_hashes=True)


def test_one_failed_candidate_does_not_stop_the_others(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = parse_config(run_config(
        model_dir("llama"), text_file, out, evaluate={"enabled": False},
        candidates=[{"name": "a", "bits": 8, "group_size": -1}, {"name": "b", "bits": 4}],
    ))
    add_block = export_stage.Exporter.add_block

    def flaky(self, i, block, qweights):
        if self.out_dir.name == "a" and i == 1:
            raise RuntimeError("candidate a breaks")
        return add_block(self, i, block, qweights)

    monkeypatch.setattr(export_stage.Exporter, "add_block", flaky)
    ctx = run(cfg)
    assert ctx.candidates["a"].error == "RuntimeError: candidate a breaks"
    assert ctx.candidates["a"].artifact is None
    assert not (out / "a").exists()
    assert is_complete(out / "b", check_hashes=True)
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["a"]["error"] == "FAILED: RuntimeError: candidate a breaks"
    assert "error" not in rows["b"]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from compress.stages import export
    add_block = export.Exporter.add_block
    def killed(self, i, block, qweights):
        add_block(self, i, block, qweights)
        if i == 1:  # both blocks handed over, shards on disk, manifest not yet written
            os.kill(os.getpid(), signal.SIGKILL)
    export.Exporter.add_block = killed
    from compress.cli import main
    sys.exit(main(["-q", "run", sys.argv[1]]))
""")


@pytest.mark.slow
def test_sigkill_leaves_only_a_partial_folder_that_is_not_an_artifact(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    data = run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False},
                      export={"max_shard_bytes": 200_000})  # several shards reach the disk
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not (out / NAME).exists()
    partial = [out / n for n in leftovers(out) if n.startswith(f".{NAME}.partial-")]
    assert len(partial) == 1, leftovers(out)
    assert any(partial[0].rglob("*")) and not (partial[0] / MANIFEST).exists()
    assert not is_complete(partial[0])

    # The leftover neither blocks a rerun nor is mistaken for the finished candidate.
    cfg = parse_config(data)
    assert [p.name for p in preflight(cfg, out)] == [NAME]
    ctx = run(cfg)
    assert ctx.candidates[NAME].artifact == out / NAME
    assert is_complete(out / NAME, check_hashes=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows[1:]] == [NAME]


@pytest.mark.parametrize("mode,spooled", [("auto", True), ("disk", True), ("memory", False)])
def test_calibration_activations_go_where_the_config_says(mode, spooled, model_dir, text_file, tmp_path, monkeypatch):
    """On CPU, `auto` and `disk` spool GPTQ's calibration stream to an unlinked file in the
    output folder; `memory` keeps it in RAM. A run that fails mid-walk leaves no spool file."""
    import compress.activations as act

    made: list[str] = []
    real = act.tempfile.mkstemp

    def mkstemp(*a, **k):
        made.append(k["dir"])
        return real(*a, **k)

    monkeypatch.setattr(act.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "out"
    cfg = parse_config(run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False},
                                  quantize={"method": "gptq"}, calibration={"activations": mode}))
    fail_at_block_1(monkeypatch, RuntimeError("boom at block 1"))
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    assert made == ([out] if spooled else [])
    assert leftovers(out) == [".resume"]  # block 0 kept for --resume; the spool file is gone


def test_gptq_runs_with_equal_settings_give_identical_weights(model_dir, text_file, tmp_path):
    """Determinism: same inputs, same thread count and packages -> the same weight bytes (the
    manifest records the settings the bytes depend on)."""
    import hashlib

    def weights(out: Path) -> dict[str, str]:
        cfg = parse_config(run_config(model_dir("llama"), text_file, out, quantize={"method": "gptq"},
                                      evaluate={"enabled": False}))
        art = run(cfg).candidates["gptq-w4-g64"].artifact
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(art.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}

    first, second = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(n.endswith(".safetensors") for n in first)
    assert first == second
