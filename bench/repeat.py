"""Run a bench in N fresh processes, one after another, and summarise the JSON object each prints last: for every
number in it (nested keys joined by "."), the median and the range over the processes.

    python bench/repeat.py 3 bench/sweep_overhead.py [its args…]
    python bench/repeat.py 3 bench/synth_throughput.py --workers 2

A single process on this shared 2-core machine moves by ±5–10 % from one run to the next; the median of
three fresh processes, with the range beside it, is what docs/performance.md reports. Last line: one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any


def numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON object, by dotted key (booleans excluded)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python bench/repeat.py N SCRIPT [ARGS…]", file=sys.stderr)
        return 2
    n, cmd = int(argv[0]), [sys.executable, *argv[1:]]
    runs = []
    for i in range(n):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"process {i + 1} of {n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        last = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(last), file=sys.stderr, flush=True)
        runs.append(numbers(last))
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
               for k in keys}
    for k, s in summary.items():
        print(f"{k:>40}: {s['median']:.4g} ({s['min']:.4g}–{s['max']:.4g})")
    print(json.dumps({"bench": argv[1], "processes": n, "figures": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
