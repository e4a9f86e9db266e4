# -*- test-case-name: tests.test_downtime -*-
"""
The benchmark's results: per rate, each variant's median downtime over the
runs, every run's figure, bytes on the wire, the daemons' (or the baseline
pipelines') CPU seconds, the ratio to the same run's baseline, and the
issues' targets beside the ratios they judge.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterator

#: rate -> (variant, compared with, at most): the issue's targets.
TARGETS: dict[str, tuple[str, str, float]] = {
    "1gbit": ("auto", "baseline", 0.5),
    "10gbit": ("auto", "baseline", 0.8),
    "none": ("auto", "none", 1.10),
}

#: The data path issue's target on the unshaped link: a migration through
#: the daemons takes at most this many times a local dump and restore.
LOCAL_BOUND = 1.5

#: One rate's runs: run index -> variant -> that migration's result.
Runs = list[dict[str, dict[str, Any]]]


def localDowntime(baseline: dict[str, Any]) -> float | None:
    """
    A local C{criu dump -D} to tmpfs and C{criu restore} of the same process,
    with no transfer at all: the baseline's run less its C{tar | socat} step
    (L{None} if its phases were not recorded).
    """
    phases = baseline.get("phases_s", {})
    if not all(name in phases for name in ("dump", "transfer", "answered")):
        return None
    return float(phases["dump"] + phases["answered"] - phases["transfer"])


def localLine(rate: str, runs: Runs, variants: list[str]) -> str | None:
    """
    On the unshaped link: each variant with daemons against a local dump
    and restore of the same run (the data path issue's target).
    """
    if rate != "none":
        return None
    local = [localDowntime(run["baseline"]) if "baseline" in run else None for run in runs]
    measured = [t for t in local if t is not None]
    if not measured:
        return None
    parts = []
    for variant in variants:
        if variant == "baseline":
            continue
        each = [run[variant]["downtime_s"] / t for run, t in zip(runs, local) if t is not None and variant in run]
        if each:
            ratio = statistics.median(each)
            parts.append(f"{variant} {ratio:.2f} x ({'met' if ratio <= LOCAL_BOUND else 'NOT met'})")
    if not parts:
        return None
    return (
        f"target (none): a migration <= {LOCAL_BOUND:g} x a local dump + restore"
        f" (the baseline without its transfer, median {statistics.median(measured):.2f} s): {', '.join(parts)}"
    )


def ratios(runs: Runs, variant: str, reference: str) -> list[float]:
    """C{variant}'s downtime over C{reference}'s, run by run (runs that have both)."""
    return [
        run[variant]["downtime_s"] / run[reference]["downtime_s"]
        for run in runs
        if variant in run and reference in run
    ]


def summary(runs: Runs, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: median downtime, each run's, median bytes on the wire and CPU, ratio to baseline."""
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        results = [run[variant] for run in runs if variant in run]
        if not results:
            continue
        cpu: dict[str, float] = {}
        for name in results[0]["cpu_s"]:
            cpu[name] = statistics.median(r["cpu_s"][name] for r in results)
        peaks: dict[str, float] = {}
        if all("peak_memory_bytes" in r for r in results):
            for name in results[0]["peak_memory_bytes"]:
                peaks[name] = statistics.median(r["peak_memory_bytes"][name] for r in results)
        toBaseline = ratios(runs, variant, "baseline")
        out[variant] = {
            "median_downtime_s": statistics.median(r["downtime_s"] for r in results),
            "downtimes_s": [r["downtime_s"] for r in results],
            "median_wire_bytes": statistics.median(r["wire_bytes"] for r in results),
            "median_cpu_s": cpu,
            "median_peak_memory_bytes": peaks,
            "x_baseline": statistics.median(toBaseline) if toBaseline else None,
        }
    return out


def mebibytes(values: dict[str, float]) -> str:
    """C{name MiB  name MiB}: each daemon's memory."""
    return "  ".join(f"{name} {value / 2**20:.0f}" for name, value in values.items())


def perGigabyte(rows: dict[str, dict[str, Any]], processBytes: int) -> Iterator[str]:
    """Per variant with daemons: their CPU seconds per GB of the process's memory, and their peak memory."""
    for variant, row in rows.items():
        peaks = row["median_peak_memory_bytes"]
        if not peaks:
            continue
        cpu = "  ".join(f"{name} {value / (processBytes / 1e9):.2f}" for name, value in row["median_cpu_s"].items())
        yield f"{variant:<10}cpu s per GB of the process: {cpu};  peak MiB (resident + memfds + pipes): {mebibytes(peaks)}"


def targetLine(rate: str, runs: Runs) -> str | None:
    """The issue's target for C{rate}, and whether this run meets it (C{None}: no target, or not measured)."""
    if rate not in TARGETS:
        return None
    variant, reference, bound = TARGETS[rate]
    measured = ratios(runs, variant, reference)
    goal = f"target ({rate}): {variant} <= {bound:g} x {reference}" if bound < 1 else (
        f"target ({rate}): {variant} within {round((bound - 1) * 100)} % of {reference}"
    )
    if not measured:
        return f"{goal}: not measured (needs modes {variant} and {reference})"
    ratio = statistics.median(measured)
    return f"{goal}: {ratio:.2f} x, {'met' if ratio <= bound else 'NOT met'}"


def table(rate: str, runs: Runs, variants: list[str], processBytes: int | None = None) -> Iterator[str]:
    """The lines of one rate's table (with the daemons' CPU per GB and peak memory if C{processBytes})."""
    rows = summary(runs, variants)
    yield f"{'variant':<10}{'median s':>9}  {'runs s':<22}{'wire MB':>9}  {'cpu s (median)':<32}{'x baseline':>10}"
    for variant, row in rows.items():
        each = " ".join(f"{d:.2f}" for d in row["downtimes_s"])
        cpu = "  ".join(f"{name} {value:.2f}" for name, value in row["median_cpu_s"].items())
        ratio = "-" if row["x_baseline"] is None else f"{row['x_baseline']:.2f}"
        yield (
            f"{variant:<10}{row['median_downtime_s']:>9.2f}  {each:<22}{row['median_wire_bytes'] / 1e6:>9.1f}"
            f"  {cpu:<32}{ratio:>10}"
        )
    if processBytes:
        yield from perGigabyte(rows, processBytes)
    for line in (targetLine(rate, runs), localLine(rate, runs, variants)):
        if line is not None:
            yield line


def document(config: dict[str, Any], results: dict[str, Runs], variants: list[str]) -> dict[str, Any]:
    """Everything, for C{--json}: the configuration, every run, and the summaries."""
    return {
        "config": config,
        "rates": {
            rate: {
                "runs": runs,
                "summary": summary(runs, variants),
                "target": targetLine(rate, runs),
                "local_target": localLine(rate, runs, variants),
            }
            for rate, runs in results.items()
        },
    }
