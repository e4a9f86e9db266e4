# -*- test-case-name: tests.test_downtime -*-
"""
The link between the two "hosts": the loopback of a network namespace of
our own, shaped with a token bucket (C{tc qdisc ... tbf}), so that only the
transfer, whose two ends run in the namespace, crosses the shaped link,
while UNIX sockets still join them to criu in the root namespace.
"""

from __future__ import annotations

import json
import re
import subprocess

#: tc's rate units, in bits per second.
_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


class NetnsError(Exception):
    """A command that sets up the namespace failed."""


def rateBits(rate: str) -> int:
    """
    Bits per second of a tc rate such as C{1gbit}, C{10gbit}, C{500mbit}.

    @raise ValueError: not a rate in bits per second.
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", rate.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"not a rate in bits per second (e.g. 1gbit, 500mbit): {rate!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def burstFor(rate: str) -> str:
    """
    tbf's burst for C{rate}: 8 ms of it, at least 1 MiB (C{1gbit}: 1mb,
    C{10gbit}: 10mb, as the issue shapes them).
    """
    mib = max(1, round(rateBits(rate) / 8 * 0.008 / 10**6))
    return f"{mib}mb"


def shapeCommand(namespace: str, rate: str) -> list[str]:
    """The tc command that shapes the namespace's loopback to C{rate}."""
    return ["tc", "-n", namespace, "qdisc", "replace", "dev", "lo", "root", "tbf",
            "rate", rate, "burst", burstFor(rate), "latency", "100ms"]


def parseLinkBytes(text: str) -> int:
    """Transmitted bytes of the one device in C{ip -s -j link show} output."""
    [device] = json.loads(text)
    return int(device["stats64"]["tx"]["bytes"])


def parseQdiscBytes(text: str) -> int | None:
    """Bytes the root qdisc sent, from C{tc -s -j qdisc show} output (C{None}: no counting qdisc)."""
    for qdisc in json.loads(text):
        if qdisc.get("root") and qdisc.get("kind") != "noqueue":
            return int(qdisc["bytes"])
    return None


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


class Namespace:
    """
    C{tcriu-PID}: created by L{create}, always removed by L{remove}.

    @ivar rate: the tc rate its loopback is shaped to, or C{None} (unshaped).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rate: str | None = None
        self.created = False

    def create(self) -> None:
        _run(["ip", "netns", "add", self.name])
        self.created = True
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def shape(self, rate: str | None) -> None:
        """Shape the loopback to C{rate} (C{None}: remove any shaping)."""
        if rate is None:
            if self.rate is not None:
                _run(["tc", "-n", self.name, "qdisc", "del", "dev", "lo", "root"])
        else:
            _run(shapeCommand(self.name, rate))
        self.rate = rate

    def prefix(self) -> list[str]:
        """Run a command in the namespace (C{ip netns exec} execs it: same pid)."""
        return ["ip", "netns", "exec", self.name]

    def wireBytes(self) -> int:
        """Bytes the loopback sent so far: its device counter (every packet crosses it once)."""
        return parseLinkBytes(_run(["ip", "-n", self.name, "-s", "-j", "link", "show", "dev", "lo"]))

    def qdiscBytes(self) -> int | None:
        """Bytes the shaping qdisc sent so far (C{None} when unshaped)."""
        return parseQdiscBytes(_run(["tc", "-n", self.name, "-s", "-j", "qdisc", "show", "dev", "lo"]))

    def remove(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False
