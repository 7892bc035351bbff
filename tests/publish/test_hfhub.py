"""The Hub path through the real huggingface_hub client against a loopback fake Hub (tests/publish/fake_hub.py)."""
from __future__ import annotations

import hashlib

import pytest
from artifact_fixture import build_artifact
from click.testing import CliRunner
from fake_hub import FakeHub

pytest.importorskip("huggingface_hub")

from compress.publish import PublishError, PublishInputError, publish_artifact  # noqa: E402
from compress.publish.command import publish  # noqa: E402
from compress.publish.hfhub import RetryPolicy  # noqa: E402

TOKEN = "hf_" + "Z9y8X7w6" * 4 + "ab"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # hf_xet is installed, so 1.x would upload LFS files through a Xet CAS server; this switch makes it
    # take the plain LFS batch + PUT path (huggingface_hub._commit_api._upload_files).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login from this machine
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with FakeHub(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by compress.publish.hfhub at call time
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def artifact(tmp_path):
    return build_artifact(tmp_path / "artifact")


def _fast(sleeps=None):
    return RetryPolicy(tries=3, base_delay=0.01, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def _local(artifact):
    return {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()}


def test_upload_sequence_and_committed_contents(hub, artifact):
    result = publish_artifact(artifact, "hf://org/tiny-w4", private=True, commit_message="Add w4", retry=_fast())
    state = hub.state
    order = [(m, p) for m, p in state.requests]
    assert order == [
        ("POST", "/api/repos/create"),
        ("GET", "/api/models/org/tiny-w4/tree/main"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/org/tiny-w4/preupload/main"),
        ("POST", "/org/tiny-w4.git/info/lfs/objects/batch"),
        ("PUT", f"/lfs-upload/{hashlib.sha256((artifact / 'model.safetensors').read_bytes()).hexdigest()}"),
        ("POST", "/lfs-verify"),
        ("POST", "/api/models/org/tiny-w4/commit/main"),
        ("GET", "/api/models/org/tiny-w4/tree/main"),
    ]
    repo = state.repos["org/tiny-w4"]
    assert repo.private
    (branch, summary, added, deleted), = repo.commits
    assert (branch, summary, deleted) == ("main", "Add w4", [])
    for name, data in _local(artifact).items():
        assert added[name] == data, name
    assert set(added) == set(_local(artifact)) | {"README.md"}
    assert repo.lfs_paths == {"model.safetensors"}
    assert added["README.md"].startswith(b"---\nbase_model: HuggingFaceTB/SmolLM2-135M\n")
    # the token was sent to the API (never to the presigned upload URL) ...
    assert {a for (m, p), a in zip(state.requests, state.auth_headers) if p.startswith("/api/")} == {f"Bearer {TOKEN}"}
    # ... and the result names the commit and the tree
    assert result.commit and result.destination == f"{hub.url}/org/tiny-w4/tree/main"


def test_plain_repo_id_and_branch_revision(hub, artifact):
    publish_artifact(artifact, "org/tiny-w4", revision="w4-g64", retry=_fast())
    state = hub.state
    assert state.calls("POST", r"/branch/w4-g64$") == 1
    assert state.calls("POST", r"/commit/w4-g64$") == 1
    repo = state.repos["org/tiny-w4"]
    assert "model.safetensors" in repo.branches["w4-g64"] and "model.safetensors" not in repo.branches["main"]
    with pytest.raises(PublishInputError, match="branch 'w4-g64' already exists"):
        publish_artifact(artifact, "org/tiny-w4", revision="w4-g64", retry=_fast())


def test_existing_revision_refused_and_overwrite_deletes_stale_files(hub, artifact):
    publish_artifact(artifact, "org/tiny-w4", retry=_fast())
    hub.state.repos["org/tiny-w4"].branches["main"]["old-notes.txt"] = b"stale"
    with pytest.raises(PublishInputError, match="revision 'main' already has"):
        publish_artifact(artifact, "org/tiny-w4", retry=_fast())
    assert len(hub.state.repos["org/tiny-w4"].commits) == 1

    publish_artifact(artifact, "org/tiny-w4", overwrite=True, retry=_fast())
    repo = hub.state.repos["org/tiny-w4"]
    assert repo.commits[-1][3] == ["old-notes.txt"]
    assert "old-notes.txt" not in repo.branches["main"]


def test_401_is_a_clear_auth_error_and_not_retried(hub, artifact, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "wrong" * 7)
    sleeps = []
    with pytest.raises(PublishError, match="failed at create_repo: authentication failed") as info:
        publish_artifact(artifact, "org/tiny-w4", retry=_fast(sleeps))
    assert "wrong" not in str(info.value)
    assert hub.state.calls("POST", "/api/repos/create") == 1 and sleeps == []
    assert "org/tiny-w4" not in hub.state.repos


def test_404_is_reported_and_not_retried(hub, artifact):
    hub.state.fail("POST", r"/preupload/", 404, times=5, error_code="RepoNotFound")
    sleeps = []
    with pytest.raises(PublishError, match="failed at create_commit: not found"):
        publish_artifact(artifact, "org/tiny-w4", retry=_fast(sleeps))
    assert hub.state.calls("POST", r"/preupload/") == 1 and sleeps == []
    assert hub.state.calls("POST", r"/commit/") == 0


def test_5xx_once_is_retried_with_backoff_then_succeeds(hub, artifact):
    hub.state.fail("POST", r"/api/repos/create", 503)
    hub.state.fail("POST", r"/commit/main", 500)
    sleeps = []
    result = publish_artifact(artifact, "org/tiny-w4", retry=_fast(sleeps))
    assert hub.state.calls("POST", "/api/repos/create") == 2
    assert hub.state.calls("POST", r"/commit/main") == 2
    assert hub.state.calls("PUT", r"/lfs-upload/") == 1  # the retried commit did not re-send the weights
    assert sleeps == [0.01, 0.01]  # first retry of each step waits base_delay
    assert len(hub.state.repos["org/tiny-w4"].commits) == 1 and result.commit


def test_5xx_that_persists_fails_after_the_last_try(hub, artifact):
    hub.state.fail("POST", r"/commit/main", 502, times=10)
    sleeps = []
    with pytest.raises(PublishError, match="create_commit: server or connection failure, still failing after 3 tries"):
        publish_artifact(artifact, "org/tiny-w4", retry=_fast(sleeps))
    assert hub.state.calls("POST", r"/commit/main") == 3
    assert sleeps == [0.01, 0.02]  # exponential


def test_remote_content_mismatch_fails_verification(hub, artifact, monkeypatch):
    from fake_hub import _Handler

    real_entry = _Handler._entry

    def corrupted(self, repo, path, data):
        entry = real_entry(self, repo, path, data)
        if path == "config.json":
            entry["oid"] = "0" * 40
        return entry

    monkeypatch.setattr(_Handler, "_entry", corrupted)
    with pytest.raises(PublishError, match="'config.json' on org/tiny-w4@main differs"):
        publish_artifact(artifact, "org/tiny-w4", retry=_fast())


def test_dry_run_touches_no_server(hub, artifact):
    result = publish_artifact(artifact, "hf://org/tiny-w4", dry_run=True)
    assert result.dry_run and hub.state.requests == []
    assert "README.md" in dict(result.files)


def test_cli_hub_failure_exits_1_without_printing_the_token(hub, artifact):
    hub.state.fail("POST", r"/api/repos/create", 403, times=1)
    result = CliRunner().invoke(publish, [str(artifact), "--to", "hf://org/tiny-w4"])
    assert result.exit_code == 1, result.output
    assert "permission denied" in result.output and TOKEN not in result.output
