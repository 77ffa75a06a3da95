"""newllm: a command-line toolkit for New-LLM (context vector fixed-point) research."""
import os

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning
# threads steal the cores the work needs (Phase 1 training 1.38x faster beside one busy core, 4%
# slower when idle; docs/EXPERIMENTS.md). Must be set before torch or numba load OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
