"""seal_file: a file added to a finished artifact is recorded in its manifest, atomically."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from compress.formats import seal
from compress.formats.writer import MANIFEST, ArtifactWriter, is_complete


@pytest.fixture
def artifact(tmp_path):
    with ArtifactWriter(tmp_path / "a") as w:
        w.add_tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
        return w.finish({"model_type": "llama"}, {"compress_version": "test"})


def _outputs(folder):
    return json.loads((folder / MANIFEST).read_text())["outputs"]


def test_sealed_file_is_listed_with_its_bytes_and_sha256(artifact):
    before = _outputs(artifact)
    data = b'{"rows": [1, 2]}\n'
    entry = seal.seal_file(artifact, "compress-results.json", data)

    assert entry == {"bytes": 17, "sha256": hashlib.sha256(data).hexdigest()}
    assert (artifact / "compress-results.json").read_bytes() == data
    assert _outputs(artifact) == {**before, "compress-results.json": entry}  # nothing else changed
    assert json.loads((artifact / MANIFEST).read_text())["compress_version"] == "test"
    assert is_complete(artifact, check_hashes=True)
    assert sorted(p.name for p in artifact.iterdir()) == ["compress-manifest.json", "compress-results.json",
                                                         "config.json", "model.safetensors"]  # no temp files


def test_sealing_again_replaces_the_entry(artifact):
    seal.seal_json(artifact, "compress-results.json", {"v": 1})
    entry = seal.seal_json(artifact, "compress-results.json", {"v": 2})
    data = (artifact / "compress-results.json").read_bytes()
    assert json.loads(data) == {"v": 2}
    assert _outputs(artifact)["compress-results.json"] == entry == {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.parametrize("name", ["", "sub/x.json", "..", "a\\b", MANIFEST])
def test_names_outside_the_top_folder_or_the_manifest_itself_are_refused(artifact, name):
    before = (artifact / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="not a file name that can be sealed"):
        seal.seal_file(artifact, name, b"x")
    assert (artifact / MANIFEST).read_bytes() == before


def test_a_crash_before_the_manifest_is_replaced_leaves_the_old_manifest(artifact, monkeypatch):
    seal.seal_json(artifact, "compress-results.json", {"v": 1})
    before = (artifact / MANIFEST).read_bytes()
    real_replace = seal.os.replace

    def replace(src, dst):
        if str(dst).endswith(MANIFEST):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(seal.os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        seal.seal_json(artifact, "compress-results.json", {"v": 2})
    assert (artifact / MANIFEST).read_bytes() == before  # whole old manifest, not half a new one
    assert not list(artifact.glob(".*.tmp"))
    # The new results are on disk but not what the manifest records: a hash check catches it.
    assert not is_complete(artifact, check_hashes=True)
