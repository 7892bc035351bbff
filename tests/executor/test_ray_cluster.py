"""An address-based Ray cluster: `ray start --head` and a second node (`ray start --address`)
in other processes, each with 1 CPU, and `compress compare --ray ADDRESS` with 1 thread per
task: the two candidates run at once, one on each node. The nodes are stopped by their PIDs
(`ray start --block` stops its raylet and workers on SIGTERM), not by `ray stop`, which would
end every Ray process of this user on the machine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny_models import run_config

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # Token auth would need the token file shared between the nodes; these are all local.
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}


def _cpus(address: str) -> float:
    got = subprocess.run([str(RAY), "status", "--address", address], env=_env(), capture_output=True, text=True)
    for line in got.stdout.splitlines():
        if line.strip().endswith(" CPU") and "/" in line:
            return float(line.split("/")[1].split()[0])
    return 0.0


@pytest.fixture
def two_nodes(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
    procs = [subprocess.Popen([str(RAY), "start", "--head", "--port", str(port), "--include-dashboard=false", *common],
                              env=_env(), stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 90
        while _cpus(address) < 1:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        procs.append(subprocess.Popen([str(RAY), "start", "--address", address, *common], env=_env(),
                                      stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT))
        while _cpus(address) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # `ray start --head` records its address for ray.init(); `ray stop` would remove it
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


@pytest.mark.slow
def test_compare_spreads_candidates_over_the_nodes_of_an_address(two_nodes, model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = run_config(model_dir("llama"), text_file, out, candidates=[{"bits": 4, "group_size": 64},
                                                                   {"bits": 8, "group_size": -1}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    got = subprocess.run([sys.executable, "-m", "compress.cli", "-q", "compare", str(tmp_path / "c.yaml"),
                          "--ray", two_nodes, "--set", "executor.threads=1"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    comp = json.loads((out / "comparison.json").read_text())
    tasks = comp["executor"]["tasks"]
    assert comp["executor"]["address"] == two_nodes
    assert {t["threads"] for t in tasks.values()} == {1}
    assert len({t["node"]["node_id"] for t in tasks.values()}) == 2  # one candidate per 1-CPU node
    rows = {r["name"]: r for r in comp["rows"]}
    assert {rows[n]["node"].split(":")[1] for n in tasks} == {t["node"]["node_id"][:8] for t in tasks.values()}
    assert all(rows[n]["status"] == "ok" for n in tasks)
