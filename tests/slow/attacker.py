"""
The attacker of C{tests.slow.test_attacks}: a standalone script (standard
library only, so that it runs as any user, e.g. C{nobody} under C{setpriv})
that connects to a daemon's socket, does one hostile thing, and prints one
JSON line saying what happened:

    connected  the connection was made (else: error says why)
    sent       bytes (or, for fds, descriptors) the daemon's socket took
    received   the first bytes the daemon sent back, in hex
    closed     the daemon closed the connection (EOF or reset)
    seconds    from the connect until the close (closedAt: when, on the
               system's monotonic clock)
    error      the first error met, if any

Frames are built by the test (with twisted_criu.wire) and given in hex.
Commands (TARGET is HOST:PORT for TCP, a path for a UNIX socket):

    send TARGET HEX WAIT          send HEX, then wait up to WAIT s for the close
    idle TARGET WAIT              send nothing, wait up to WAIT s for the close
    drip TARGET WAIT              a 1 KiB frame's length, then 1 byte a second
    scan TARGET COUNT             connect and close COUNT times
    junk TARGET HEX MIB KIND [PAUSE]
                                  send HEX, (wait PAUSE s,) then MIB MiB of junk
                                  (KIND: random, or repeat: HEX again and again)
    fds TARGET COUNT              pass COUNT descriptors, one per message
    write TARGET HEX DATAHEX      a write as criu does: HEX, then a pipe's read
                                  end (SCM_RIGHTS), then DATAHEX into the pipe
    held TARGET HEX MOREHEX WAIT  send HEX, print "held", wait for a line on
                                  stdin, send MOREHEX, wait up to WAIT s
    burst HOST:PORT HEX COUNT     COUNT connections, HEX sent on each, then all
                                  closed (a closed socket is listed as root's)
    reuse HOST:PORT HEX TRIES     connect from a port that also has a TIME_WAIT
                                  socket (listed as root's); "accepted" counts
                                  the tries the daemon answered
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Callable

MiB = 1 << 20


def connect(target: str) -> socket.socket:
    if os.sep in target:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target)
        return sock
    host, port = target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


class Attack:
    def __init__(self, target: str) -> None:
        self.result: dict[str, Any] = {
            "connected": False, "sent": 0, "received": "", "closed": False, "seconds": None, "error": None,
        }
        self.started = time.monotonic()
        self.sock = connect(target)
        self.result["connected"] = True

    def send(self, data: bytes) -> bool:
        """Send it all; False (and the error noted) if the daemon stopped taking it."""
        self.sock.settimeout(10)
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except OSError as e:
                self.note(e)
                return False
            self.result["sent"] += n
            view = view[n:]
        return True

    def note(self, error: BaseException) -> None:
        if self.result["error"] is None:
            self.result["error"] = f"{type(error).__name__}: {error}"
        if isinstance(error, (BrokenPipeError, ConnectionResetError)):
            self.closed()

    def closed(self) -> None:
        if not self.result["closed"]:
            self.result["closed"] = True
            self.result["seconds"] = round(time.monotonic() - self.started, 3)
            self.result["closedAt"] = time.monotonic()  # CLOCK_MONOTONIC: the test's clock too

    def waitForClose(self, seconds: float, tick: Callable[[], object] | None = None) -> None:
        """Read (and keep the first bytes of) what comes, until the daemon closes or C{seconds} pass."""
        deadline = time.monotonic() + seconds
        received = bytearray()
        while not self.result["closed"]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if tick is not None:
                    tick()
                continue
            except OSError as e:
                self.note(e)
                self.closed()
                break
            if not data:
                self.closed()
                break
            received += data[: max(0, 64 - len(received))]
        self.result["received"] = received.hex()

    def report(self) -> None:
        self.sock.close()  # (again: closing twice is harmless)
        print(json.dumps(self.result), flush=True)


def reuseTimeWaitPort(target: str, data: bytes, tries: int) -> dict[str, Any]:
    """
    Each try: leave a TIME_WAIT socket on a port (a connection to our own
    listener, closed from our side), then connect to C{target} from that
    same port and send C{data}.
    """
    host, port = target.rsplit(":", 1)
    accepted = 0
    for _ in range(tries):
        listener = socket.create_server(("127.0.0.1", 0))
        first = socket.socket()
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        first.connect(listener.getsockname())
        other, _ = listener.accept()
        local = first.getsockname()
        first.close()  # ours closes first: ours goes to TIME_WAIT
        other.close()
        listener.close()
        time.sleep(0.01)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(local)
            sock.connect((host, int(port)))
            sock.sendall(data)
            sock.settimeout(1)
            if sock.recv(100):
                accepted += 1
        except OSError:
            pass
        finally:
            sock.close()
    return {"connected": True, "sent": tries, "accepted": accepted}


def main(argv: list[str]) -> None:
    command, target, *args = argv
    if command == "scan":
        count = 0
        for _ in range(int(args[0])):
            connect(target).close()
            count += 1
        print(json.dumps({"connected": True, "sent": count}), flush=True)
        return
    if command == "burst":
        sockets = [connect(target) for _ in range(int(args[1]))]
        for sock in sockets:
            sock.sendall(bytes.fromhex(args[0]))
        for sock in sockets:
            sock.close()
        print(json.dumps({"connected": True, "sent": len(sockets)}), flush=True)
        return
    if command == "reuse":
        print(json.dumps(reuseTimeWaitPort(target, bytes.fromhex(args[0]), int(args[1]))), flush=True)
        return
    try:
        attack = Attack(target)
    except OSError as e:
        print(json.dumps({"connected": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    if command == "send":
        attack.send(bytes.fromhex(args[0]))
        attack.waitForClose(float(args[1]))
    elif command == "idle":
        attack.waitForClose(float(args[0]))
    elif command == "drip":
        attack.send((1024).to_bytes(4, "little"))
        attack.waitForClose(float(args[0]), tick=lambda: attack.send(b"\x01"))
    elif command == "junk":
        request, size, kind = bytes.fromhex(args[0]), int(args[1]) * MiB, args[2]
        block = os.urandom(MiB) if kind == "random" else request * (MiB // len(request))
        if attack.send(request):
            time.sleep(float(args[3]) if len(args) > 3 else 0)
            while attack.result["sent"] < size + len(request) and attack.send(block):
                pass
        attack.waitForClose(10)
    elif command == "fds":
        readEnd, writeEnd = os.pipe()
        attack.sock.settimeout(10)
        for _ in range(int(args[0])):
            try:
                socket.send_fds(attack.sock, [b"\0"], [readEnd])
            except OSError as e:
                attack.note(e)
                break
            attack.result["sent"] += 1
        attack.waitForClose(10)
    elif command == "write":
        attack.send(bytes.fromhex(args[0]))
        readEnd, writeEnd = os.pipe()
        socket.send_fds(attack.sock, [b"\0"], [readEnd])
        os.close(readEnd)
        attack.sock.close()  # as criu does once the pipe is passed
        os.write(writeEnd, bytes.fromhex(args[1]))
        os.close(writeEnd)
    elif command == "held":
        attack.send(bytes.fromhex(args[0]))
        print("held", flush=True)
        sys.stdin.readline()
        attack.send(bytes.fromhex(args[1]))
        attack.waitForClose(float(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    attack.report()


if __name__ == "__main__":
    main(sys.argv[1:])
