"""Directory hub end to end: publish, refusals, overwrite, tampering, dry run, interrupted publish."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from artifact_fixture import build_artifact
from click.testing import CliRunner

from compress.publish import PublishConfig, PublishInputError, publish_artifact, publish_stage
from compress.formats.seal import seal_file
from compress.publish import dirhub
from compress.publish.command import publish


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def artifact(tmp_path):
    return build_artifact(tmp_path / "artifact")


@pytest.fixture
def hub(tmp_path):
    return tmp_path / "hub" / "org" / "tiny-w4"


def test_publish_copies_every_file_byte_for_byte_and_adds_a_card(artifact, hub):
    before = _tree(artifact)
    result = publish_artifact(artifact, f"file://{hub}", commit_message="first")
    published = _tree(hub / "revisions" / "main")

    assert _tree(artifact) == before  # the artifact on disk is untouched
    assert set(published) == set(before) | {"README.md"}
    for path, data in before.items():
        assert published[path] == data, path
    assert result.repo_id == "org/tiny-w4" and result.revision == "main" and not result.dry_run
    assert dict(result.files) == {p: len(d) for p, d in published.items()}
    assert published["README.md"].startswith(b"---\nbase_model: HuggingFaceTB/SmolLM2-135M\n")

    refs = json.loads((hub / "refs.json").read_text())
    assert refs["main"]["message"] == "first" and refs["main"]["commit"] == result.commit
    log = [json.loads(line) for line in (hub / "log.jsonl").read_text().splitlines()]
    assert [e["revision"] for e in log] == ["main"]


def test_manifest_sha256_matches_published_files(artifact, hub):
    publish_artifact(artifact, f"file://{hub}")
    manifest = json.loads((artifact / "compress-manifest.json").read_text())
    folder = hub / "revisions" / "main"
    for path, entry in manifest["outputs"].items():
        data = (folder / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]


def test_existing_revision_is_refused_then_overwritten_on_request(artifact, hub):
    publish_artifact(artifact, f"file://{hub}", revision="v1")
    (hub / "revisions" / "v1" / "stale.txt").write_text("from an older publish")
    with pytest.raises(PublishInputError, match="revision 'v1' already exists"):
        publish_artifact(artifact, f"file://{hub}", revision="v1")
    assert (hub / "revisions" / "v1" / "stale.txt").exists()  # refusal changed nothing

    publish_artifact(artifact, f"file://{hub}", revision="v1", overwrite=True, commit_message="again")
    assert not (hub / "revisions" / "v1" / "stale.txt").exists()
    assert dirhub.list_revisions(hub) == ["v1"]
    assert [p.name for p in (hub / "revisions").iterdir()] == ["v1"]  # no .old-/.partial- left behind
    assert json.loads((hub / "refs.json").read_text())["v1"]["message"] == "again"
    assert len((hub / "log.jsonl").read_text().splitlines()) == 2


def test_sharded_artifact_publishes(tmp_path, hub):
    artifact = build_artifact(tmp_path / "sharded", sharded=True)
    result = publish_artifact(artifact, f"file://{hub}")
    names = [p for p, _ in result.files]
    assert "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) == 3


def test_one_changed_byte_in_the_weights_is_refused(artifact, hub):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PublishInputError, match=r"sha256 of 'model.safetensors'"):
        publish_artifact(artifact, f"file://{hub}")
    assert not hub.exists()


def test_size_mismatch_and_missing_file_are_refused_naming_the_file(artifact, hub):
    (artifact / "tokenizer.json").write_text("{}")
    with pytest.raises(PublishInputError, match=r"'tokenizer.json' is 2 bytes"):
        publish_artifact(artifact, f"file://{hub}")
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(PublishInputError, match=r"incomplete: 'tokenizer.json' is listed"):
        publish_artifact(artifact, f"file://{hub}")


def test_unlisted_weight_file_is_refused(artifact, hub):
    shutil.copy(artifact / "model.safetensors", artifact / "model-extra.safetensors")
    with pytest.raises(PublishInputError, match="'model-extra.safetensors' is a weight file"):
        publish_artifact(artifact, f"file://{hub}")


def test_tokens_caches_locks_and_temp_folders_are_never_published(artifact, hub):
    (artifact / ".env").write_text("HF_TOKEN=x")
    (artifact / "token").write_text("secret")
    (artifact / "__pycache__").mkdir()
    (artifact / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    (artifact / ".partial-main-1234").mkdir()
    (artifact / ".partial-main-1234" / "model.safetensors").write_bytes(b"half")
    (artifact / ".cache").mkdir()
    (artifact / ".cache" / "blob").write_bytes(b"cache")
    (artifact / "model.safetensors.lock").write_text("")
    result = publish_artifact(artifact, f"file://{hub}")
    published = set(_tree(hub / "revisions" / "main"))
    assert published == {p for p, _ in result.files}
    assert not published & {".env", "token", "model.safetensors.lock"}
    assert not any(p.startswith(("__pycache__", ".partial-", ".cache")) for p in published)


def test_a_listed_file_holding_an_access_token_is_refused(artifact, hub):
    seal_file(artifact, "notes.txt", ("use hf_" + "a1B2" * 9 + " to log in").encode())
    with pytest.raises(PublishInputError, match="'notes.txt' contains what looks like a Hugging Face access token"):
        publish_artifact(artifact, f"file://{hub}")


def test_dry_run_lists_files_and_writes_nothing(artifact, hub):
    result = publish_artifact(artifact, f"file://{hub}", dry_run=True)
    assert result.dry_run and result.commit is None
    assert {p for p, _ in result.files} == set(_tree(artifact)) | {"README.md"}
    assert not hub.exists()


def test_interrupted_publish_leaves_nothing_that_looks_published(artifact, hub, monkeypatch):
    publish_artifact(artifact, f"file://{hub}", revision="main")
    before = _tree(hub / "revisions" / "main")
    refs_before = (hub / "refs.json").read_text()
    calls = {"n": 0}
    real_write = dirhub._write_file

    def write_then_die(item, dest):
        calls["n"] += 1
        if calls["n"] % 4 == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-copy
        return real_write(item, dest)

    monkeypatch.setattr(dirhub, "_write_file", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        publish_artifact(artifact, f"file://{hub}", revision="v2")
    with pytest.raises(KeyboardInterrupt):
        publish_artifact(artifact, f"file://{hub}", revision="main", overwrite=True)

    assert calls["n"] == 7  # both publishes died on their third copy
    assert dirhub.list_revisions(hub) == ["main"]
    assert [p.name for p in (hub / "revisions").iterdir()] == ["main"]  # temp folders removed
    assert _tree(hub / "revisions" / "main") == before  # the old revision survived the failed overwrite
    assert (hub / "refs.json").read_text() == refs_before


def test_failure_while_swapping_in_an_overwrite_restores_the_old_revision(artifact, hub, monkeypatch):
    publish_artifact(artifact, f"file://{hub}")
    before = _tree(hub / "revisions" / "main")
    real_rename = dirhub.os.rename

    def rename(src, dst):
        if str(src).split("/")[-1].startswith(".partial-"):
            raise OSError("device went away")
        return real_rename(src, dst)

    monkeypatch.setattr(dirhub.os, "rename", rename)
    with pytest.raises(OSError, match="device went away"):
        publish_artifact(artifact, f"file://{hub}", overwrite=True)
    assert [p.name for p in (hub / "revisions").iterdir()] == ["main"]
    assert _tree(hub / "revisions" / "main") == before


def test_a_crash_leftover_partial_folder_is_not_a_revision(hub):
    (hub / "revisions" / ".partial-main-abc").mkdir(parents=True)
    (hub / "revisions" / ".partial-main-abc" / "config.json").write_text("{}")
    assert dirhub.list_revisions(hub) == []


def test_bad_revision_name_is_refused(artifact, hub):
    with pytest.raises(PublishInputError, match="revision '../x'"):
        publish_artifact(artifact, f"file://{hub}", revision="../x")


def test_publish_stage_uses_the_config_section(artifact, hub):
    cfg = PublishConfig(to=f"file://{hub}", revision="r1", commit_message="from the pipeline", card=False)
    result = publish_stage(artifact, cfg)
    assert "README.md" not in dict(result.files)
    assert json.loads((hub / "refs.json").read_text())["r1"]["message"] == "from the pipeline"


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="revison"):
        PublishConfig(to="org/name", revison="x")


def test_cli_publishes_and_reports(artifact, hub):
    runner = CliRunner()
    result = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}", "--message", "cli"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "published 8 files" in result.output
    again = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}"])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output


def test_cli_dry_run_and_bad_input_exit_codes(artifact, hub, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}", "--dry-run"])
    assert dry.exit_code == 0 and "Dry run: would publish 8 files" in dry.output and not hub.exists()
    bad_dest = runner.invoke(publish, [str(artifact), "--to", "s3://bucket/x"])
    assert bad_dest.exit_code == 2 and "unknown scheme" in bad_dest.output
    (artifact / "config.json").unlink()
    missing = runner.invoke(publish, [str(artifact), "--to", f"file://{hub}"])
    assert missing.exit_code == 2 and "'config.json'" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    no_manifest = runner.invoke(publish, [str(empty), "--to", f"file://{hub}"])
    assert no_manifest.exit_code == 2 and "no compress-manifest.json" in no_manifest.output


def test_cli_internal_failure_exits_1(artifact, hub, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dirhub, "publish_to_directory", broken)
    result = CliRunner().invoke(publish, [str(artifact), "--to", f"file://{hub}"])
    assert result.exit_code == 1 and "disk full" in result.output


def test_uploaded_set_is_the_manifest_outputs_plus_manifest_and_card(artifact, hub):
    (artifact / "README.md").write_text("# my own notes\n")  # replaced by the generated card
    (artifact / ".DS_Store").write_bytes(b"\0")  # debris that is never published
    (artifact / "__pycache__").mkdir()
    (artifact / "__pycache__" / "x.pyc").write_bytes(b"\0")
    manifest = json.loads((artifact / "compress-manifest.json").read_text())
    assert "compress-results.json" in manifest["outputs"]  # sealed by the fixture, as write_report does

    result = publish_artifact(artifact, f"file://{hub}")
    published = _tree(hub / "revisions" / "main")
    assert set(published) == set(manifest["outputs"]) | {"compress-manifest.json", "README.md"}
    assert {p for p, _ in result.files} == set(published)
    for path, entry in manifest["outputs"].items():
        assert hashlib.sha256(published[path]).hexdigest() == entry["sha256"], path
    assert published["compress-manifest.json"] == (artifact / "compress-manifest.json").read_bytes()
    assert published["README.md"] != b"# my own notes\n"


def test_without_a_card_only_a_listed_readme_is_published(artifact, hub):
    (artifact / "README.md").write_text("# my own notes\n")
    with pytest.raises(PublishInputError, match="'README.md' is a file that compress-manifest.json does not list"):
        publish_artifact(artifact, f"file://{hub}", card=False)
    assert not hub.exists()
    seal_file(artifact, "README.md", b"# my own notes\n")
    publish_artifact(artifact, f"file://{hub}", card=False)
    assert (hub / "revisions" / "main" / "README.md").read_bytes() == b"# my own notes\n"
