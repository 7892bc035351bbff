"""Stage: publish one artifact of the run (`publish:` section)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compress.stages.context import RunContext

log = logging.getLogger(__name__)


def stage_publish(ctx: "RunContext") -> None:
    """Publish `publish.candidate`, the only candidate, or the recommended one."""
    from compress.compare import recommend
    from compress.publish import publish_stage
    from compress.stages.report import rows_of

    pub = ctx.cfg.publish
    if pub is None:
        return
    done = {n: r for n, r in ctx.candidates.items() if r.artifact is not None}
    name = pub.candidate
    if name is None:
        if len(done) == 1:
            name = next(iter(done))
        else:
            rows = rows_of(ctx)
            name = recommend(rows[1:], rows[0], ctx.cfg.select).name
    if name not in done:
        raise RuntimeError(f"publish: candidate '{name}' has no finished artifact to publish")
    ctx.published = publish_stage(done[name].artifact, pub)
    log.info("published %s to %s (%s)", name, pub.to, pub.revision)
