"""Summarize py-spy raw stacks (`py-spy record -f raw --threads`, as run.sh PROFILE=1 records them): per thread,
its share of the samples, then the frames with the largest inclusive share and the largest own (leaf) share.
Usage: python pyspy_summary.py FILE.raw [MIN_SHARE]"""

from __future__ import annotations

import collections
import sys


def frame_name(frame: str) -> str:
    """'function (path/file.py:line)' -> 'function file.py:line'."""
    function, _, where = frame.partition(" (")
    return f"{function} {where.rstrip(')').rsplit('/', 1)[-1]}"


def main() -> None:
    min_share = float(sys.argv[2]) if len(sys.argv) > 2 else 0.03
    samples: collections.Counter = collections.Counter()
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(sys.argv[1]):
        stack, _, count = line.rstrip().rpartition(" ")
        thread, *frames = stack.split(";")  # --threads: "thread (tid): name" first
        thread, count = thread.rsplit(":", 1)[-1].strip(), int(count)
        samples[thread] += count
        for frame in set(frames):
            inclusive[thread][frame_name(frame)] += count
        if frames:
            own[thread][frame_name(frames[-1])] += count
    total = sum(samples.values())
    for thread, count in samples.most_common(4):
        print(f"\n=== {thread}: {count / total:.1%} of the samples")
        for title, counter in (("inclusive", inclusive[thread]), ("own", own[thread])):
            print(f"  -- {title}")
            for frame, n in counter.most_common():
                if n / count >= min_share and n < count:
                    print(f"  {n / count:6.1%} {frame}")


if __name__ == "__main__":
    main()
