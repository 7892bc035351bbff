"""`compress publish` refuses what it cannot verify: each attack exits 2 with a one-line message naming
the file or repo id, and nothing is written anywhere (the whole tmp tree is compared before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from artifact_fixture import build_artifact
from click.testing import CliRunner

from compress.formats.seal import seal_file
from compress.publish.command import publish

pytest.importorskip("huggingface_hub")

from fake_hub import FakeHub  # noqa: E402


def _snapshot(folder):
    """Every path under `folder` with its bytes (None for anything but a plain file): any write shows up."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if stat.S_ISREG(os.lstat(p).st_mode) else None)
        for p in sorted(folder.rglob("*"))
    }


def _refused(tmp_path, artifact, dest, *needles):
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(publish, [str(artifact), "--to", dest])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]  # one line, naming the file or id
    assert _snapshot(tmp_path) == before  # nothing written: no hub folder, no temp files, artifact intact
    return errors[0]


def _relist(artifact, rel, data):
    """Record `rel` in the manifest with the sha256 of `data`, as an attacker who edits the manifest would."""
    path = artifact / "compress-manifest.json"
    manifest = json.loads(path.read_text())
    manifest["outputs"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


@pytest.fixture
def artifact(tmp_path):
    return build_artifact(tmp_path / "artifact")


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return secret


@pytest.fixture
def dest(tmp_path):
    return f"file://{tmp_path}/hub/org/tiny"


# --- the artifact ------------------------------------------------------------------------------

def test_symlink_to_a_file_outside(tmp_path, artifact, outside, dest):
    os.symlink(outside, artifact / "secrets.txt")
    _refused(tmp_path, artifact, dest, "'secrets.txt' is a symbolic link")


def test_symlink_that_the_manifest_lists_with_the_right_hash(tmp_path, artifact, outside, dest):
    os.symlink(outside, artifact / "secrets.txt")
    _relist(artifact, "secrets.txt", outside.read_bytes())
    _refused(tmp_path, artifact, dest, "'secrets.txt' is a symbolic link")


def test_listed_file_replaced_by_a_symlink_to_identical_bytes(tmp_path, artifact, dest):
    real = tmp_path / "outside-tokenizer.json"
    (artifact / "tokenizer.json").rename(real)
    os.symlink(real, artifact / "tokenizer.json")
    _refused(tmp_path, artifact, dest, "'tokenizer.json' is a symbolic link")


def test_symlinked_folder(tmp_path, artifact, outside, dest):
    os.symlink(outside.parent, artifact / "extra")
    _refused(tmp_path, artifact, dest, "'extra' is a symbolic link")


def test_hidden_symlink_is_refused_too(tmp_path, artifact, outside, dest):
    os.symlink(outside, artifact / ".env")  # dotfiles are never published, but a link is still refused
    _refused(tmp_path, artifact, dest, "'.env' is a symbolic link")


@pytest.mark.parametrize("name", ["modeling_evil.py", "notes.txt", "sub/extra.json", "model-extra.safetensors"])
def test_file_the_manifest_does_not_list(tmp_path, artifact, dest, name):
    (artifact / name).parent.mkdir(exist_ok=True)
    (artifact / name).write_text("print('hi')\n")
    _refused(tmp_path, artifact, dest, f"'{name}' is a", "does not list")


def test_fifo_is_refused_without_reading_it(tmp_path, artifact, dest):
    os.mkfifo(artifact / "pipe.json")  # hashing it would block forever
    _refused(tmp_path, artifact, dest, "'pipe.json' is not a regular file")


def test_results_edited_after_sealing(tmp_path, artifact, dest):
    path = artifact / "compress-results.json"
    path.write_text(path.read_text().replace("25.1", "12.5"))  # a better perplexity on the card
    _refused(tmp_path, artifact, dest, "sha256 of 'compress-results.json'")


def test_results_edited_to_the_same_size(tmp_path, artifact, dest):
    path = artifact / "compress-results.json"
    text = path.read_text()
    assert "25.1" in text
    path.write_text(text.replace("25.1", "19.9"))
    _refused(tmp_path, artifact, dest, "sha256 of 'compress-results.json'")


def test_results_written_before_sealing_existed(tmp_path, dest):
    artifact = build_artifact(tmp_path / "old", sealed=False)
    _refused(tmp_path, artifact, dest, "'compress-results.json' is not recorded in compress-manifest.json", "re-run")


def test_one_flipped_bit_in_the_weights(tmp_path, artifact, dest):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    _refused(tmp_path, artifact, dest, "sha256 of 'model.safetensors'")


@pytest.mark.parametrize("rel", ["../outside/passwd", "/etc/passwd", "sub/../../outside/passwd", "./config.json"])
def test_manifest_path_that_leaves_the_artifact(tmp_path, artifact, outside, dest, rel):
    _relist(artifact, rel, outside.read_bytes())
    _refused(tmp_path, artifact, dest, repr(rel), "not a plain relative path")


def test_resealed_file_with_a_token_is_still_scanned(tmp_path, artifact, dest):
    seal_file(artifact, "notes.txt", b"HF_TOKEN=hf_" + b"Q" * 34 + b"\n")
    _refused(tmp_path, artifact, dest, "'notes.txt' contains what looks like a Hugging Face access token")


# --- the destination ---------------------------------------------------------------------------

@pytest.mark.parametrize("tail, repo_id", [
    ("org/..", "org/.."),
    ("org/.", "org/."),
    ("../tiny", "../tiny"),
    ("org%2F..", "hub/org%2F.."),
    ("org/..%2F..%2Fescape", "org/..%2F..%2Fescape"),
    ("org/%2E%2E", "org/%2E%2E"),
    ("org/", "org/"),
    ("org//tiny", "/tiny"),
    ("org/ti ny", "org/ti ny"),
    ("org/tiny!", "org/tiny!"),
    ("org/t\u00efny", "org/t\u00efny"),
])
def test_file_destination_with_a_bad_repo_id(tmp_path, artifact, tail, repo_id):
    _refused(tmp_path, artifact, f"file://{tmp_path}/hub/{tail}", repr(repo_id), "is not a repo id")


@pytest.mark.parametrize("dest, needle", [
    ("file:///{tmp}/hub%2F..%2F../org/tiny", "no '.' or '..' folder"),
    ("file:///{tmp}/hub/./org/tiny", "no '.' or '..' folder"),
    ("file://{tmp}/hub/org/tiny?x=..", "no '?' or '#'"),
    ("file://{tmp}/hub/org/tiny#..", "no '?' or '#'"),
    ("file://evil.example/hub/org/tiny", "must be local"),
])
def test_file_destination_with_a_bad_hub_folder(tmp_path, artifact, dest, needle):
    _refused(tmp_path, artifact, dest.format(tmp=tmp_path), needle)


@pytest.mark.parametrize("dest, repo_id", [
    ("hf://org/..", "org/.."),
    ("org/..", "org/.."),
    ("hf://org%2F..", "org%2F.."),
    ("hf://..%2Forg/x", "..%2Forg/x"),
    ("org/x/", "org/x/"),
    ("/x", "/x"),
    ("org//x", "org//x"),
    ("org/x/y", "org/x/y"),
    ("org/x\n", "org/x\n"),
    ("org/x;rm", "org/x;rm"),
    ("-org/x", "-org/x"),
])
def test_hub_destination_with_a_bad_repo_id_sends_nothing(tmp_path, artifact, monkeypatch, dest, repo_id):
    with FakeHub(token="hf_" + "x" * 34) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        _refused(tmp_path, artifact, dest, repr(repo_id), "is not a repo id")
        assert server.state.requests == []
