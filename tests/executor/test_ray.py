"""Candidates as Ray tasks on a local cluster started here (`ray.init(num_cpus=2)`): the same
safetensors and comparison rows as a local run, and a worker killed mid-candidate (retried and
completed from its stored blocks, or listed as failed once retries are exhausted)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from compress.config import parse_config
from compress.formats.writer import is_complete
from compress.pipeline import run
from tiny_models import run_config

ray = pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent
# Measured per run, so never equal between two runs, and where it ran (host, or host:Ray node
# id); everything else in a row must be equal.
TIMING = {"quantize_seconds", "prefill_tokens_per_s", "decode_tokens_per_s", "serving_peak_rss_mb", "node"}
# g256 fails on the tiny model; GPTQ's bytes follow the thread count (RTN's would not show a
# task running with other threads); mse_clip off keeps it fast.
SWEEP = {"method": ["rtn", "gptq"], "bits": [4], "group_size": [64, 256], "mse_clip": [False]}
TWO = [{"bits": 4, "group_size": 64}, {"bits": 8, "group_size": -1}]  # rtn-w4-g64, rtn-w8-ch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU Ray cluster whose workers run tests/executor/ray_faults.py at start-up."""
    if ray.is_initialized():
        ray.shutdown()
    faults = tmp_path_factory.mktemp("faults") / "plan.json"
    root = HERE.parents[1]
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "COMPRESS_RAY_FAULTS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), str(HERE)])
    os.environ["COMPRESS_RAY_FAULTS"] = str(faults)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_faults.install"})
    yield faults
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def kill(faults: Path, **times: int) -> None:
    """Plan the kills of the next run: candidate name -> attempts to kill (counts start at 0)."""
    for p in faults.parent.glob("*.kills"):
        p.unlink()
    faults.write_text(json.dumps(times))


@pytest.fixture(scope="module")
def local_sweep(model_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    _run(model_dir, text_file, out, sweep=SWEEP)
    return out


def hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*.safetensors"))}


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in json.loads((out / "comparison.json").read_text())["rows"]]


def _run(model_dir, text_file, out: Path, **sections):
    return run(parse_config(run_config(model_dir("llama"), text_file, out, **sections)))


def test_a_ray_sweep_writes_what_a_local_sweep_writes(cluster, local_sweep, model_dir, text_file, tmp_path):
    local, remote = local_sweep, tmp_path / "ray"
    kill(cluster)
    ctx = _run(model_dir, text_file, remote, sweep=SWEEP, executor={"kind": "ray"})
    assert set(hashes(local)) == {"rtn-w4-g64/model.safetensors", "gptq-w4-g64/model.safetensors"}
    assert hashes(remote) == hashes(local)
    assert rows(remote) == rows(local)  # failed g256 rows included
    comp = json.loads((remote / "comparison.json").read_text())
    tasks = comp["executor"]["tasks"]
    assert set(tasks) == {"rtn-w4-g64", "gptq-w4-g64"}  # the failed plans never left the driver
    for t in tasks.values():
        assert t["node"]["node_id"] == ray.get_runtime_context().get_node_id()
        assert t["threads"] == comp["executor"]["threads_per_task"] == t["resources"]["num_cpus"]
        assert t["bytes_to_task"] >= sum(comp["executor"]["shared_object_bytes"].values())
    node = tasks["gptq-w4-g64"]["node"]
    assert ctx.candidates["gptq-w4-g64"].node == f"{node['host']}:{node['node_id'][:8]}"
    assert "Ran as Ray tasks" in (remote / "comparison.md").read_text()


def test_a_killed_worker_is_retried_and_continues_from_its_stored_blocks(cluster, local_sweep, model_dir,
                                                                         text_file, tmp_path):
    kill(cluster, **{"rtn-w4-g64": 1})
    out = tmp_path / "ray"
    ctx = _run(model_dir, text_file, out, candidates=TWO, executor={"kind": "ray", "max_retries": 1})
    assert (cluster.parent / "rtn-w4-g64.kills").read_text() == "1"  # the first attempt was killed
    assert not any(r.error for r in ctx.candidates.values())
    name = "rtn-w4-g64/model.safetensors"  # the same plan as the local sweep's: the same bytes
    assert hashes(out)[name] == hashes(local_sweep)[name]
    ours, theirs = ({r["name"]: r for r in rows(o)}["rtn-w4-g64"] for o in (out, local_sweep))
    assert {k: ours[k] for k in ("perplexity", "kl_divergence", "top1_agreement", "bytes")} == \
        {k: theirs[k] for k in ("perplexity", "kl_divergence", "top1_agreement", "bytes")}
    tasks = json.loads((out / "comparison.json").read_text())["executor"]["tasks"]
    assert tasks["rtn-w4-g64"]["resumed_at_block"] == 1 and tasks["rtn-w8-ch"]["resumed_at_block"] is None
    # The dead worker's partial folder was removed; nothing but the two artifacts remains.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rtn-w4-g64", "rtn-w8-ch"]


def test_a_worker_killed_more_often_than_retried_fails_only_its_candidate(cluster, model_dir, text_file, tmp_path):
    kill(cluster, **{"rtn-w4-g64": 5})
    out = tmp_path / "ray"
    ctx = _run(model_dir, text_file, out, candidates=TWO, executor={"kind": "ray", "max_retries": 1})
    assert (cluster.parent / "rtn-w4-g64.kills").read_text() == "2"  # first try and one retry
    err = ctx.candidates["rtn-w4-g64"].error
    assert err and "died 2 time(s)" in err and "max_retries: 1" in err
    assert ctx.candidates["rtn-w8-ch"].error is None and is_complete(out / "rtn-w8-ch", check_hashes=True)
    assert not (out / "rtn-w4-g64").exists()  # nothing that looks like an artifact
    row = {r["name"]: r for r in rows(out)}["rtn-w4-g64"]
    assert row["status"] == "failed" and "died" in row["error"]


def test_tasks_run_in_the_clusters_workers_when_those_import_this_compress(cluster):
    """A one-node cluster started here inherits PYTHONPATH: asked once, tasks need no runtime_env
    of their own (which would make Ray start another worker process); on a larger cluster this
    process's PYTHONPATH goes with every task, its entries made absolute."""
    from compress.executor.ray_run import worker_env

    assert worker_env(ray, [{"CPU": 2}]) is None
    entries = os.environ["PYTHONPATH"].split(os.pathsep)
    assert worker_env(ray, [{"CPU": 2}, {"CPU": 2}]) == {
        "env_vars": {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in entries)}}

