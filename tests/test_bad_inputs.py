"""Bad inputs through the real CLI (issue 14): each one exits 2 with exactly one `error: ...` line
that names the key path or file, and no traceback.

One table: every row builds its bad input around a tiny random Llama (tests/tiny_models.py) and
returns the CLI arguments plus the fragments its error line must contain. Rows marked
`subprocess` run `python -m compress.cli` in a fresh process (what a user's shell sees); the rest
run in-process through click's CliRunner, which lets a row monkeypatch (no GPU, a full disk).
Rows marked `preflight` must fail before any work: the output folder is never created.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from compress.cli import main
from tiny_models import run_config

ROOT = Path(__file__).resolve().parents[1]
CANDIDATE = "rtn-w4-g64"  # the one candidate of run_config's defaults


class Env:
    """What a row builds with: a scratch folder, the tiny model and text, and monkeypatch."""

    def __init__(self, tmp: Path, model: Path, text: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp, self.model, self.text, self.mp = tmp, model, text, monkeypatch
        self.out = tmp / "out"
        self.cleanups: list[Callable[[], None]] = []

    def config(self, **sections) -> dict:
        """run_config with evaluation off (the fast path) unless a row turns it on."""
        cfg = run_config(self.model, self.text, self.out, evaluate={"enabled": False})
        for key, values in sections.items():
            cfg[key] = {**cfg.get(key, {}), **values}
        return cfg

    def write(self, data, name: str = "run.yaml") -> str:
        path = self.tmp / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
        return str(path)

    def run(self, *extra: str, **sections) -> list[str]:
        return ["run", self.write(self.config(**sections)), *extra]

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.model, self.tmp / name))

    def edit_config_json(self, folder: Path, **changes) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))

    def edit_weights(self, folder: Path, **tensors: torch.Tensor) -> Path:
        path = folder / "model.safetensors"
        state = load_file(str(path))
        state.update({k.replace("__", "."): v for k, v in tensors.items()})
        save_file(state, str(path), metadata={"format": "pt"})
        return path

    def mount_tmpfs(self, options: str) -> Path | None:
        """A tmpfs mounted with `options` (root only; None where mounting is not possible)."""
        where = self.tmp / "mnt"
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return None
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            return None
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(where)], capture_output=True))
        return where


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Env], tuple[list[str], list[str]]]  # -> CLI args, fragments of the error line
    preflight: bool = False
    subprocess: bool = False


CASES: list[Case] = []


def case(name: str, preflight: bool = False, subprocess: bool = False):
    def add(fn):
        CASES.append(Case(name, fn, preflight, subprocess))
        return fn
    return add


# ---- the config file and --set ------------------------------------------------------------

@case("config_not_utf8", preflight=True, subprocess=True)
def _(env):
    path = env.tmp / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(env.config()).encode() + "# caf\xe9\n".encode("latin-1"))
    return ["run", str(path)], [str(path), "not UTF-8"]


@case("config_is_a_folder", preflight=True)
def _(env):
    return ["validate", str(env.tmp)], [str(env.tmp), "is a folder"]


@case("config_empty", preflight=True)
def _(env):
    return ["run", env.write("")], ["model: required key is missing"]


@case("config_yaml_syntax", preflight=True)
def _(env):
    path = env.write("model:\n  source: [unclosed\n")
    return ["validate", path], [path, "not valid YAML", "line"]


@case("config_duplicate_key", preflight=True)
def _(env):
    text = yaml.safe_dump(env.config()) + "quantize:\n  bits: 8\n"  # a second `quantize:` section
    return ["run", env.write(text)], ["quantize: duplicate key", "run.yaml", "line"]


@case("config_duplicate_nested_key", preflight=True)
def _(env):
    path = env.write(f"model:\n  source: {env.model}\n  device: cpu\n  device: cuda\n")
    return ["validate", path], ["model.device: duplicate key", "line 4", "first on line 3"]


@case("set_on_a_list_config", preflight=True, subprocess=True)
def _(env):
    return ["validate", env.write("- model\n- quantize\n"), "--set", "quantize.bits=4"], ["(top level)", "--set"]


@case("set_value_not_yaml", preflight=True)
def _(env):
    return env.run("--set", "quantize.skip=[lm_head"), ["quantize.skip", "not valid YAML"]


@case("set_empty_key_part", preflight=True)
def _(env):
    return env.run("--set", "quantize..bits=4"), ["quantize..bits", "empty part"]


@case("set_without_equals", preflight=True)
def _(env):
    return env.run("--set", "quantize.bits"), ["quantize.bits", "expected key.path=value"]


# ---- model ----------------------------------------------------------------------------------

@case("device_cuda_without_gpu", preflight=True)
def _(env):
    env.mp.setattr(torch.cuda, "is_available", lambda: False)
    return env.run(model={"device": "cuda"}), ["model.device", "no CUDA device"]


@case("cache_dir_is_a_file", preflight=True)
def _(env):
    blocker = env.tmp / "cache"
    blocker.write_text("not a folder")
    return env.run(model={"cache_dir": str(blocker)}), ["model.cache_dir", str(blocker)]


@case("cache_dir_under_a_file", preflight=True)
def _(env):
    blocker = env.tmp / "cache"
    blocker.write_text("not a folder")
    return env.run(model={"cache_dir": str(blocker / "sub")}), ["model.cache_dir", str(blocker)]


@case("model_folder_without_config_json", preflight=True)
def _(env):
    folder = env.model_copy()
    (folder / "config.json").unlink()
    return env.run(model={"source": str(folder)}), ["model.source", str(folder), "no config.json"]


@case("config_json_is_a_list", preflight=True)
def _(env):
    folder = env.model_copy()
    (folder / "config.json").write_text("[1, 2]")
    return env.run(model={"source": str(folder)}), [str(folder / "config.json"), "JSON object"]


@case("config_json_not_utf8", preflight=True)
def _(env):
    folder = env.model_copy()
    (folder / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    return env.run(model={"source": str(folder)}), [str(folder / "config.json"), "not UTF-8"]


@case("config_json_bad_json", preflight=True)
def _(env):
    folder = env.model_copy()
    (folder / "config.json").write_text('{"model_type": "llama",')
    return env.run(model={"source": str(folder)}), [str(folder / "config.json"), "not valid JSON"]


@case("config_json_shape_mismatch")
def _(env):
    folder = env.model_copy()
    env.edit_config_json(folder, intermediate_size=192)  # the checkpoint's MLP is 256 wide
    return env.run(model={"source": str(folder)}), [
        str(folder / "model.safetensors"), "mlp.", "[256, 128]", "[192, 128]"]


@case("integer_weight")
def _(env):
    folder = env.model_copy()
    name = "model.layers.1.self_attn.o_proj.weight"
    path = env.edit_weights(folder, **{name.replace(".", "__"): torch.ones(128, 128, dtype=torch.int32)})
    return env.run(model={"source": str(folder)}), [str(path), name, "I32", "floating-point"]


@case("nan_weight")
def _(env):
    folder = env.model_copy()
    name = "model.layers.1.mlp.down_proj.weight"
    w = load_file(str(folder / "model.safetensors"))[name]
    w[3, 5] = float("nan")
    path = env.edit_weights(folder, **{name.replace(".", "__"): w})
    return env.run(model={"source": str(folder)}), [str(path), name, "NaN or Inf"]


@case("inf_embedding")
def _(env):
    folder = env.model_copy()
    name = "model.embed_tokens.weight"
    w = load_file(str(folder / "model.safetensors"))[name]
    w[7, 0] = float("inf")
    path = env.edit_weights(folder, **{name.replace(".", "__"): w})
    return env.run(model={"source": str(folder)}), [str(path), name, "NaN or Inf"]


@case("safetensors_header_garbage", preflight=False)
def _(env):
    folder = env.model_copy()
    path = folder / "model.safetensors"
    path.write_bytes((64).to_bytes(8, "little") + b"{not json at all" + b"\0" * 100)
    return env.run(model={"source": str(folder)}), [str(path), "not a valid safetensors file"]


def _gguf_bytes(path: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@case("gguf_truncated", preflight=True)
def _(env):
    path = env.tmp / "tiny.gguf"
    path.write_bytes(_gguf_bytes(path)[:-100])
    return env.run(model={"source": str(path)}), [str(path), "truncated"]


@case("gguf_not_gguf", preflight=True)
def _(env):
    path = env.tmp / "fake.gguf"
    path.write_text("hello, not a GGUF file")
    return env.run(model={"source": str(path)}), [str(path), "not a GGUF file"]


@case("gguf_file_missing_in_folder", preflight=True)
def _(env):
    return env.run(model={"gguf_file": "nope.gguf"}), ["model.gguf_file", "nope.gguf"]


# ---- calibration and evaluation text (the windows are drawn in a child process) -------------

@case("evaluate_windows_huge")
def _(env):
    return env.run(evaluate={"enabled": True, "windows": 100_000}), ["evaluate.windows=100000"]


@case("calibration_nsamples_huge")
def _(env):
    return env.run(quantize={"method": "gptq"}, calibration={"nsamples": 1_000_000}), [
        "calibration.nsamples=1000000", "distinct windows"]


@case("calibration_nsamples_beyond_memory")
def _(env):
    return env.run(quantize={"method": "gptq"}, calibration={"dataset": "random-tokens", "nsamples": 10**12}), [
        "calibration.nsamples=1000000000000", "memory"]


@case("calibration_text_empty", preflight=True)
def _(env):
    empty = env.tmp / "empty.txt"
    empty.write_text("")
    return env.run(calibration={"dataset": str(empty)}), ["calibration.dataset", str(empty), "empty"]


@case("calibration_text_not_utf8")
def _(env):
    bad = env.tmp / "latin1.txt"
    bad.write_bytes(env.text.read_bytes() + "\n\ncaf\xe9 au lait\n".encode("latin-1"))
    return env.run(quantize={"method": "gptq"}, calibration={"dataset": str(bad)}), [
        "calibration.dataset", str(bad), "not UTF-8"]


@case("evaluate_jsonl_without_text_field")
def _(env):
    data = env.tmp / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in env.text.read_text().split("\n\n")))
    return env.run(evaluate={"enabled": True, "dataset": str(data)}), [
        "evaluate.dataset", str(data), "no field 'text'"]


@case("model_folder_without_tokenizer")
def _(env):
    folder = env.model_copy()
    for p in folder.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()
    return env.run(model={"source": str(folder)}, evaluate={"enabled": True}), [
        "model.source", str(folder), "tokenizer"]


# ---- output ---------------------------------------------------------------------------------

@case("output_dir_under_a_file", preflight=True)
def _(env):
    blocker = env.tmp / "blocker"
    blocker.write_text("a file")
    env.out = blocker / "out"
    return env.run(), ["export.output_dir", str(blocker)]


@case("output_dir_is_a_file", preflight=True)
def _(env):
    env.out = env.tmp / "out.txt"
    env.out.write_text("a file")
    return env.run(), ["export.output_dir", str(env.out), "is a file"]


@case("output_dir_read_only", preflight=True)
def _(env):
    mnt = env.mount_tmpfs("ro,size=64k")
    if mnt is None:
        if os.geteuid() == 0:
            pytest.skip("root without mount(8): no way to make a folder read-only")
        mnt = env.tmp / "mnt"
        mnt.chmod(0o555)
        env.cleanups.append(lambda: mnt.chmod(0o755))
    env.out = mnt / "out"
    return env.run(), ["export.output_dir", str(mnt), "read-only" if os.geteuid() == 0 else "not writable"]


class _FullDiskFile:
    """A file whose writes fail as on a full disk (the fallback where no tmpfs can be mounted)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@case("output_disk_full")
def _(env):
    mnt = env.mount_tmpfs("size=16k")  # the tiny Llama's weights are ~1 MB
    if mnt is None:
        from compress.formats import writer

        def full_open(path, mode="r", *a, **k):
            f = builtins.open(path, mode, *a, **k)
            return _FullDiskFile(f) if "w" in mode else f

        env.mp.setattr(writer, "open", full_open, raising=False)
        mnt = env.tmp
    env.out = mnt / "out"
    return env.run(), ["export.output_dir", str(env.out), "No space left on device"]


@case("output_candidate_folder_not_empty")
def _(env):
    (env.out / CANDIDATE).mkdir(parents=True)
    (env.out / CANDIDATE / "notes.txt").write_text("mine")
    return env.run(), [str(env.out / CANDIDATE), "not empty", "export.overwrite: true"]


# ---- serving --------------------------------------------------------------------------------

@case("serving_gpus_missing", preflight=True)
def _(env):
    missing = env.tmp / "gpus.yaml"
    return env.run(serving={"gpus": str(missing)}), ["serving.gpus", str(missing), "not found"]


@case("serving_gpus_bad_yaml", preflight=True)
def _(env):
    bad = env.tmp / "gpus.yaml"
    bad.write_text("gpus: [ {name: a, memory_gb: 8\n")
    return env.run(serving={"gpus": str(bad)}), ["serving.gpus", str(bad), "not valid YAML (line 2, column 1"]


@case("serving_gpus_memory_not_a_number", preflight=True)
def _(env):
    bad = env.tmp / "gpus.yaml"
    bad.write_text("gpus:\n  - {name: a, memory_gb: lots}\n")
    return env.run(serving={"gpus": str(bad)}), ["serving.gpus", "gpus.0.memory_gb", "must be a number"]


# ---- compress inspect -----------------------------------------------------------------------

@case("inspect_bad_config_json", subprocess=True)
def _(env):
    folder = env.model_copy()
    (folder / "config.json").write_text("{oops")
    return ["inspect", str(folder)], [str(folder / "config.json"), "not valid JSON"]


@case("inspect_config_json_is_a_list")
def _(env):
    folder = env.model_copy()
    (folder / "config.json").write_text("[]")
    return ["inspect", str(folder)], [str(folder / "config.json"), "JSON object"]


@case("inspect_bad_manifest")
def _(env):
    folder = env.model_copy()
    (folder / "compress-manifest.json").write_text("{")
    return ["inspect", str(folder)], [str(folder / "compress-manifest.json"), "not a valid JSON manifest"]


@case("inspect_missing_path")
def _(env):
    return ["inspect", str(env.tmp / "nowhere")], [str(env.tmp / "nowhere"), "does not exist"]


@pytest.fixture
def env(tmp_path, model_dir, text_file, monkeypatch):
    e = Env(tmp_path, model_dir("llama"), text_file, monkeypatch)
    yield e
    for undo in reversed(e.cleanups):
        undo()


def _invoke(args: list[str], fresh_process: bool) -> tuple[int, str, str]:
    if fresh_process:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run([sys.executable, "-m", "compress.cli", "-q", *args],
                              capture_output=True, text=True, env=env, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    res = CliRunner().invoke(main, ["-q", *args])
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_it(case: Case, env: Env):
    args, fragments = case.build(env)
    code, stdout, stderr = _invoke(args, case.subprocess)
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    missing = [f for f in fragments if f not in lines[0]]
    assert not missing, (missing, lines[0])
    assert not (env.out / CANDIDATE / "compress-manifest.json").exists()
    if case.preflight:
        assert not env.out.exists() or env.out.is_file(), "failed after work began"
