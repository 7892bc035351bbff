"""A Ray worker setup hook (runtime_env worker_process_setup_hook) for tests: SIGKILL the worker
when it is about to write block 1 of a candidate named in the plan file $COMPRESS_RAY_FAULTS
(JSON {candidate: how many attempts to kill}). Kills are counted in files beside the plan, so
"kill once" holds across worker processes."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def _should_kill(name: str) -> bool:
    plan_path = os.environ.get("COMPRESS_RAY_FAULTS")
    if not plan_path or not Path(plan_path).is_file():
        return False
    times = json.loads(Path(plan_path).read_text()).get(name, 0)
    count_file = Path(plan_path).with_name(f"{name}.kills")
    done = int(count_file.read_text()) if count_file.is_file() else 0
    if done >= times:
        return False
    count_file.write_text(str(done + 1))
    return True


def install() -> None:
    from compress.stages import export

    real = export.Exporter.add_block

    def add_block(self, i, block, results):
        if i == 1 and _should_kill(self.plan.name):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i, block, results)

    export.Exporter.add_block = add_block
