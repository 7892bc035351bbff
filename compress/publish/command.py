"""`compress publish ARTIFACT_DIR --to DEST`: exit 2 on bad input, 1 when publishing fails."""
from __future__ import annotations

import logging

import click

log = logging.getLogger(__name__)


@click.command("publish")
@click.argument("artifact_dir", type=click.Path(exists=True, file_okay=False, dir_okay=True))
@click.option(
    "--to", "dest", required=True, metavar="DEST",
    help="file:///path/to/hub/org/name (directory hub), hf://org/name or org/name (Hugging Face Hub; "
    "HF_ENDPOINT and HF_TOKEN or the cached login apply).",
)
@click.option("--revision", default="main", show_default=True, help="Branch (Hub) or revision folder (directory hub).")
@click.option("--private", is_flag=True, help="Create the Hub repo as private (an existing repo keeps its visibility).")
@click.option("--message", "commit_message", default=None, help="Commit message.")
@click.option("--overwrite", is_flag=True, help="Replace an existing revision.")
@click.option("--no-card", is_flag=True, help="Do not generate README.md (a README.md the manifest lists is published as it is).")
@click.option("--dry-run", is_flag=True, help="Verify the artifact and list what would be uploaded; upload nothing.")
@click.option("--force", is_flag=True, help="Publish even though the run flagged the original's perplexity as absurd.")
def publish(artifact_dir, dest, revision, private, commit_message, overwrite, no_card, dry_run, force):
    """Verify ARTIFACT_DIR against its manifest, add a model card and publish it to DEST."""
    from compress.publish.api import publish_artifact
    from compress.publish.errors import PublishError, PublishInputError

    try:
        result = publish_artifact(
            artifact_dir, dest, revision=revision, private=private, commit_message=commit_message,
            overwrite=overwrite, dry_run=dry_run, card=not no_card, force=force,
        )
    except PublishInputError as err:
        raise click.UsageError(str(err)) from None  # exit 2
    except PublishError as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(1) from None
    except Exception as err:  # an internal failure: say what it was, exit 1
        log.debug("publish failed", exc_info=True)
        click.echo(f"Error: publish failed: {type(err).__name__}: {err}", err=True)
        raise SystemExit(1) from None

    width = max((len(path) for path, _ in result.files), default=0)
    if result.dry_run:
        click.echo(f"Dry run: would publish {len(result.files)} files to {result.destination}")
    for path, size in result.files:
        click.echo(f"  {path:<{width}}  {size:>14,d} bytes")
    verb = "would upload" if result.dry_run else "published"
    click.echo(f"{verb} {len(result.files)} files, {result.total_bytes:,d} bytes")
    if not result.dry_run:
        click.echo(f"{result.repo_id}@{result.revision} -> {result.destination} (commit {result.commit})")
