"""Word count over a folder of text files: map-reduce on shoal.

The example first writes a folder of text files to a temporary directory. Then each file
is counted by one task (map), and the counts are merged pairwise by tasks until one is
left (a tree reduction): the partial counts move between workers, never through here.

    python examples/word_count.py             # 200 files of 20,000 words
    python examples/word_count.py --small     # 10 files of 2,000 words (a smoke test)
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import shoal

VOCABULARY = ("the quick brown fox jumps over lazy dog shoal cluster worker task future "
              "graph data moves between workers never through scheduler").split()  # fmt: skip


def write_corpus(folder: Path, files: int, words: int) -> None:
    """Text files of words drawn (unevenly, so some are common) from the vocabulary."""
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) for rank in range(len(VOCABULARY))]
    for i in range(files):
        chosen = rng.choices(VOCABULARY, weights, k=words)
        lines = [" ".join(chosen[j:j + 12]) for j in range(0, words, 12)]
        (folder / f"doc-{i:04d}.txt").write_text("\n".join(lines) + "\n")


def count_words(path: str) -> Counter[str]:
    """Map: the words of one file."""
    with open(path) as f:
        return Counter(f.read().split())


def merge(a: Counter[str], b: Counter[str]) -> Counter[str]:
    """Reduce: two counts into one."""
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="10 small files instead of 200")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    files, words = (10, 2_000) if args.small else (200, 20_000)

    with tempfile.TemporaryDirectory(prefix="shoal-word-count-") as tmp:
        folder = Path(tmp)
        write_corpus(folder, files, words)
        paths = sorted(str(p) for p in folder.glob("*.txt"))
        with shoal.Client(n_workers=args.workers, threads_per_worker=1) as client:
            start = time.perf_counter()
            counts = client.map(count_words, paths)
            while len(counts) > 1:  # pairwise merges, level by level
                merged = [client.submit(merge, a, b) for a, b in zip(counts[::2], counts[1::2])]
                counts = merged + ([counts[-1]] if len(counts) % 2 else [])
            total: Counter[str] = counts[0].result()
            elapsed = time.perf_counter() - start
        expected = sum((count_words(p) for p in paths), Counter())

    print(f"word count: {files} files, {sum(total.values()):,} words,"
          f" {len(total)} distinct, on {args.workers} workers")  # fmt: skip
    print("most common: " + ", ".join(f"{w} {n:,}" for w, n in total.most_common(5)))
    print(f"took {elapsed:.2f} s")
    assert total == expected, "the distributed count differs from a local one"


if __name__ == "__main__":
    main()
