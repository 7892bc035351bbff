"""Runs that are killed or fail leave nothing behind that outlives them, and two runs never share
an output folder.

Real `compress run` processes are signalled at fixed points: at block 1 of the export (both
blocks handed to the writer, manifest not yet written), or while the child that draws the token
windows is paused (a shim around the real `compress.data.draw` child that reports its PID after
`die_with_parent` and then sleeps). Only test code is patched, inside the killed process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from compress.config import parse_config
from compress.formats.writer import is_complete
from compress.lock import LOCK, OutputBusy, OutputLock
from compress.owner import OWNER, _start_ticks, make_partial, owner_gone, owner_record, sweep_dead
from compress.pipeline import run
from tiny_models import make_model, make_tokenizer, run_config, save_model

NAME = "rtn-w4-g64"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# argv: where (export|calibrate), signal name (export only), config path, ready file (calibrate only)
_RUNNER = textwrap.dedent("""
    import os, signal, sys, time
    where, sig, config, ready = sys.argv[1:5]
    if where == "export":
        from compress.stages import export
        add_block = export.Exporter.add_block
        def signalled(self, i, block, qweights):
            add_block(self, i, block, qweights)
            if i == 1:
                os.kill(os.getpid(), getattr(signal, sig))
                time.sleep(60)  # SIGTERM's handler raises in here
        export.Exporter.add_block = signalled
    else:
        from compress.children import run_child
        from compress.data import draw
        shim = os.path.join(os.path.dirname(ready), "draw_shim.py")
        # cmd is [python, -m, compress.data.draw, SPEC]: run the same module under the shim
        draw.run_child = lambda cmd: run_child([sys.executable, shim, ready, *cmd[3:]])
    from compress.cli import main
    main(["run", config])
""")

_DRAW_SHIM = textwrap.dedent("""
    import os, runpy, sys, time
    import compress.children as children
    real = children.die_with_parent
    def pausing():
        real()
        ready = sys.argv.pop(1)
        with open(ready + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(ready + ".tmp", ready)
        time.sleep(120)
    children.die_with_parent = pausing
    runpy.run_module("compress.data.draw", run_name="__main__", alter_sys=True)
""")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(cond, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.1)


def write_config(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def start(tmp_path: Path, where: str, config: Path, sig: str = "-") -> subprocess.Popen:
    ready = tmp_path / "draw-child.pid"
    (tmp_path / "draw_shim.py").write_text(_DRAW_SHIM)
    return subprocess.Popen([sys.executable, "-c", _RUNNER, where, sig, str(config), str(ready)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def paused_draw_child(tmp_path: Path, proc: subprocess.Popen) -> int:
    """PID of `proc`'s draw child, once it is paused after asking to die with its parent."""
    ready = tmp_path / "draw-child.pid"
    wait_for(lambda: ready.exists() or proc.poll() is not None, 120, "the draw child")
    assert ready.exists(), proc.communicate()[1]
    child = int(ready.read_text())
    assert parent_of(child) == proc.pid
    return child


def partials(out: Path) -> list[Path]:
    return sorted(out.glob(".*.partial-*"))


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def plant(parent: Path, prefix: str, **record) -> Path:
    """A partial folder whose owner record is this process's with `record`'s changes."""
    folder = make_partial(parent, prefix)
    (folder / "weights.bin").write_bytes(b"x" * 1000)
    (folder / OWNER).write_text(json.dumps({**owner_record(), **record}))
    return folder


@pytest.fixture
def reaper():
    """`reaper(pid)`: killed at teardown if still running (the same process: its start time is
    compared), so a failing test leaves no process behind."""
    started: list[tuple[int, int]] = []
    yield lambda pid: started.append((pid, _start_ticks(pid)))
    for pid, ticks in started:
        if alive(pid) and _start_ticks(pid) == ticks:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fast_cfg(model_dir, text_file):
    """RTN without evaluation: load, quantize, export (no draw child), a second or two."""
    return lambda out: parse_config(run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False}))


# -- owner records -----------------------------------------------------------------------------

def test_owner_gone_only_for_a_dead_or_replaced_process_of_this_host(tmp_path):
    mine = plant(tmp_path, ".a.partial-")
    dead = plant(tmp_path, ".b.partial-", pid=dead_pid())
    reused = plant(tmp_path, ".c.partial-", start=owner_record()["start"] - 1)  # my PID, another start
    elsewhere = plant(tmp_path, ".d.partial-", pid=dead_pid(), host=socket.gethostname() + "-other")
    unknown = make_partial(tmp_path, ".e.partial-")
    (unknown / OWNER).unlink()
    assert [owner_gone(f) for f in (mine, dead, reused, elsewhere, unknown)] == [False, True, True, False, False]
    assert sweep_dead(tmp_path) == [dead, reused]
    assert sorted(tmp_path.iterdir()) == [mine, elsewhere, unknown]


def test_lock_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputBusy, match=f"PID {os.getpid()} on {socket.gethostname()}"):
            with OutputLock(out):
                pass
    assert not out.exists()  # created by the lock, left empty: removed again
    out.mkdir()
    with OutputLock(out):
        pass
    assert out.is_dir() and leftovers(out) == []


# -- failures inside the run -------------------------------------------------------------------

def test_exporter_constructor_failure_leaves_no_partial(text_file, tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    src = save_model(model, tmp_path / "nan-model", make_tokenizer())
    out = tmp_path / "out"
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False}))
    with pytest.raises(ValueError, match="model.norm.weight"):
        run(cfg)
    assert leftovers(out) == []


def test_gguf_conversion_is_atomic_and_sweeps_dead_partials(model_dir, tmp_path, monkeypatch):
    import transformers

    from compress.models.gguf import convert_gguf

    import gguf as gguf_pkg

    gguf = tmp_path / "tiny.gguf"  # a complete GGUF header (preflight reads it); the load is faked
    writer = gguf_pkg.GGUFWriter(str(gguf), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cache = tmp_path / "cache"
    dead = plant(cache / "gguf", ".tiny-0-v2.partial-", pid=dead_pid())
    live = plant(cache / "gguf", ".tiny-1-v2.partial-")
    loads = []

    def from_pretrained(*a, **k):
        loads.append(1)
        if len(loads) == 1:
            raise RuntimeError("killed mid-conversion")
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir("llama")))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer())
    with pytest.raises(RuntimeError, match="mid-conversion"):
        convert_gguf(gguf, cache)
    assert partials(cache / "gguf") == [live]  # the dead run's removed, ours cleaned up, the live one kept
    target = convert_gguf(gguf, cache)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert not (target / OWNER).exists()
    assert sorted((cache / "gguf").iterdir()) == [live, target]
    assert not dead.exists()


# -- killed processes --------------------------------------------------------------------------

def test_concurrent_run_exits_2_at_once_and_sigterm_cleans_up(model_dir, text_file, tmp_path, reaper):
    out = tmp_path / "out"
    config = write_config(tmp_path, run_config(model_dir("llama"), text_file, out))
    first = start(tmp_path, "calibrate", config)
    reaper(first.pid)
    child = paused_draw_child(tmp_path, first)
    reaper(child)
    assert [p.name.startswith(".compress-windows.partial-") for p in partials(out)] == [True]

    second = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(config)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"is in use by another compress run (PID {first.pid} on " in second.stderr
    assert "stage load" not in second.stderr  # refused before loading anything

    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert "interrupted" in err
    assert not alive(child)
    assert leftovers(out) == []  # no windows folder, no lock file; the folder it made is gone


def test_sigkill_while_drawing_kills_the_child_and_next_run_sweeps(model_dir, text_file, tmp_path, fast_cfg, reaper):
    out = tmp_path / "out"
    proc = start(tmp_path, "calibrate", write_config(tmp_path, run_config(model_dir("llama"), text_file, out)))
    reaper(proc.pid)
    child = paused_draw_child(tmp_path, proc)
    reaper(child)
    proc.kill()
    proc.wait(timeout=30)
    wait_for(lambda: not alive(child), 10, f"draw child {child} to die with its parent")
    (left,) = partials(out)
    assert json.loads((left / OWNER).read_text())["pid"] == proc.pid

    # Another run's work in progress (its owner alive) is kept, the dead run's partial is not.
    sleeper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from compress.owner import make_partial
        print(make_partial(Path({str(out)!r}), ".other.partial-"), flush=True)
        time.sleep(120)
    """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        other = Path(sleeper.stdout.readline().strip())
        ctx = run(fast_cfg(out))
        assert is_complete(ctx.candidates[NAME].artifact, check_hashes=True)
        assert partials(out) == [other]
        assert not (out / LOCK).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sweep_dead(out) == [other]


def test_sigkill_during_export_leaves_a_partial_the_next_run_removes(model_dir, text_file, tmp_path, fast_cfg):
    out = tmp_path / "out"
    config = write_config(tmp_path, run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False}))
    proc = start(tmp_path, "export", config, "SIGKILL")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    (left,) = partials(out)
    assert left.name.startswith(f".{NAME}.partial-") and (left / ".spill").stat().st_size > 100_000
    assert json.loads((left / OWNER).read_text())["pid"] == proc.pid

    ctx = run(fast_cfg(out))
    assert is_complete(ctx.candidates[NAME].artifact, check_hashes=True)
    assert partials(out) == []
    assert not (out / NAME / OWNER).exists()


def test_sigterm_during_export_exits_130_leaving_nothing(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, run_config(model_dir("llama"), text_file, out, evaluate={"enabled": False}))
    proc = start(tmp_path, "export", config, "SIGTERM")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert leftovers(out) == [".resume"]  # the finished blocks, for --resume (tests/test_resume.py)
