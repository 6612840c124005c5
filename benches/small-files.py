#!/usr/bin/env python3
"""Generates a tree of many small files for the benchmarks (issues 19 and 20): N files of 1-8 KiB
of incompressible-ish bytes, 100 per directory, 100 directories per level, from a fixed seed, so
two runs (and bitdust and restic in one run) see the same tree.

    python3 benches/small-files.py DIR [N]      (N defaults to 200000)
    python3 benches/small-files.py --touch DIR PERCENT
        appends 64 bytes to PERCENT % of the files (the same ones for the same seed): the
        "re-backup after changing 1 %" step. Prints how many files and their bytes after.
"""
import os
import random
import sys

SEED = 19


def path_of(root, i):
    return os.path.join(root, f"d{i // 10000:03}", f"e{(i // 100) % 100:02}", f"f{i:07}.bin")


def generate(root, n):
    rng = random.Random(SEED)
    for i in range(n):
        p = path_of(root, i)
        if i % 100 == 0:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        size = rng.randint(1024, 8192)
        # Half random, half repeated text: compresses about as real small files do.
        body = rng.randbytes(size // 2) + (b"line of a small file %d\n" % i) * (size // 48 + 1)
        with open(p, "wb") as f:
            f.write(body[:size])


def touch(root, percent):
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
    )
    rng = random.Random(SEED + 1)
    chosen = rng.sample(files, max(1, len(files) * percent // 100))
    total = 0
    for p in chosen:
        with open(p, "ab") as f:
            f.write(rng.randbytes(64))
        total += os.path.getsize(p)
    print(len(chosen), total)


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--touch":
        touch(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    generate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)


if __name__ == "__main__":
    main()
