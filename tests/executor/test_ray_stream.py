"""`executor.artifacts: stream`: artifacts written in a worker's scratch folder and streamed back
in chunks (compress/executor/stream.py). The same bytes as `shared` mode; a worker killed
mid-stream is started again or leaves nothing that looks complete; a corrupted chunk is refused.
The chunk size is cut to 64 KiB so the tiny model's artifacts take several chunks."""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from compress.executor import stream
from compress.executor.stream import Receiver, StreamError, artifact_files, send_folder
from compress.config import parse_config
from compress.formats.writer import MANIFEST, is_complete
from compress.pipeline import run
from test_ray import TWO, _run, cluster, kill, rows  # noqa: F401 (cluster: the module's Ray fixture)
from tiny_models import run_config

ray = pytest.importorskip("ray")
STREAM = {"kind": "ray", "artifacts": "stream", "max_retries": 1}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64 * 1024)


# Added by the driver's report stage after the run: the comparison rows, timing columns included.
RESULTS = "compress-results.json"


def files(folder: Path) -> dict[str, str]:
    """sha256 of every file of an artifact; the manifest by its outputs (its `created` differs per run)."""
    got = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, RESULTS)}
    got[MANIFEST] = {k: v for k, v in json.loads((folder / MANIFEST).read_text())["outputs"].items() if k != RESULTS}
    return got


def scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(stream.SCRATCH + "*"))


@pytest.fixture(scope="module")
def shared_two(cluster, model_dir, text_file, tmp_path_factory) -> Path:  # noqa: F811
    kill(cluster)
    out = tmp_path_factory.mktemp("shared") / "out"
    _run(model_dir, text_file, out, candidates=TWO, executor={"kind": "ray"})
    return out


def test_streamed_artifacts_are_the_bytes_shared_mode_writes(cluster, shared_two, model_dir, text_file,  # noqa: F811
                                                             tmp_path):
    kill(cluster)
    before = scratch_folders()
    out = tmp_path / "stream"
    _run(model_dir, text_file, out, candidates=TWO, executor=STREAM)
    for name in ("rtn-w4-g64", "rtn-w8-ch"):
        assert is_complete(out / name, check_hashes=True)
        assert files(out / name) == files(shared_two / name)
    assert rows(out) == rows(shared_two)
    tasks = json.loads((out / "comparison.json").read_text())["executor"]["tasks"]
    for name, t in tasks.items():
        # every file but the results, and the manifest as it was before the report added them
        size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.name not in (RESULTS, MANIFEST))
        assert size < t["artifact_bytes"] < size + (out / name / MANIFEST).stat().st_size
        assert size > 2 * 64 * 1024  # several chunks
        assert t["bytes_from_task"] > size and t["attempts"] == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rtn-w4-g64", "rtn-w8-ch"]
    assert scratch_folders() <= before  # the workers removed their scratch folders
    assert "MiB artifact streamed" in (out / "comparison.md").read_text()


def test_a_worker_killed_mid_stream_starts_again_and_completes(cluster, shared_two, model_dir, text_file,  # noqa: F811
                                                               tmp_path):
    kill(cluster, **{"rtn-w4-g64@stream": 1})
    out = tmp_path / "stream"
    ctx = _run(model_dir, text_file, out, candidates=TWO, executor=STREAM)
    assert (cluster.parent / "rtn-w4-g64@stream.kills").read_text() == "1"
    assert not any(r.error for r in ctx.candidates.values())
    assert files(out / "rtn-w4-g64") == files(shared_two / "rtn-w4-g64")
    tasks = json.loads((out / "comparison.json").read_text())["executor"]["tasks"]
    assert tasks["rtn-w4-g64"]["attempts"] == 2 and tasks["rtn-w8-ch"]["attempts"] == 1
    assert not list(out.glob(".*.partial-*"))  # the broken stream's folder was removed


def test_a_worker_killed_mid_stream_more_often_than_retried_leaves_nothing(cluster, model_dir, text_file,  # noqa: F811
                                                                          tmp_path):
    kill(cluster, **{"rtn-w4-g64@stream": 5})
    out = tmp_path / "stream"
    ctx = _run(model_dir, text_file, out, candidates=TWO, executor={**STREAM, "max_retries": 0})
    assert (cluster.parent / "rtn-w4-g64@stream.kills").read_text() == "1"
    err = ctx.candidates["rtn-w4-g64"].error
    assert err and "died 1 time(s)" in err and "max_retries: 0" in err
    assert not (out / "rtn-w4-g64").exists() and not list(out.glob(".*.partial-*"))
    assert is_complete(out / "rtn-w8-ch", check_hashes=True)
    assert {r["name"]: r for r in rows(out)}["rtn-w4-g64"]["status"] == "failed"


def test_a_corrupted_chunk_is_refused(cluster, model_dir, text_file, tmp_path):  # noqa: F811
    kill(cluster, **{"rtn-w4-g64@corrupt": 1})
    out = tmp_path / "stream"
    ctx = _run(model_dir, text_file, out, candidates=TWO, executor=STREAM)
    err = ctx.candidates["rtn-w4-g64"].error
    assert err and err.startswith("StreamError: rtn-w4-g64: ") and "sha256" in err and "refusing" in err
    assert not (out / "rtn-w4-g64").exists() and not list(out.glob(".*.partial-*"))
    assert is_complete(out / "rtn-w8-ch", check_hashes=True)
    tasks = json.loads((out / "comparison.json").read_text())["executor"]["tasks"]
    assert tasks["rtn-w4-g64"]["attempts"] == 1  # not a dead worker: not started again


@pytest.mark.parametrize("quantize,export", [
    ({"bits": 8, "group_size": 32}, {"format": "gguf", "gguf_type": "Q8_0"}),
    ({"bits": 4, "group_size": 32, "sym": False}, {"format": "onnx", "dtype": "float32"}),
], ids=["gguf", "onnx"])
def test_a_streamed_multi_file_artifact_is_what_a_local_run_writes(cluster, model_dir, text_file, tmp_path,  # noqa: F811
                                                                   quantize, export):
    if export["format"] == "onnx":
        pytest.importorskip("onnxruntime")
    kill(cluster)
    # A GGUF file is evaluated in llama.cpp where it is installed, by the local run and the task alike
    runtime = "auto" if export["format"] == "gguf" else "torch"
    sections = dict(quantize=quantize, export=export, evaluate={"windows": 2, "gguf_runtime": runtime})
    local = _run(model_dir, text_file, tmp_path / "local", **sections)
    (name,) = local.candidates
    remote = _run(model_dir, text_file, tmp_path / "stream", executor=STREAM, **sections)
    big = max((tmp_path / "local" / name).rglob("*"), key=lambda p: p.stat().st_size)
    assert big.suffix in (".gguf", ".data") and big.stat().st_size > 2 * 64 * 1024  # the data file took chunks
    assert files(tmp_path / "stream" / name) == files(tmp_path / "local" / name)
    got, want = rows(tmp_path / "stream"), rows(tmp_path / "local")
    assert [{k for k in a if a.get(k) != b.get(k)} for a, b in zip(got, want)] == [set()] * len(want)
    if export["format"] == "gguf":
        from compress.evaluate.llamacpp import available

        assert remote.candidates[name].metrics.runtime == local.candidates[name].metrics.runtime == \
            ("llama.cpp" if available() else "torch")


@pytest.mark.parametrize("artifacts", ["stream", "shared"])
def test_a_resumed_sweep_keeps_finished_candidates_and_runs_the_failed_one(cluster, shared_two, model_dir,  # noqa: F811
                                                                           text_file, tmp_path, artifacts):
    """--resume after a sweep where one candidate failed: the finished one is kept (not run or
    streamed again), the failed one runs, and the result is the uninterrupted run's."""
    executor = {"kind": "ray", "artifacts": artifacts, "max_retries": 0}
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", candidates=TWO, executor=executor))
    out = tmp_path / "out"
    kill(cluster, **{"rtn-w4-g64": 5})  # its worker dies at block 1, and no retry is allowed
    first = run(cfg)
    assert first.candidates["rtn-w4-g64"].error and not (out / "rtn-w4-g64").exists()
    weights = out / "rtn-w8-ch" / "model.safetensors"
    before = weights.stat()
    kill(cluster)
    ctx = run(cfg, resume=True)
    assert not any(r.error for r in ctx.candidates.values())
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # kept, not rewritten
    for name in ("rtn-w4-g64", "rtn-w8-ch"):
        assert is_complete(out / name, check_hashes=True)
        assert files(out / name) == files(shared_two / name)
    assert rows(out) == rows(shared_two)
    tasks = json.loads((out / "comparison.json").read_text())["executor"]["tasks"]
    if artifacts == "shared":  # the failed candidate's stored block 0 is on the shared folder too
        assert tasks["rtn-w4-g64"]["resumed_at_block"] == 1
    else:  # its blocks were in the dead worker's scratch folder: it starts again from block 0
        assert tasks["rtn-w4-g64"]["resumed_at_block"] is None
        assert tasks["rtn-w8-ch"]["kept_finished"] and "artifact_bytes" not in tasks["rtn-w8-ch"]
        assert tasks["rtn-w4-g64"]["attempts"] == 1 and tasks["rtn-w4-g64"]["artifact_bytes"] > 0
        assert "rtn-w8-ch: kept from the interrupted run" in (out / "comparison.md").read_text()
    assert not (out / ".resume").exists()  # nothing left to resume


def _items(folder: Path, chunk: int) -> list[dict]:
    listed = artifact_files(folder)
    return [{"result": {"name": "a", "artifact": "a"}, "files": listed}, *send_folder(folder, listed, chunk)]


@pytest.fixture
def artifact(tmp_path) -> Path:
    """A sealed folder with a nested file, as a writer leaves it (manifest over the other files)."""
    folder = tmp_path / "src" / "a"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)) * 1000)
    (folder / "config.json").write_text("{}\n")
    outputs = {rel: {"bytes": (folder / rel).stat().st_size,
                     "sha256": hashlib.sha256((folder / rel).read_bytes()).hexdigest()}
               for rel in ("config.json", "sub/data.bin")}
    (folder / MANIFEST).write_text(json.dumps({"outputs": outputs}))
    return folder


def test_a_receiver_writes_the_folder_manifest_last_and_seals_it(artifact, tmp_path):
    items = _items(artifact, 10_000)
    assert [i["end"] for i in items if "end" in i] == ["config.json", "sub/data.bin", MANIFEST]
    assert max(len(i["data"]) for i in items if "data" in i) == 10_000
    r = Receiver(tmp_path / "out", "a", overwrite=False)
    for item in items:
        r.take(item)
    assert r.seal() == tmp_path / "out" / "a" and r.bytes == sum(s for _, s in artifact_files(artifact))
    assert files(tmp_path / "out" / "a") == files(artifact)
    assert is_complete(tmp_path / "out" / "a", check_hashes=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"]


@pytest.mark.parametrize("fault,message", [
    ("flip", "sub/data.bin arrived with 256000 bytes and sha256"),
    ("extra", "sub/data.bin is longer than the 256000 bytes announced"),
    ("manifest", "sub/data.bin differs between the manifest and the files streamed"),
    ("short", "the stream ended after 2 of 3 file(s)"),
])
def test_a_receiver_refuses_a_stream_that_does_not_add_up(artifact, tmp_path, fault, message):
    if fault == "manifest":  # the worker's disk changed a file after the manifest was written
        (artifact / "sub" / "data.bin").write_bytes(b"\0" * 256000)
    items = _items(artifact, 10_000)
    k = next(i for i, item in enumerate(items) if "data" in item and len(item["data"]) == 10_000)
    if fault == "flip":
        data = items[k + 1]["data"].copy()
        data[5] ^= 0x10
        items[k + 1] = {"data": data}
    elif fault == "extra":
        items.insert(k + 1, {"data": items[k]["data"][:1]})
    elif fault == "short":
        items = items[: -2]  # the manifest never arrives
    r = Receiver(tmp_path / "out", "a", overwrite=False)
    with pytest.raises(StreamError, match="^a: " + message.replace("(", r"\(").replace(")", r"\)")):
        for item in items:
            r.take(item)
        r.seal()
    assert list((tmp_path / "out").iterdir())[0].name.startswith(".a.partial-")  # never complete-looking
    r.abort()
    assert list((tmp_path / "out").iterdir()) == []

