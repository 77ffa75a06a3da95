"""What binding every artifact to its content costs: a command run with the content checks on (as
shipped: sha256 of tokens, offsets, contexts and tokenizer by the writer, checked by every reader)
and off (the same code with those hashes skipped; network and head ids are recomputed in both),
interleaved and repeated in one script, each run in a fresh process and workspace.

    python benchmarks/content_checks.py full   --text pydoc.txt [--repeats 2]
    python benchmarks/content_checks.py phase1 --text T.txt [--tokens 10000000] [--repeats 2]

`full` runs `newllm full` on the text (BPE 4,096, defaults otherwise, --force past the gate);
`phase1` prepares TOKENS byte tokens once (T.txt from `python benchmarks/corpus.py T.txt
--licences --bytes 12600000`) and times `newllm phase1` on them (3 iterations: the checks' share is
largest when the stage is shortest). Prints seconds per run and the ratio on / off.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def child(mode: str, argv: list[str]) -> int:
    """newllm `argv` in this process, with the content checks `off` or `on`."""
    sys.path.insert(0, str(CHECKOUT))
    if mode == "off":
        from newllm_cli.data import tokenizer
        from newllm_cli.store import validate

        real_array, real_load = validate.array, tokenizer.load
        validate.digest = lambda a: None  # type: ignore[assignment]
        validate.array = lambda *a, **k: real_array(*a, **{**k, "sha256": None})  # type: ignore[assignment]
        tokenizer.load = lambda path, sha256=None: real_load(path)  # type: ignore[assignment]
    from newllm_cli.cli.app import main

    return main(argv)


def timed(mode: str, argv: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", mode, "--", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode}: {r.stderr[-800:]}")
    return time.perf_counter() - t0


def compare(make_argv, repeats: int) -> None:
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(repeats):
        for mode in ("off", "on") if i % 2 else ("on", "off"):
            seconds[mode].append(timed(mode, make_argv(mode, i)))
            print(f"  {mode} run {i}: {seconds[mode][-1]:.1f} s", file=sys.stderr)
    ratios = [a / b for a, b in zip(seconds["on"], seconds["off"])]
    print("| checks | seconds per run | ratio on / off |\n| --- | --- | --- |")
    for mode in ("off", "on"):
        print(f"| {mode} | {', '.join(f'{x:.1f}' for x in seconds[mode])} | |")
    print(f"| | | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["full", "phase1"])
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="checks."))
    if a.what == "full":
        base = ["--source", "text_file", "--path", str(a.text), "--force", "--threads", "1"]
        compare(lambda mode, i: ["full", "--workspace", str(root / f"{mode}{i}"), *base], a.repeats)
        return
    text = root / "tokens.txt"
    text.write_bytes((a.text.read_bytes() * (a.tokens // max(1, a.text.stat().st_size) + 1))[: a.tokens])
    base = ["--workspace", str(root / "ws"), "--source", "text_file", "--path", str(text), "--tokenizer", "byte"]
    base += ["--val-duplicates", "keep"]  # the text repeats itself: its val documents are training ones
    timed("on", ["prepare-data", *base])
    run = ["--phase1-max-iterations", "3", "--threads", "1"]
    compare(lambda mode, i: ["phase1", *base, "--run", f"{mode}{i}", *run], a.repeats)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        raise SystemExit(child(sys.argv[2], sys.argv[4:]))
    main()
