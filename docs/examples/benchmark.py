"""
A small run of the benchmark, for the benchmarks page:

    python docs/examples/benchmark.py OUTPUT_DIR

Runs C{bench/run.py} once on 256 MiB (2 x 128 MiB + 10 x 16 KiB), with the
daemons' default link (TLS with a link key) into C{default.txt}, and with
C{--plain-link} on both daemons into C{plain.txt} (no socat baseline
there: it is the same as in the first).  The socat baseline needs
C{/usr/bin/socat}; without it the run says so and leaves it out.  The JSON
line the benchmark ends with is left out.  A run this small, on whatever
machine builds the docs, shows what the benchmark prints and the order of
magnitude; the bench's own C{--runs} and sizes are for measurements.
"""

from __future__ import annotations

import os
import subprocess
import sys

SIZE = ["--runs", "1", "--large", "2", "--large-size", "128M", "--small", "10"]
RUNS = {
    "default.txt": [],
    "plain.txt": ["--skip-socat", "--proxy-args=--plain-link", "--cache-args=--plain-link"],
}


def run(extra: list[str]) -> str:
    if "--skip-socat" not in extra and not os.access("/usr/bin/socat", os.X_OK):
        extra = [*extra, "--skip-socat"]
    done = subprocess.run(
        [sys.executable, "bench/run.py", *SIZE, *extra],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240, check=False,
    )
    if done.returncode != 0:
        sys.exit(f"bench/run.py {' '.join(extra)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if not line.startswith("{")]
    return "\n".join(["$ python bench/run.py " + " ".join([*SIZE, *extra]), *lines]).rstrip() + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/benchmark.py OUTPUT_DIR")
    for name, extra in RUNS.items():
        with open(os.path.join(sys.argv[1], name), "w") as f:
            f.write(run(extra))
