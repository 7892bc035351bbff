"""ArtifactWriter: atomic placement, sharding, hashes, refusal of NaN and of clobbering."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.formats.writer import MANIFEST, ArtifactWriter, is_complete


def tensors(n: int, size: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"layers.{i}.w": torch.randn(size, generator=g) for i in range(n)}


def test_single_shard_and_manifest_hashes(tmp_path: Path) -> None:
    out = tmp_path / "model"
    t = tensors(3)
    with ArtifactWriter(out) as w:
        w.add_tensors(t)
        w.add_file("tokenizer.json", b'{"v": 1}')
        w.finish({"model_type": "llama"}, {"run": "x"})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["compress-manifest.json", "config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in t.items())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["run"] == "x"
    assert set(manifest["outputs"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    for rel, info in manifest["outputs"].items():
        data = (out / rel).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert is_complete(out, check_hashes=True)
    assert not list(tmp_path.glob(".model.partial-*"))


def test_sharding_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "m"
    t = tensors(10)  # 1 KiB each
    with ArtifactWriter(out, max_shard_bytes=3000) as w:
        for i in range(0, 10, 3):  # block-streaming style: a few tensors at a time
            w.add_tensors({k: t[k] for k in list(t)[i:i + 3]})
        w.finish({}, {})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    # 3000 bytes hold two 1 KiB tensors: 10 tensors make 5 shards
    assert shards == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 1024
    assert set(index["weight_map"]) == set(t)
    for name, fname in index["weight_map"].items():
        assert torch.equal(load_file(str(out / fname))[name], t[name])
    for p in out.glob("*.safetensors"):
        assert p.stat().st_size < 3000 + 1024  # header overhead only
    assert is_complete(out, check_hashes=True)


def test_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(out, max_shard_bytes=1000) as w:
            w.add_tensors(tensors(4))  # shards already on disk
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_simulated_kill_never_looks_complete(tmp_path: Path) -> None:
    out = tmp_path / "m"
    w = ArtifactWriter(out, max_shard_bytes=1000)
    w.add_tensors(tensors(4))
    # The process dies here: no finish(), no abort(), no context-manager exit.
    assert not out.exists()
    assert not is_complete(out)
    partial = list(tmp_path.glob(".m.partial-*"))
    assert partial == [w.tmp_dir]
    assert not (w.tmp_dir / MANIFEST).exists()
    # A later run writes the same artifact normally beside the leftover.
    with ArtifactWriter(out) as w2:
        w2.add_tensors(tensors(1))
        w2.finish({}, {})
    assert is_complete(out)


def test_nan_and_inf_are_refused_by_name(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "m") as w:
        with pytest.raises(ValueError, match="layers.7.bad"):
            w.add_tensors({"layers.7.bad": torch.tensor([1.0, float("nan")])})
        with pytest.raises(ValueError, match="inf_one"):
            w.add_tensors({"inf_one": torch.tensor([float("-inf")], dtype=torch.float16)})
        w.abort()
    assert not (tmp_path / "m").exists()


def test_refuses_to_clobber_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ArtifactWriter(out)
    assert (out / "keep.txt").read_text() == "precious"
    with ArtifactWriter(out, overwrite=True) as w:
        w.add_tensors(tensors(1))
        w.finish({}, {})
    assert not (out / "keep.txt").exists() and is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_keeps_old_artifact_when_new_one_fails(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with ArtifactWriter(out) as w:
        w.add_tensors(tensors(1))
        w.finish({"v": 1}, {})
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, overwrite=True) as w:
            w.add_tensors(tensors(2))
            raise RuntimeError("fail")
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    assert is_complete(out, check_hashes=True)


def test_is_complete_detects_tampering(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with ArtifactWriter(out) as w:
        w.add_tensors(tensors(1))
        w.finish({}, {})
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace("{", "{ "))  # same meaning, different bytes
    assert not is_complete(out)


def test_bad_file_names_and_duplicates(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "m") as w:
        for bad in ("../x", "/etc/x", "config.json", "compress-manifest.json", "extra.safetensors"):
            with pytest.raises(ValueError):
                w.add_file(bad, b"")
        w.add_tensors({"a": torch.zeros(1)})
        with pytest.raises(ValueError, match="'a'"):
            w.add_tensors({"a": torch.zeros(1)})
        src = tmp_path / "src.txt"
        src.write_text("hi")
        w.add_file("sub/readme.txt", src)
        out = w.finish({}, {})
    assert (out / "sub" / "readme.txt").read_text() == "hi"


def test_a_tensor_written_in_slices_equals_the_whole(tmp_path: Path) -> None:
    t = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)).half()
    with ArtifactWriter(tmp_path / "m") as w:
        w.add_tensors({"a": torch.ones(2)})
        w.add_tensor_chunks("emb", torch.float16, (10, 3), (t[s : s + 4] for s in range(0, 10, 4)))
        w.add_tensors({"z": torch.zeros(3)})
        w.finish({}, {})
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(got["emb"], t) and torch.equal(got["a"], torch.ones(2)) and torch.equal(got["z"], torch.zeros(3))


@pytest.mark.parametrize("slices,match", [
    ([torch.ones(2, 3)], "slices hold 12 bytes"),  # fewer rows than the shape says
    ([torch.ones(2, 3), torch.full((2, 3), float("nan"))], "NaN or Inf"),
    ([torch.ones(2, 4)], "does not fit"),
])
def test_bad_slices_abort_the_writer(tmp_path: Path, slices, match) -> None:
    w = ArtifactWriter(tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        w.add_tensor_chunks("emb", torch.float16, (4, 3), (s.half() for s in slices))
    if match != "does not fit":  # bytes of the tensor reached the spill: nothing sound can follow
        assert not w.tmp_dir.exists()
        with pytest.raises(RuntimeError, match="already finished or aborted"):
            w.add_tensors({"x": torch.ones(1)})
    w.abort()
    assert not (tmp_path / "m").exists()
