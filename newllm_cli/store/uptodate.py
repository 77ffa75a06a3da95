"""Skipping a stage whose inputs and settings have not changed since it last succeeded.

Each finished stage records, in runs/NAME/stages.json, a fingerprint of what it was given (the
settings it reads and the state of its input files: size, modification time, inode) and the state
of the files it wrote, with its result. A rerun with the same fingerprint whose outputs are still
the files it wrote returns that result at once; anything else (another setting, an input rewritten
by an upstream stage, an output deleted or damaged) runs the stage again. Inputs are files written
atomically by this tool, so a changed file is a new inode or a new modification time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from newllm_cli.runtime.errors import RefusedError
from newllm_cli.runtime.progress import info
from newllm_cli.store.artifacts import Workspace, fingerprint, read_json, write_json
from newllm_cli.store.publish import together


def file_state(path: Path) -> list | None:
    try:
        st = os.stat(path, follow_symlinks=False)

    except OSError:
        return None
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


def _records(ws: Workspace) -> dict:
    path = ws.stages()
    if not path.exists():
        return {}
    try:
        return read_json(path, "stage records", "any stage (it is rewritten)")
    except RefusedError:  # a damaged record only costs a rerun
        return {}


def run_once(
    ws: Workspace,
    name: str,
    given: dict,
    inputs: list[Path],
    outputs: list[Path],
    compute: Callable[[], dict],
    force: bool = False,
    group=None,
    finish: Callable[[], None] = lambda: None,
) -> dict:
    """compute() unless the last success of stage `name` had the same `given` settings and input
    files, and its outputs are untouched; either way the result carries `wall_seconds`, and
    `skipped` when it was not recomputed (then `finish()` runs, as the stage itself ends: the run
    records its settings). Under torchrun the leader's decision holds for all."""
    t0 = time.perf_counter()
    key = fingerprint({"given": given, "inputs": [file_state(p) for p in inputs]})
    record = None if force else _records(ws).get(name)
    fresh = (
        record is not None and record.get("key") == key and record.get("outputs") == [file_state(p) for p in outputs]
    )
    if group is not None:
        fresh = group.broadcast(fresh)
    if fresh and record is not None:
        seconds = time.perf_counter() - t0
        info(f"{name}: up to date, skipped ({seconds:.2f} s; --rebuild reruns it)")
        finish()
        return {**record["result"], "skipped": True, "wall_seconds": seconds}
    with together():  # every output of the stage, or none
        result = compute()
    seconds = time.perf_counter() - t0
    result = {**result, "skipped": False, "wall_seconds": seconds}
    records = _records(ws)
    records[name] = {"key": key, "outputs": [file_state(p) for p in outputs], "result": result}
    write_json(ws.stages(), records)
    info(f"{name}: {seconds:.1f} s")
    return result


def timed(name: str, compute: Callable[[], dict]) -> dict:
    """compute()'s result with its wall time (for stages that keep their own cache, like prepare-data)."""
    t0 = time.perf_counter()
    with together():  # every output of the stage, or none
        result = compute()
    seconds = time.perf_counter() - t0
    info(f"{name}: {seconds:.1f} s")
    return {**result, "wall_seconds": seconds}
