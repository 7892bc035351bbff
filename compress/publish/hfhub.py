"""Publish to the Hugging Face Hub (or any server speaking its API) through huggingface_hub.

huggingface_hub is imported inside the functions: it is an optional dependency (`compress[publish]`).
The token comes from the argument, else `HF_TOKEN` or the cached `hf auth login`; it is never logged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

from compress.publish.errors import PublishError, PublishInputError
from compress.publish.verify import UploadFile

log = logging.getLogger(__name__)
T = TypeVar("T")
GITATTRIBUTES = ".gitattributes"  # the Hub creates it in every new repo


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient failures (5xx, connection errors): base_delay * 2**attempt."""

    tries: int = 4
    base_delay: float = 2.0
    max_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep


def network_cause(err: BaseException) -> Optional[BaseException]:
    """The HTTP or connection error behind `err` (huggingface_hub wraps LFS failures in RuntimeError)."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (HfHubHTTPError, httpx.HTTPError, ConnectionError, TimeoutError)):
            return err
        err, seen = err.__cause__, seen + 1
    return None


def _status(err: BaseException) -> Optional[int]:
    response = getattr(network_cause(err), "response", None)
    return getattr(response, "status_code", None)


def is_transient(err: BaseException) -> bool:
    """5xx and connection failures are worth retrying; 4xx (401, 403, 404, 409...) never are."""
    import httpx

    cause = network_cause(err)
    if cause is None:
        return False
    status = _status(cause)
    if status is not None:
        return status >= 500
    return isinstance(cause, (httpx.TransportError, ConnectionError, TimeoutError))


def with_retry(step: str, fn: Callable[[], T], policy: RetryPolicy) -> T:
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == policy.tries or not is_transient(err):
                raise
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
            log.warning(
                "%s failed (%s); try %d of %d in %.1fs", step, _short(err), attempt + 1, policy.tries, delay
            )
            policy.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _short(err: BaseException) -> str:
    err = network_cause(err) or err
    status = _status(err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"HTTP {status}: {first}" if status else f"{type(err).__name__}: {first}"


def explain(step: str, repo_id: str, err: BaseException, policy: RetryPolicy) -> PublishError:
    """A PublishError saying which step failed and what to do about it."""
    status = _status(err)
    if status == 401:
        hint = "authentication failed: set HF_TOKEN or run `hf auth login` with a token that has write access"
    elif status == 403:
        hint = f"permission denied: the token cannot write to '{repo_id}'"
    elif status == 404:
        hint = f"not found: check the repo id '{repo_id}', the revision and the endpoint"
    elif is_transient(err):
        hint = f"server or connection failure, still failing after {policy.tries} tries"
    else:
        hint = "request refused"
    return PublishError(f"publish to '{repo_id}' failed at {step}: {hint} ({_short(err)})")


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob, which the Hub reports as `oid` for files not stored in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _remote_files(api: Any, repo_id: str, revision: str, expand: bool) -> Optional[dict[str, Any]]:
    """path -> RepoFile at `revision`, or None when the revision does not exist."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        entries = list(api.list_repo_tree(repo_id, revision=revision, recursive=True, expand=expand))
    except RevisionNotFoundError:
        return None
    return {e.path: e for e in entries if isinstance(e, RepoFile)}


def verify_remote(remote: dict[str, Any], files: Sequence[UploadFile], repo_id: str, revision: str) -> None:
    where = f"{repo_id}@{revision}"
    for item in files:
        entry = remote.get(item.path)
        if entry is None:
            raise PublishError(f"verification failed: '{item.path}' is missing from {where} after the commit")
        if entry.size != item.size:
            raise PublishError(f"verification failed: '{item.path}' is {entry.size} bytes on {where}, {item.size} here")
        if entry.lfs is not None:
            if entry.lfs.sha256 != item.sha256:
                raise PublishError(f"verification failed: sha256 of '{item.path}' on {where} differs from the local file")
        elif entry.blob_id and entry.blob_id != git_blob_sha1(item.read()):
            raise PublishError(f"verification failed: '{item.path}' on {where} differs from the local file (git oid)")
    extra = sorted(set(remote) - {f.path for f in files} - {GITATTRIBUTES})
    if extra:
        raise PublishError(f"verification failed: {where} holds files that were not published: {', '.join(extra)}")


def publish_to_hub(
    repo_id: str,
    revision: str,
    files: Sequence[UploadFile],
    *,
    message: str,
    private: bool,
    overwrite: bool,
    token: Optional[str],
    retry: RetryPolicy,
) -> tuple[str, str]:
    """Create the repo (and branch), commit `files`, check the result; returns (url, commit id)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    # Read HF_ENDPOINT now: huggingface_hub.constants froze it at import, maybe before it was set.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    step = "create_repo"
    try:
        with_retry(step, lambda: api.create_repo(repo_id, private=private, exist_ok=True), retry)

        step = "list_repo_tree"
        current = with_retry(step, lambda: _remote_files(api, repo_id, revision, expand=False), retry)
        if current is not None and revision != "main" and not overwrite:
            raise PublishInputError(f"{repo_id}: branch '{revision}' already exists; pass --overwrite to replace it")
        if current and set(current) - {GITATTRIBUTES} and not overwrite:
            raise PublishInputError(
                f"{repo_id}: revision '{revision}' already has {len(current)} files; pass --overwrite to replace them"
            )
        if current is None and revision != "main":
            step = "create_branch"
            with_retry(step, lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), retry)
        stale = sorted(set(current or {}) - {f.path for f in files} - {GITATTRIBUTES})

        def commit() -> Any:
            # Operations are single use (huggingface_hub mutates them), so each try builds new ones.
            ops: list[Any] = [
                CommitOperationAdd(
                    path_in_repo=f.path,
                    path_or_fileobj=f.source if isinstance(f.source, bytes) else str(f.source),
                )
                for f in files
            ]
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
            return api.create_commit(repo_id, ops, commit_message=message, revision=revision)

        step = "create_commit"
        info = with_retry(step, commit, retry)

        step = "verify (list_repo_tree)"
        remote = with_retry(step, lambda: _remote_files(api, repo_id, revision, expand=True), retry)
    except (PublishInputError, PublishError):
        raise
    except Exception as err:
        if network_cause(err) is not None:
            raise explain(step, repo_id, err, retry) from err
        raise
    verify_remote(remote or {}, files, repo_id, revision)
    url = f"{api.endpoint}/{repo_id}/tree/{revision}"
    return url, info.oid
