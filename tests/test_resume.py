"""`--resume`: a run interrupted anywhere continues from its last finished block and writes the
same artifact, byte for byte, as a run that was never interrupted; changed inputs are refused.

Interruptions are raised in this process (`Killed`, a BaseException that no stage handles, as
an uncatchable kill would be) at points patched in by the tests, or delivered to a real
`compress run` process as SIGKILL or SIGTERM by a runner script that patches only test code.
One uninterrupted reference run per method is shared by the module. Drawn token windows are
memoized per input (drawing is a pure function of them; the child process costs seconds).
"""
from __future__ import annotations

import inspect
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from compress import pipeline
from compress.config import ConfigError, parse_config
from compress.formats.writer import ArtifactWriter, is_complete
from compress.resume import STORE, CandidateStore
from compress.resume_io import read_header
from compress.stages import quantize as quantize_stage
from tiny_models import make_model, run_config, save_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
GPTQ, RTN, AWQ = "gptq-w4-g64", "rtn-w4-g64", "awq-w4-g64"
BLOCKS = 3
LINEARS = 7  # q, k, v, o, gate, up, down per Llama block
# Files whose content carries the time of the run; compared without those fields.
_MANIFEST, _RESULTS = "compress-manifest.json", "compress-results.json"


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no candidate is marked failed and the run stops."""


@pytest.fixture(scope="module")
def model3(tmp_path_factory) -> Path:
    """A Llama of three blocks: a first, a middle and a last one."""
    return save_model(make_model("llama", num_hidden_layers=BLOCKS), tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module", autouse=True)
def memo_draws():
    from compress.data import draw

    real, seen = draw.draw_windows, {}

    signature = inspect.signature(real)

    def memo(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        # the windows depend on everything but where the exchange files go
        key = repr([(k, sorted(v.items()) if isinstance(v, dict) else str(v))
                    for k, v in bound.arguments.items() if k != "work_dir"])
        if key not in seen:
            seen[key] = real(*args, **kwargs)
        return {k: v.clone() for k, v in seen[key].items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(draw, "draw_windows", memo)
        yield


# The slowest searches turned down: they do not touch what is stored or restored.
_FAST = {"gptq": {"mse_clip": False}, "awq": {"grid": 4}, "rtn": {}}


def config(model: Path, text: Path, out: Path, method: str = "gptq", **sections) -> dict:
    # Small shards, so the artifact has several and a kill can fall between two of them.
    quantize = {"method": method, **_FAST[method], **sections.pop("quantize", {})}
    return run_config(model, text, out, quantize=quantize,
                      export={"max_shard_bytes": 200_000, **sections.pop("export", {})}, **sections)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of an artifact; the manifest and results without their timestamps,
    timings and output folder (what differs between two uninterrupted runs into two folders)."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == _MANIFEST:
            m = json.loads(data)
            m.pop("created")
            m["config"]["export"].pop("output_dir")
            m["outputs"].pop(_RESULTS, None)
            data = json.dumps(m, sort_keys=True).encode()
        elif p.name == _RESULTS:
            r = json.loads(data)
            for row in r["rows"]:
                row.pop("quantize_seconds", None)
            data = json.dumps(r, sort_keys=True).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def layer_reports(out: Path) -> dict:
    """Per-layer errors of results.json, without the seconds each took."""
    layers = json.loads((out / "results.json").read_text())["layers"]
    return {n: [{k: v for k, v in rep.items() if k != "seconds"} for rep in reps] for n, reps in layers.items()}


@pytest.fixture(scope="module")
def reference(model3, text_file, tmp_path_factory):
    """`reference(method)`: the output folder of an uninterrupted run (made once per method)."""
    made: dict[str, Path] = {}

    def get(method: str, **sections) -> Path:
        key = method + json.dumps(sections, sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp(f"reference-{method}") / "out"
            pipeline.run(parse_config(config(model3, text_file, out, method, **sections)))
            assert not (out / STORE).exists()  # a finished run leaves no store
            made[key] = out
        return made[key]

    return get


def assert_same(out: Path, ref: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert is_complete(out / name, check_hashes=True)
        assert digest(out / name) == digest(ref / name), name
    assert layer_reports(out) == layer_reports(ref)
    assert not (out / STORE).exists()
    assert sorted(out.glob(".*.partial-*")) == []


# -- kill points, in this process -------------------------------------------------------------

def _after_stage(mp, stage: str) -> None:
    mp.setattr(pipeline, "STAGES", [
        (n, _then_kill(f)) if n == stage else (n, f) for n, f in pipeline.STAGES])


def _then_kill(f):
    def run(ctx):
        f(ctx)
        raise Killed(f"after {f.__name__}")
    return run


def _at_layer(mp, call: int) -> None:
    """Killed as the `call`-th linear (counting from 1 over all blocks) is quantized."""
    real, seen = quantize_stage._quantize_layer, []

    def layer(*a, **k):
        seen.append(1)
        if len(seen) == call:
            raise Killed(f"quantizing layer {a[0]}")
        return real(*a, **k)
    mp.setattr(quantize_stage, "_quantize_layer", layer)


def _after_progress(mp, next_block: int) -> None:
    real = CandidateStore.save_progress

    def save(self, nxt, *a, **k):
        real(self, nxt, *a, **k)
        if nxt == next_block:
            raise Killed(f"after block {nxt - 1}")
    mp.setattr(CandidateStore, "save_progress", save)


def _before_rename(mp) -> None:
    def move(self):
        raise Killed("manifest written, folder not yet in place")
    mp.setattr(ArtifactWriter, "_move_into_place", move)


def _before_done(mp) -> None:
    def mark_done(self, record):
        raise Killed("artifact in place, not yet recorded as done")
    mp.setattr(CandidateStore, "mark_done", mark_done)


def _at_evaluate(mp) -> None:
    def evaluate(ctx):
        raise Killed("evaluating")
    mp.setattr(pipeline, "STAGES", [(n, evaluate if n == "evaluate" else f) for n, f in pipeline.STAGES])


def _at_seal(mp) -> None:
    from compress.formats import seal

    def seal_json(*a, **k):
        raise Killed("sealing the results")
    mp.setattr(seal, "seal_json", seal_json)


# point: (patch, what the resumed run says, whether the artifact was complete at the kill)
POINTS = {
    "load": (lambda mp: _after_stage(mp, "load"), "no store", False),
    "calibrate": (lambda mp: _after_stage(mp, "calibrate"), "no store", False),
    "block-0": (lambda mp: _at_layer(mp, 3), "no store", False),  # nothing finished yet
    "block-1": (lambda mp: _at_layer(mp, LINEARS + 4), "at block 1", False),
    "after-block-1": (lambda mp: _after_progress(mp, 2), "at block 2", False),
    "last-block": (lambda mp: _at_layer(mp, (BLOCKS - 1) * LINEARS + 5), f"at block {BLOCKS - 1}", False),
    "before-rename": (_before_rename, f"at block {BLOCKS}", False),
    "after-rename": (_before_done, f"at block {BLOCKS}", True),  # rewritten from the stored blocks
    "evaluate": (_at_evaluate, "finished", True),
    "report": (_at_seal, "finished", True),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_gptq_run_resumes_byte_identical(point, model3, text_file, tmp_path, monkeypatch, caplog, reference):
    ref = reference("gptq")
    out = tmp_path / "out"
    cfg = parse_config(config(model3, text_file, out))
    patch, expect, complete = POINTS[point]
    with monkeypatch.context() as mp:
        patch(mp)
        with pytest.raises(Killed):
            pipeline.run(cfg)
    finished = is_complete(out / GPTQ)
    assert finished == complete
    state = read_header(out / STORE / GPTQ / "state.rec")
    spent = state[0]["seconds"] if state else 0.0  # the interrupted run's quantization time
    shard = out / GPTQ / sorted(p.name for p in (ref / GPTQ).glob("*.safetensors"))[0]
    before = shard.stat() if finished else None
    caplog.set_level(logging.INFO, logger="compress")
    pipeline.run(cfg, resume=True)
    assert_same(out, ref, (GPTQ,))
    row = json.loads((out / "results.json").read_text())["rows"][1]
    assert row["quantize_seconds"] > spent  # counted, not restarted
    log = caplog.text
    if expect == "no store":
        assert "no resume store" in log
    elif expect == "finished":
        assert f"{GPTQ} was finished by the interrupted run" in log and "resuming" not in log
        after = shard.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    else:
        assert f"resuming {GPTQ} {expect} of {BLOCKS}" in log


@pytest.mark.parametrize("method,name,patch", [
    ("rtn", RTN, lambda mp: _after_progress(mp, 2)),
    ("awq", AWQ, lambda mp: _at_layer(mp, LINEARS + 4)),
], ids=["rtn-after-block-1", "awq-in-block-1"])
def test_other_methods_resume_byte_identical(method, name, patch, model3, text_file, tmp_path, monkeypatch,
                                            caplog, reference):
    out = tmp_path / "out"
    cfg = parse_config(config(model3, text_file, out, method))
    with monkeypatch.context() as mp:
        patch(mp)
        with pytest.raises(Killed):
            pipeline.run(cfg)
    caplog.set_level(logging.INFO, logger="compress")
    pipeline.run(cfg, resume=True)
    assert f"resuming {name} at block" in caplog.text
    assert_same(out, reference(method), (name,))


def test_compare_keeps_finished_candidates_and_resumes_the_next(model3, text_file, tmp_path, monkeypatch,
                                                                 caplog, reference):
    cands = [{"name": "w8", "method": "rtn", "bits": 8, "group_size": -1}, {"name": "w4", "bits": 4}]
    out = tmp_path / "out"
    cfg = parse_config(config(model3, text_file, out, candidates=cands))
    with monkeypatch.context() as mp:
        real = CandidateStore.save_progress

        def save(self, nxt, *a, **k):
            if self.name == "w8" or nxt != 2:
                return real(self, nxt, *a, **k)
            real(self, nxt, *a, **k)
            raise Killed("w4 after block 1")
        mp.setattr(CandidateStore, "save_progress", save)
        with pytest.raises(Killed):
            pipeline.run(cfg)
    assert is_complete(out / "w8") and not (out / "w4").exists()
    caplog.set_level(logging.INFO, logger="compress")
    pipeline.run(cfg, resume=True)
    assert "w8 was finished by the interrupted run" in caplog.text
    assert "resuming w4 at block 2" in caplog.text
    assert_same(out, reference("gptq", candidates=cands), ("w8", "w4"))


# -- changed inputs, torn records, runs without --resume -----------------------------------------

def _killed_at_block_1(cfg) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _after_progress(mp, 2)
        with pytest.raises(Killed):
            pipeline.run(cfg)


def test_changed_inputs_are_refused_naming_them(model3, text_file, tmp_path, reference):
    out = tmp_path / "out"
    data = config(model3, text_file, out)
    _killed_at_block_1(parse_config(data))
    store = sorted(p.relative_to(out).as_posix() for p in (out / STORE).rglob("*"))

    def refused(changed: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            pipeline.run(parse_config(changed), resume=True)
        assert sorted(p.relative_to(out).as_posix() for p in (out / STORE).rglob("*")) == store

    refused({**data, "quantize": {**data["quantize"], "damp_percent": 0.1}},
            r"^--resume: the config changed since the interrupted run \(quantize\.damp_percent: 0\.05 -> 0\.1\); "
            r"rerun without --resume$")
    refused({**data, "quantize": {**data["quantize"], "bits": 3}}, r"\(quantize\.bits: 4 -> 3\)")
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text().replace("river", "ocean"))
    refused({**data, "calibration": {**data["calibration"], "dataset": str(other_text)}},
            r"^--resume: the calibration windows changed since the interrupted run \(sha256 \w{12} -> \w{12}\)")
    edited = tmp_path / "edited-model"
    model = make_model("llama", num_hidden_layers=BLOCKS)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    save_model(model, edited)
    refused({**data, "model": {**data["model"], "source": str(edited)}},
            r"^--resume: the model files changed since the interrupted run \(model\.safetensors\)")

    pipeline.run(parse_config(data), resume=True)  # unchanged: resumes
    assert_same(out, reference("gptq"), (GPTQ,))


def test_torn_records_are_ignored(model3, text_file, tmp_path, caplog, reference):
    caplog.set_level(logging.INFO, logger="compress")
    out = tmp_path / "gptq"
    cfg = parse_config(config(model3, text_file, out))
    _killed_at_block_1(cfg)
    state = out / STORE / GPTQ / "state.rec"  # holds the activations that feed block 2
    state.write_bytes(state.read_bytes()[:-100])  # cut short
    pipeline.run(cfg, resume=True)
    assert f"resume store of {GPTQ}: no readable progress record; starting it from block 0" in caplog.text
    assert_same(out, reference("gptq"), (GPTQ,))

    # Same length, one byte changed: only the digest can tell.
    out = tmp_path / "rtn"
    cfg = parse_config(config(model3, text_file, out, "rtn"))
    _killed_at_block_1(cfg)
    block = out / STORE / RTN / "block-00000.rec"
    raw = bytearray(block.read_bytes())
    raw[len(raw) // 2] ^= 1
    block.write_bytes(bytes(raw))
    caplog.clear()
    pipeline.run(cfg, resume=True)
    assert f"resume store of {RTN}: the record of block 0 is torn or missing; starting from block 0" in caplog.text
    assert_same(out, reference("rtn"), (RTN,))


def test_a_run_without_resume_discards_the_store(model3, text_file, tmp_path, caplog, reference):
    out = tmp_path / "out"
    cfg = parse_config(config(model3, text_file, out, "rtn"))
    _killed_at_block_1(cfg)
    assert (out / STORE / RTN / "block-00001.rec").is_file()
    caplog.set_level(logging.INFO, logger="compress")
    pipeline.run(cfg)
    assert "removing the resume store of an earlier run" in caplog.text
    assert "resuming" not in caplog.text
    assert_same(out, reference("rtn"), (RTN,))


# -- real processes: SIGKILL and SIGTERM ------------------------------------------------------

# argv: point, then the CLI's arguments
_RUNNER = textwrap.dedent("""
    import os, signal, sys, time
    point = sys.argv[1]
    from compress import resume
    from compress.formats import writer
    if point == "mid-shard":  # SIGKILL while the exporter spills block 1 into a shard
        add = writer.ArtifactWriter.add_tensor_chunks
        calls = []
        def chunks(self, *a, **k):
            calls.append(1)
            if len(calls) == 35:  # 3 tensors outside the blocks, 23 per block
                os.kill(os.getpid(), signal.SIGKILL)
            return add(self, *a, **k)
        writer.ArtifactWriter.add_tensor_chunks = chunks
    elif point == "torn-record":  # SIGKILL halfway through writing block 1's record
        write = resume.write_record
        def torn(path, header, payload=(), payload_bytes=0):
            if header.get("kind") == "block" and header["index"] == 1:
                whole = payload
                def cut():
                    for c in whole:
                        yield bytes(c[: len(c) // 2])
                        os.kill(os.getpid(), signal.SIGKILL)
                payload = cut()
            return write(path, header, payload, payload_bytes)
        resume.write_record = torn
    elif point == "sigterm":  # SIGTERM once block 1 is stored
        save = resume.CandidateStore.save_progress
        def saved(self, nxt, *a, **k):
            save(self, nxt, *a, **k)
            if nxt == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # the handler raises in here
        resume.CandidateStore.save_progress = saved
    from compress.cli import main
    main(sys.argv[2:])
""")


def cli(point: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUNNER, point, *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("point,code,at", [("mid-shard", -signal.SIGKILL, 1), ("torn-record", -signal.SIGKILL, 1),
                                           ("sigterm", 130, 2)])
def test_killed_process_resumes_byte_identical(point, code, at, model3, text_file, tmp_path, reference):
    """RTN without evaluation: no draw child, so each process costs little more than its imports."""
    out = tmp_path / "out"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(model3, text_file, out, "rtn", evaluate={"enabled": False})))
    killed = cli(point, "run", str(path))
    assert killed.returncode == code, killed.stderr
    assert not (out / RTN).exists()
    if point == "mid-shard":
        (partial,) = out.glob(f".{RTN}.partial-*")  # the dead run's; the resumed run removes it
    if point == "torn-record":
        assert [p.name[:19] for p in (out / STORE / RTN).glob(".tmp-*")] == [".tmp-block-00001.rec"[:19]]
    if point == "sigterm":
        assert "run again with --resume to continue from the last finished block" in killed.stderr
        refused = cli("-", "-q", "run", str(path), "--resume", "--set", "export.dtype=bfloat16")
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            'error: --resume: the config changed since the interrupted run (export.dtype: "float16" -> '
            '"bfloat16"); rerun without --resume')
    resumed = cli("-", "run", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {RTN} at block {at} of {BLOCKS}" in resumed.stderr
    assert_same(out, reference("rtn", evaluate={"enabled": False}), (RTN,))


def test_changed_input_names_versions_and_files():
    from compress.resume import changed_input

    fp = {"compress version": "0.4.0", "package versions": {"torch": "2.5.0", "transformers": "4.50.0"},
          "runtime settings": {"device": "cpu", "torch_threads": 2, "deterministic_algorithms": False},
          "model files": {"model.safetensors": "aa", "config.json": "bb"}, "calibration windows": None,
          "config": {"model.dtype": "float32", "candidates": [{"name": "a", "bits": 8}, {"name": "b", "bits": 4}]}}

    def changed(**edits) -> str:
        new = json.loads(json.dumps(fp))
        for key, value in edits.items():
            new[key.replace("_", " ")] = value
        return changed_input(fp, new)

    assert changed_input(fp, fp) is None
    assert changed(compress_version="0.5.0") == (
        'the compress version changed since the interrupted run (compress version: "0.4.0" -> "0.5.0")')
    assert changed(package_versions={"torch": "2.6.0", "transformers": "4.50.0"}) == (
        'the package versions changed since the interrupted run (package versions.torch: "2.5.0" -> "2.6.0")')
    assert changed(runtime_settings={"device": "cpu", "torch_threads": 4, "deterministic_algorithms": False}) == (
        "the runtime settings changed since the interrupted run (runtime settings.torch_threads: 2 -> 4)")
    assert changed(model_files={"model.safetensors": "aa", "config.json": "cc"}) == (
        "the model files changed since the interrupted run (config.json)")
    cands = [{"name": "a", "bits": 8}, {"name": "b", "bits": 3}]
    assert changed(config={"model.dtype": "float32", "candidates": cands}) == (
        "the config changed since the interrupted run (candidates.1.bits: 4 -> 3)")
    assert changed(config={"model.dtype": "float32", "candidates": cands[:1]}) == (
        "the config changed since the interrupted run (candidates: 2 -> 1 candidates)")


@pytest.mark.parametrize("command", ["run", "compare"])
def test_both_commands_take_resume(command):
    from click.testing import CliRunner

    from compress.cli import main

    got = CliRunner().invoke(main, [command, "--help"])
    assert got.exit_code == 0 and "--resume" in got.output


def test_the_sweep_of_dead_runs_leaves_the_store(tmp_path):
    """A store outlives the run that wrote it by design; only `run` keeps or discards it."""
    from compress.owner import make_partial, sweep_dead

    (tmp_path / STORE / GPTQ).mkdir(parents=True)
    (tmp_path / STORE / GPTQ / "block-00000.rec").write_bytes(b"x")
    dead = make_partial(tmp_path, f".{GPTQ}.partial-")
    # above the kernel's largest PID (pid_max is at most 2**22): a process that cannot exist
    (dead / ".owner.json").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "start": 1}))
    assert sweep_dead(tmp_path) == [dead]
    assert (tmp_path / STORE / GPTQ / "block-00000.rec").is_file()


@pytest.mark.parametrize("kill", ["in-block-1", "in-head"])
def test_gptq_head_resumes_byte_identical(kill, model3, text_file, tmp_path, monkeypatch, caplog, reference):
    """A GPTQ-rounded head reads the last block's outputs: the store keeps them, so a run killed
    while rounding the head resumes after the last block and writes the same artifact."""
    from compress.stages import head as head_stage

    head = {"quantize": {"lm_head": {"bits": 4, "group_size": 32}}, "export": {"format": "onnx", "dtype": "float32"}}
    name = "gptq-w4-g64-head4g32"
    out = tmp_path / "out"
    cfg = parse_config(config(model3, text_file, out, **json.loads(json.dumps(head))))
    with monkeypatch.context() as mp:
        if kill == "in-head":
            def round_head(*a, **k):
                raise Killed("rounding the head")
            mp.setattr(head_stage, "round_head", round_head)
        else:
            _at_layer(mp, LINEARS + 4)
        with pytest.raises(Killed):
            pipeline.run(cfg)
    caplog.set_level(logging.INFO, logger="compress")
    pipeline.run(cfg, resume=True)
    at = BLOCKS if kill == "in-head" else 1
    assert f"resuming {name} at block {at} of {BLOCKS}" in caplog.text
    ref = reference("gptq", **json.loads(json.dumps(head)))
    assert json.loads((ref / name / _MANIFEST).read_text())["quantization"]["lm_head"]["method"] == "gptq"
    assert_same(out, ref, (name,))
