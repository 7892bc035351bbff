"""Opening checkpoint folders: single file, shards, pickles, and every way they can be broken."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compress.models.checkpoint import CheckpointError, open_checkpoint

A = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(2)}
B = {"b.weight": torch.full((4, 4), 2.0)}


def folder(tmp_path, **files):
    (tmp_path / "config.json").write_text("{}")
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / name.replace("_", "-").replace("-safetensors", ".safetensors")))
    return tmp_path


def sharded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file(A, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(B, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in A},
                  **{k: "model-00002-of-00002.safetensors" for k in B}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_single_file_loads_exact_tensors(tmp_path):
    ck = open_checkpoint(folder(tmp_path, model_safetensors={**A, **B}))
    assert sorted(ck.index) == ["a.bias", "a.weight", "b.weight"]
    got = ck.load(["a.weight", "b.weight"])
    assert torch.equal(got["a.weight"], A["a.weight"]) and torch.equal(got["b.weight"], B["b.weight"])
    assert sorted(ck.names("a.")) == ["a.bias", "a.weight"]
    with pytest.raises(CheckpointError, match="tensor 'c.weight' is missing"):
        ck.load(["c.weight"])


def test_shards_through_the_index(tmp_path):
    ck = open_checkpoint(sharded(tmp_path))
    assert [p.name for p in ck.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    got = ck.load(["a.bias", "b.weight"])
    assert torch.equal(got["a.bias"], A["a.bias"]) and torch.equal(got["b.weight"], B["b.weight"])


def test_missing_shard(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed in"):
        open_checkpoint(tmp_path)


def test_index_names_a_tensor_the_shard_lacks(tmp_path):
    sharded(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="tensor 'ghost.weight' listed in the index is missing"):
        open_checkpoint(tmp_path)


def test_malformed_index(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="malformed shard index"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 10_000])
def test_truncated_file_names_the_file(tmp_path, keep):
    folder(tmp_path, model_safetensors={**A, **B})
    path = tmp_path / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: max(1, int(len(blob) * keep))])
    with pytest.raises(CheckpointError, match=f"{path}: not a valid safetensors file"):
        open_checkpoint(tmp_path)


def test_unindexed_safetensors_files_are_all_read(tmp_path):
    ck = open_checkpoint(folder(tmp_path, first_safetensors=A, second_safetensors=B))
    assert sorted(ck.index) == ["a.bias", "a.weight", "b.weight"]
    assert ck.index["b.weight"].name == "second.safetensors"


def test_pickle_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({**A, **B}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled .bin weights found .pytorch_model.bin.*allow_pickle"):
        open_checkpoint(tmp_path)
    ck = open_checkpoint(tmp_path, allow_pickle=True)
    assert ck.pickled
    assert torch.equal(ck.load(["a.weight"])["a.weight"], A["a.weight"])


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    """allow_pickle opts in to tensors, not to arbitrary objects (weights_only loading)."""
    (tmp_path / "config.json").write_text("{}")
    torch.save({"a.weight": A["a.weight"], "evil": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'pytorch_model.bin'}: cannot load as a tensors-only pickle"):
        open_checkpoint(tmp_path, allow_pickle=True)


def test_truncated_pickle_is_bad_input(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "pytorch_model.bin"
    torch.save({**A, **B}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"{path}: cannot load"):
        open_checkpoint(tmp_path, allow_pickle=True)


class _Evil:
    pass


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight files"):
        open_checkpoint(tmp_path)


def test_rows_of_a_tensor_are_exact_copies(tmp_path):
    ck = open_checkpoint(sharded(tmp_path))
    got = ck.load_rows("b.weight", 1, 3)
    assert torch.equal(got, B["b.weight"][1:3])
    assert torch.equal(ck.load_rows("a.weight", 1, 99), A["a.weight"][1:])  # clipped at the end
    with pytest.raises(CheckpointError, match="tensor 'c.weight' is missing"):
        ck.load_rows("c.weight", 0, 1)
