# -*- test-case-name: tests.test_chains,tests.test_cli_errors,tests.test_cli_progress -*-
"""
C{twisted-criu ls}, C{drop} and C{pull}: the daemons' control API from the
command line, through L{twisted_criu.cli.client.ControlClient}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.python import usage

from twisted_criu import wire
from twisted_criu.cli.bar import ProgressBar
from twisted_criu.cli.client import ControlClient
from twisted_criu.cli.common import AnyOrderOptions, CommandError, positiveSeconds
from twisted_criu.errors import ProtocolError
from twisted_criu.flow.ratelimit import describeRate
from twisted_criu.progress import formatBytes


class ControlOptions(AnyOrderOptions):
    """C{--from} and C{--timeout}, which every control command takes."""

    optParameters: list[list[Any]] = [
        ["from", "f", ".", "The daemon: its images directory (-D), its control socket, or an endpoint string."],
        ["timeout", None, 60.0, "Give up when the daemon sent nothing for this many seconds.", positiveSeconds],
    ]

    def postOptions(self) -> None:
        where = self["from"]
        if ":" in where and not os.path.exists(where):
            from twisted.internet import reactor

            try:
                clientFromString(reactor, where)
            except ValueError as e:
                raise usage.UsageError(
                    f"--from {where}: {e} (give the daemon's -D directory, its control socket,"
                    " or an endpoint such as unix:/path/cache-control.sock)"
                ) from None

    def client(self, reactor: Any) -> ControlClient:
        return ControlClient(reactor, self["from"], self["timeout"])


# -- ls ------------------------------------------------------------------------


class LsOptions(ControlOptions):
    synopsis = "[--from WHERE] [-l] [--json]"
    longdesc = description = "List the sessions a daemon holds (and with -l their images)."
    optFlags = [["long", "l", "Also list every image."], ["json", None, "Print the daemon's JSON."]]


@defer.inlineCallbacks
def ls(reactor: Any, options: LsOptions, out: Any, barStream: Any = None) -> Any:
    client = options.client(reactor)
    try:
        listing = yield client.sessions()
        if options["long"]:
            details = []
            for session in listing["sessions"]:
                details.append((yield client.session(session["id"])))
            listing["sessions"] = details
    finally:
        client.close()
    if options["json"]:
        out.write(json.dumps(listing, indent=1) + "\n")
        return
    sessions = listing["sessions"]
    out.write(f"criu-{listing['role']} at {options['from']}: {len(sessions)} session(s)\n")
    out.write(describeStore(listing.get("store")))
    out.write(describeLink(listing.get("link")))
    for s in sessions:
        ids = ", ".join(i or '""' for i in s["snapshot_ids"]) or "-"
        spilled = s.get("spilled_bytes") or 0
        onDisk = f" ({formatBytes(spilled)} spilled)" if spilled else ""
        out.write(
            f"  session {s['id']:>4}  {s['state']:<24} {s['image_count']:>5} images"
            f" {formatBytes(s['bytes']):>10}{onDisk}  snapshots: {ids}\n"
        )
        for image in s.get("images", []):
            where = f"{image['snapshot_id']}/" if image["snapshot_id"] else ""
            out.write(f"      {image['size']:>14,}  {where}{image['name']}\n")


def describeStore(store: dict[str, Any] | None) -> str:
    """The daemon's bytes in memory and spilled to disk, as one line (none from an older daemon)."""
    if not store:
        return ""
    limit = store.get("memory_limit_bytes")
    budget = f" of a {formatBytes(limit)} memory limit" if limit else ""
    return (
        f"  store: {formatBytes(store['memory_bytes'])} in memory{budget},"
        f" {formatBytes(store['spilled_bytes'])} spilled to disk\n"
    )


def describeLink(link: dict[str, Any] | None) -> str:
    """The link's rate limit and what it achieves, as one line (none without --rate-limit)."""
    if not link:
        return ""
    return (
        f"  link: {describeRate(link['achieved_bytes_per_second'])} now,"
        f" --rate-limit {describeRate(link['rate_limit_bytes_per_second'])};"
        f" {formatBytes(link['sent_bytes'])} sent\n"
    )


# -- drop ----------------------------------------------------------------------


class DropOptions(ControlOptions):
    synopsis = "[--from WHERE] SESSION"
    longdesc = description = "Drop a session's images (a kept one, or the current one when idle)."
    arguments = (("session", "SESSION", "the session to drop (`twisted-criu ls` lists them)"),)


@defer.inlineCallbacks
def drop(reactor: Any, options: DropOptions, out: Any, barStream: Any = None) -> Any:
    client = options.client(reactor)
    try:
        result = yield client.drop(options["session"])
    finally:
        client.close()
    dropped = result["dropped"]
    out.write(
        f"dropped session {dropped['id']}: {dropped['image_count']} images,"
        f" {formatBytes(dropped['bytes'])}\n"
    )


# -- pull ----------------------------------------------------------------------


class PullOptions(ControlOptions):
    synopsis = "[--from WHERE] [--session ID] [--snapshot-id ID] DIR"
    longdesc = description = (
        "Write a session's images into DIR, ready for `criu restore -D DIR`. "
        "The chosen snapshot goes to DIR, its parent snapshot (if the session "
        "is a chain of dumps) to DIR/parent, and so on. A progress bar is shown "
        "when standard error is a terminal."
    )
    arguments = (("directory", "DIR", "the directory to write the images to"),)
    optParameters = [
        ["session", "s", None, "The session [default: the current one if it holds images, else the last kept one]."],
        ["snapshot-id", None, None, "The snapshot to restore [default: the last of the session's chain]."],
    ]
    optFlags = [
        ["force", None, "Overwrite image files that exist in DIR."],
        ["no-progress", None, "No progress bar, even on a terminal."],
    ]


def _pickSession(sessions: list[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
    if wanted is not None:
        for session in sessions:
            if session["id"] == wanted:
                return session
        raise CommandError(f"--session {wanted}: no such session (`twisted-criu ls` lists them)")
    candidates = [s for s in reversed(sessions) if s["current"] and s["image_count"]]
    candidates += [s for s in reversed(sessions) if s["kept"]]
    if not candidates:
        raise CommandError("the daemon holds no images (`twisted-criu ls` lists its sessions)")
    return candidates[0]


@defer.inlineCallbacks
def pull(reactor: Any, options: PullOptions, out: Any, barStream: Any = None) -> Any:
    """
    Pull the session, writing what happens to C{out} and, if C{barStream}
    is given, a progress bar to it.
    """
    client = options.client(reactor)
    try:
        yield _pull(client, options, out, barStream)
    finally:
        client.close()


def _lineage(session: dict[str, Any], wanted: str | None) -> list[tuple[str, list[dict[str, Any]]]]:
    """The chosen snapshot, then its parents (DIR, DIR/parent, ...), each with its images."""
    chain: list[str] = session["snapshot_ids"]
    snapshot = wanted
    if snapshot is None:
        snapshot = chain[-1] if chain else ""
    elif snapshot not in chain:
        raise CommandError(f"session {session['id']} has no snapshot {snapshot!r} (it has {chain}): check --snapshot-id")
    lineage = [snapshot]
    if snapshot in chain:
        lineage = list(reversed(chain[: chain.index(snapshot) + 1]))
    byName: dict[str, list[dict[str, Any]]] = {}
    for image in session["images"]:
        byName.setdefault(image["snapshot_id"], []).append(image)
    result = []
    for snapshotId in lineage:
        images = [
            i for i in byName.get(snapshotId, []) if not (i["snapshot_id"] == "" and i["name"] == wire.PARENT_IMAGE and chain)
        ]
        if not images:
            raise CommandError(f"session {session['id']} holds no images of snapshot {snapshotId!r}")
        for image in images:
            try:
                wire.checkName(image["name"])  # never a path, whatever the daemon says
            except ProtocolError as e:
                raise CommandError(f"refusing an image name from the daemon: {e}")
        result.append((snapshotId, images))
    return result


@defer.inlineCallbacks
def _pull(client: ControlClient, options: PullOptions, out: Any, barStream: Any) -> Any:
    listing = yield client.sessions()
    chosen = _pickSession(listing["sessions"], options["session"])
    session = yield client.session(chosen["id"])
    lineage = _lineage(session, options["snapshot-id"])
    directory = options["directory"]
    targets = [os.path.join(directory, *(["parent"] * depth)) for depth in range(len(lineage))]
    for target, (_, images) in zip(targets, lineage):
        for image in images:
            path = os.path.join(target, image["name"])
            if os.path.lexists(path) and not options["force"]:
                raise CommandError(f"{path} exists (use --force to overwrite)")
    total = sum(image["size"] for _, images in lineage for image in images)
    bar = ProgressBar(total, "pull", barStream, barStream is not None and not options["no-progress"])
    done: list[str] = []
    try:
        for target, (snapshotId, images) in zip(targets, lineage):
            try:
                os.makedirs(target, mode=0o700, exist_ok=True)
            except OSError as e:
                raise CommandError(f"cannot create the directory {target}: {e.strerror}") from None
            for image in images:
                path = os.path.join(target, image["name"])
                yield client.download(session["id"], snapshotId, image["name"], path, image["size"], bar.advance)
            label = repr(snapshotId) if snapshotId else "(stream images)"
            done.append(f"  {target}: snapshot {label}, {len(images)} images\n")
    finally:
        bar.close()
    for line in done:
        out.write(line)
    count = sum(len(images) for _, images in lineage)
    out.write(f"pulled session {session['id']}: {count} images, {formatBytes(total)} into {directory}\n")
