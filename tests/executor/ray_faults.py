"""A Ray worker setup hook (runtime_env worker_process_setup_hook) for tests: faults planned in
the file $COMPRESS_RAY_FAULTS (JSON {key: how many attempts to hit}), where the key is
- a candidate name: SIGKILL the worker when it is about to write block 1 of that candidate;
- `NAME@stream`: SIGKILL it after it has sent 2 chunks of that candidate's artifact
  (`executor.artifacts: stream`), so the driver holds part of a file;
- `NAME@corrupt`: flip one byte of the second chunk it sends, after its sha256 was taken.
Hits are counted in files beside the plan, so "kill once" holds across worker processes."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def _should_hit(key: str) -> bool:
    plan_path = os.environ.get("COMPRESS_RAY_FAULTS")
    if not plan_path or not Path(plan_path).is_file():
        return False
    times = json.loads(Path(plan_path).read_text()).get(key, 0)
    count_file = Path(plan_path).with_name(f"{key}.kills")
    done = int(count_file.read_text()) if count_file.is_file() else 0
    if done >= times:
        return False
    count_file.write_text(str(done + 1))
    return True


def install() -> None:
    from compress.executor import stream
    from compress.stages import export

    real = export.Exporter.add_block

    def add_block(self, i, block, results):
        if i == 1 and _should_hit(self.plan.name):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i, block, results)

    export.Exporter.add_block = add_block
    send = stream.send_folder

    def send_folder(folder, files, chunk_bytes):
        chunks = 0
        for item in send(folder, files, chunk_bytes):
            if "data" in item:
                chunks += 1
                if chunks == 3 and _should_hit(f"{folder.name}@stream"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if chunks == 2 and _should_hit(f"{folder.name}@corrupt"):
                    data = item["data"].copy()
                    data[0] ^= 1
                    item = {"data": data}
            yield item

    stream.send_folder = send_folder
