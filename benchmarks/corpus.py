"""Real English text that every Python install has, for benchmarks and trials: the topics of the
Python documentation shipped with the interpreter (`pydoc_data`), optionally with the system's
licence texts, one document per topic or licence, documents separated by blank lines.

    python benchmarks/corpus.py OUT.txt [--licences] [--bytes N]   # N: repeat up to N bytes
    python benchmarks/corpus.py OUT.txt --val-every 5    # every 5th document to OUT.val.txt instead
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def documents(licences: bool = False) -> list[str]:
    from pydoc_data import topics

    docs = [re.sub(r"\n\s*\n", "\n", text.strip()) for _, text in sorted(topics.topics.items())]
    if licences:
        for f in sorted(Path("/usr/share/common-licenses").glob("*")):
            if f.is_file() and not f.is_symlink():
                docs.append(re.sub(r"\n\s*\n", "\n", f.read_text(errors="replace").strip()))
    return [d for d in docs if d]


def build(out: Path, licences: bool = False, size: int | None = None, val_every: int | None = None) -> Path:
    """Write the documents to `out`, repeated until `size` bytes when given, every `val_every`-th
    one to OUT.val.txt instead when given (a validation set that does not move); return `out`."""
    docs = documents(licences)
    if val_every:
        out.with_suffix(".val.txt").write_text("\n\n".join(docs[val_every - 1 :: val_every]) + "\n")
        docs = [d for i, d in enumerate(docs) if (i + 1) % val_every]
    text = "\n\n".join(docs) + "\n"
    if size:
        text = ((text + "\n") * (size // len(text) + 1))[:size]
    out.write_text(text)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--licences", action="store_true")
    ap.add_argument("--bytes", type=int)
    ap.add_argument("--val-every", type=int)
    a = ap.parse_args()
    print(build(a.out, a.licences, a.bytes, a.val_every))
