"""Progress bars: on a terminal they show, with rate and ETA; redirected or --quiet they do not."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import make_corpus

BAR = "\u2501"  # the bar's glyph


def run(args: list[str], terminal: bool, tmp_path) -> str:
    """stderr of `newllm ARGS`, written to a pseudo-terminal or to a file."""
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "newllm_cli", *args]
    if not terminal:
        with open(tmp_path / "stderr.txt", "w+b") as err:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, check=True)
            err.seek(0)
            return err.read().decode()
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait() == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_only(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt", docs=200)
    base = ["--workspace", str(tmp_path / "ws"), "--source", "text_file", "--path", str(corpus), "--tokenizer", "byte"]
    run(["prepare-data", *base], False, tmp_path)
    phase1 = ["phase1", *base, "--phase1-max-iterations", "3", "--rebuild"]  # each run trains again
    seen = run(phase1, True, tmp_path)
    assert BAR in seen and "phase1 train iteration 1" in seen and "eta" in seen
    assert "iteration  2: cvfp" in seen  # the info lines as well
    redirected = run(phase1, False, tmp_path)
    assert BAR not in redirected and "\x1b[" not in redirected and "\r" not in redirected
    assert "iteration  2: cvfp" in redirected
    quiet = run([*phase1, "--quiet"], True, tmp_path)
    assert (
        BAR not in quiet and "iteration  2" not in quiet and "--phase1-max-iterations 3" in quiet
    )  # the warning stays
