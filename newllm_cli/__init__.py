"""newllm: a command-line toolkit for New-LLM (context vector fixed-point) research."""

import os
import signal
import sys

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning
# threads steal the cores the work needs (Phase 1 training 1.38x faster beside one busy core, 4%
# slower when idle; docs/EXPERIMENTS.md). Must be set before torch or numba load OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["load_run", "Run"]


def __getattr__(name: str):
    """`newllm_cli.load_run` and `newllm_cli.Run` (use/api.py), imported on first use: the CLI's
    start-up does not pay for torch until a command needs it."""
    if name in ("load_run", "Run"):
        from newllm_cli.use import api

        return getattr(api, name)
    raise AttributeError(f"module 'newllm_cli' has no attribute {name!r}")


def _interrupted_at_startup(signum, frame):  # pragma: no cover - exercised by a subprocess test
    os.write(2, b"Error: interrupted\n")
    os._exit(130)


# Run as the `newllm` command: a Ctrl-C while modules load (seconds with torch) is one line and
# exit 130, not a traceback; cli.main() puts Python's own handler back once it can catch it.
if os.path.basename(sys.argv[0]) == "newllm" or sys.argv[0] == "-m":  # "-m": `python -m newllm_cli` locating us
    signal.signal(signal.SIGINT, _interrupted_at_startup)
