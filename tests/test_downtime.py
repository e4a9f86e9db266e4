"""
The downtime benchmark's helpers (C{bench.downtime}): rates and shaping,
link counters, RESP, the data set, memory sampling, the report and the
command line.  The whole command runs in C{tests.slow.test_criu_downtime}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from bench.downtime import dataset, memory, report
from bench.downtime.command import parser, phases
from bench.downtime.migrate import listensOn
from bench.downtime.netns import burstFor, parseLinkBytes, parseQdiscBytes, rateBits, shapeCommand
from bench.downtime.redis import FirstAnswer, RedisClient, RedisError, command
from bench.downtime.sample import BLOCK, samplePoints, writableMappings
from bench.downtime.tools import hasCompress, missingPackages


class RateTests(SynchronousTestCase):
    def test_rateBits(self) -> None:
        self.assertEqual(rateBits("1gbit"), 10**9)
        self.assertEqual(rateBits("10Gbit"), 10**10)
        self.assertEqual(rateBits("500mbit"), 5 * 10**8)
        self.assertEqual(rateBits("2.5gbit"), 25 * 10**8)

    def test_notARate(self) -> None:
        for bad in ("fast", "1gb/s", "", "gbit", "1 gbyte"):
            self.assertRaises(ValueError, rateBits, bad)

    def test_burstIsEightMillisecondsAtLeastOneMiB(self) -> None:
        """The issue's shaping: 1gbit with a 1mb burst, 10gbit with 10mb; slower links keep 1mb."""
        self.assertEqual(burstFor("1gbit"), "1mb")
        self.assertEqual(burstFor("10gbit"), "10mb")
        self.assertEqual(burstFor("100mbit"), "1mb")
        self.assertEqual(burstFor("40gbit"), "40mb")

    def test_shapeCommand(self) -> None:
        self.assertEqual(
            shapeCommand("tcriu-1", "1gbit"),
            "tc -n tcriu-1 qdisc replace dev lo root tbf rate 1gbit burst 1mb latency 100ms".split(),
        )


class CounterTests(SynchronousTestCase):
    def test_linkBytes(self) -> None:
        text = json.dumps([{"ifname": "lo", "stats64": {"rx": {"bytes": 5}, "tx": {"bytes": 1234, "packets": 3}}}])
        self.assertEqual(parseLinkBytes(text), 1234)

    def test_qdiscBytes(self) -> None:
        tbf = [{"kind": "tbf", "handle": "8001:", "root": True, "bytes": 987, "packets": 2}]
        self.assertEqual(parseQdiscBytes(json.dumps(tbf)), 987)

    def test_noqueueCountsNothing(self) -> None:
        """An unshaped loopback has noqueue, whose counters stay 0: no figure rather than a wrong one."""
        noqueue = [{"kind": "noqueue", "handle": "0:", "root": True, "bytes": 0}]
        self.assertIsNone(parseQdiscBytes(json.dumps(noqueue)))

    def test_listensOn(self) -> None:
        text = (
            "  sl  local_address rem_address   st tx_queue\n"
            "   0: 0100007F:270C 00000000:0000 0A 00000000:00000000\n"
            "   1: 0100007F:270D 0100007F:9C40 01 00000000:00000000\n"
        )
        self.assertTrue(listensOn(text, 9996))
        self.assertFalse(listensOn(text, 9997), "established, not listening")
        self.assertFalse(listensOn(text, 80))


class RespTests(SynchronousTestCase):
    def client(self, answer: bytes) -> tuple[RedisClient, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.sendall(answer)
        return RedisClient("", sock=ours), theirs

    def test_command(self) -> None:
        self.assertEqual(command("SET", "k", b"\x00\r\n", 12), b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n\x00\r\n\r\n$2\r\n12\r\n")

    def test_replies(self) -> None:
        client, _ = self.client(b"+PONG\r\n:42\r\n$5\r\nab\r\nc\r\n$-1\r\n")
        self.assertEqual(client.reply(), b"PONG")
        self.assertEqual(client.reply(), 42)
        self.assertEqual(client.reply(), b"ab\r\nc")
        self.assertIsNone(client.reply())

    def test_errorReply(self) -> None:
        client, _ = self.client(b"-ERR unknown command\r\n")
        self.assertRaises(RedisError, client.reply)

    def test_usedMemoryAndDigest(self) -> None:
        info = b"# Memory\r\nused_memory:123456\r\nused_memory_human:120K\r\n"
        client, theirs = self.client(b"$%d\r\n%s\r\n+0123abcd\r\n" % (len(info), info))
        self.assertEqual(client.usedMemory(), 123456)
        self.assertEqual(client.digest(), "0123abcd")
        self.assertEqual(theirs.recv(1000), command("INFO", "memory") + command("DEBUG", "DIGEST"))

    def test_pipelineReadsEveryReply(self) -> None:
        client, _ = self.client(b"+OK\r\n:1\r\n+OK\r\n+PONG\r\n")
        client.pipeline(b"", 3)
        self.assertEqual(client.reply(), b"PONG")


class FirstAnswerTests(SynchronousTestCase):
    def test_answerSeenWhileTheRestoreRuns(self) -> None:
        """
        Polling starts before anything listens (a dumped redis's stale
        socket): the first PONG is timed when it comes, not when asked for.
        """
        import shutil
        import tempfile
        import threading

        base = tempfile.mkdtemp(prefix="tc-")  # AF_UNIX paths must stay short
        self.addCleanup(shutil.rmtree, base, True)
        path = os.path.join(base, "redis.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nothing listens: refused
        watch = FirstAnswer(path, timeout=10, interval=0.001)
        served: list[float] = []

        def serve() -> None:
            os.unlink(path)
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen()
            connection, _ = server.accept()
            connection.recv(100)
            served.append(time.monotonic())
            connection.sendall(b"+PONG\r\n")
            connection.close()
            server.close()

        time.sleep(0.2)
        thread = threading.Thread(target=serve)
        thread.start()
        answered = watch.wait()
        thread.join()
        self.assertGreaterEqual(answered, served[0])
        self.assertLess(answered - served[0], 0.1)
        time.sleep(0.2)  # asked later, it still says when
        self.assertEqual(watch.wait(), answered)

    def test_noAnswer(self) -> None:
        """Nothing answers within the timeout: a clear error; a cancelled watch stops at once."""
        path = self.mktemp() + ".sock"
        self.assertRaises(RedisError, FirstAnswer(path, timeout=0.05).wait)
        watch = FirstAnswer(path, timeout=60)
        started = time.monotonic()
        watch.cancel()
        self.assertLess(time.monotonic() - started, 5)
        self.assertIsNone(watch.answered)


class DatasetTests(SynchronousTestCase):
    def test_sameSeedSameData(self) -> None:
        self.assertEqual(next(dataset.Records(5).batches()), next(dataset.Records(5).batches()))
        self.assertNotEqual(next(dataset.Records(5).batches())[0], next(dataset.Records(6).batches())[0])

    def test_mix(self) -> None:
        """Of every 20 keys: BLOB_SHARE random blobs, 11 user hashes, the rest JSON sessions."""
        records = dataset.Records(1)
        kinds = [records.next().split(b"\r\n")[4].split(b":")[0] for _ in range(40)]
        self.assertEqual(kinds.count(b"blob"), 2 * dataset.BLOB_SHARE)
        self.assertEqual(kinds.count(b"user"), 22)
        self.assertEqual(kinds.count(b"session"), 40 - 22 - 2 * dataset.BLOB_SHARE)

    def test_buildStopsAtTarget(self) -> None:
        sent: list[int] = []
        batches = dataset.build(3, 3, lambda payload, count: sent.append(count), lambda: len(sent))
        self.assertEqual(len(batches), 3)
        self.assertEqual(sent, [dataset.BATCH] * 3)
        self.assertEqual(batches[0], next(dataset.Records(3).batches()))


class SampleTests(SynchronousTestCase):
    MAPS = (
        "55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/redis-check-rdb\n"
        "55d0c0200000-55d0c0300000 rw-p 00100000 08:01 123 /usr/bin/redis-check-rdb\n"
        "55d0c1000000-55d0c5000000 rw-p 00000000 00:00 0 [heap]\n"
        "7f0000000000-7f0004000000 rw-p 00000000 00:00 0 \n"
        "7f0010000000-7f0010100000 rw-s 00000000 00:05 9 /dev/zero (deleted)\n"
        "7f0020000000-7f0020100000 rw-s 00000000 00:00 0 \n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]\n"
        "7ffc000fe000-7ffc00100000 r-xp 00000000 00:00 0 [vdso]\n"
    )

    def test_privateWritableOnly(self) -> None:
        self.assertEqual(
            list(writableMappings(self.MAPS)),
            [(0x55D0C1000000, 0x55D0C5000000), (0x7F0000000000, 0x7F0004000000), (0x7FFC00000000, 0x7FFC00021000)],
        )

    def test_spreadOverAllRanges(self) -> None:
        ranges = [(0, 64 * BLOCK), (1 << 40, (1 << 40) + 64 * BLOCK)]
        points = samplePoints(ranges, 8 * BLOCK)
        self.assertEqual(len(points), 8)
        self.assertEqual([p for p, _ in points[:4]], [0, 16 * BLOCK, 32 * BLOCK, 48 * BLOCK])
        self.assertEqual([p for p, _ in points[4:]], [(1 << 40) + k * 16 * BLOCK for k in range(4)])
        self.assertTrue(all(length == BLOCK for _, length in points))

    def test_smallMemoryWhole(self) -> None:
        """Less memory than the limit: every block once, the last one short."""
        points = samplePoints([(0, 2 * BLOCK + 4096)], 64 * BLOCK)
        self.assertEqual(points, [(0, BLOCK), (BLOCK, BLOCK), (2 * BLOCK, 4096)])


class ReportTests(SynchronousTestCase):
    @staticmethod
    def result(downtime: float, **cpu: float) -> dict[str, object]:
        return {"downtime_s": downtime, "wire_bytes": 10**6, "cpu_s": cpu}

    def runs(self, auto: float) -> report.Runs:
        return [
            {"baseline": self.result(6.0, sender=1), "none": self.result(6.0, proxy=1), "auto": self.result(auto, proxy=2)},
            {"baseline": self.result(4.0, sender=1), "none": self.result(5.0, proxy=1), "auto": self.result(auto, proxy=2)},
        ]

    def test_ratiosAreRunByRun(self) -> None:
        self.assertEqual(report.ratios(self.runs(2.0), "auto", "baseline"), [2.0 / 6.0, 2.0 / 4.0])
        self.assertEqual(report.ratios([{"none": self.result(1)}], "auto", "baseline"), [])

    def test_summary(self) -> None:
        summary = report.summary(self.runs(2.0), ["baseline", "none", "auto"])
        self.assertEqual(summary["baseline"]["median_downtime_s"], 5.0)
        self.assertEqual(summary["none"]["downtimes_s"], [6.0, 5.0])
        self.assertEqual(summary["none"]["x_baseline"], (1.0 + 1.25) / 2)
        self.assertEqual(summary["auto"]["median_cpu_s"], {"proxy": 2})

    def test_targets(self) -> None:
        self.assertEqual(
            report.targetLine("1gbit", self.runs(2.0)),
            "target (1gbit): auto <= 0.5 x baseline: 0.42 x, met",
        )
        self.assertEqual(
            report.targetLine("10gbit", self.runs(5.0)),
            "target (10gbit): auto <= 0.8 x baseline: 1.04 x, NOT met",
        )
        self.assertEqual(
            report.targetLine("none", self.runs(5.0)),
            "target (none): auto within 10 % of none: 0.92 x, met",
        )
        self.assertIsNone(report.targetLine("300mbit", self.runs(5.0)))
        self.assertIn("not measured", report.targetLine("1gbit", [{"none": self.result(1)}]) or "")

    def test_localDumpAndRestore(self) -> None:
        """The baseline less its transfer is a local dump and restore; the unshaped link judges against it."""
        runs = self.runs(3.0)
        for run, (dump, transfer, answered) in zip(runs, ((0.5, 1.5, 2.5), (0.5, 2.0, 3.5))):
            run["baseline"]["phases_s"] = {"dump": dump, "transfer": transfer, "restore": answered, "answered": answered}
        self.assertEqual(report.localDowntime(runs[0]["baseline"]), 1.5)
        self.assertIsNone(report.localDowntime(self.result(1.0)))
        # none: 6/1.5 and 5/2.0 -> median 3.25; auto: 3/1.5 and 3/2.0 -> 1.75.
        self.assertEqual(
            report.localLine("none", runs, ["baseline", "none", "auto"]),
            "target (none): a migration <= 1.5 x a local dump + restore (the baseline without its transfer,"
            " median 1.75 s): none 3.25 x (NOT met), auto 1.75 x (NOT met)",
        )
        for run in runs:
            run["auto"]["downtime_s"] = 2.0
        self.assertIn("auto 1.17 x (met)", report.localLine("none", runs, ["none", "auto"]) or "")
        self.assertIsNone(report.localLine("1gbit", runs, ["none", "auto"]))
        self.assertIsNone(report.localLine("none", self.runs(3.0), ["none", "auto"]))
        lines = list(report.table("none", runs, ["baseline", "none", "auto"]))
        self.assertTrue(lines[-2].startswith("target (none): auto within 10 %"))
        self.assertTrue(lines[-1].startswith("target (none): a migration <= 1.5 x a local dump"))

    def test_table(self) -> None:
        lines = list(report.table("1gbit", self.runs(2.0), ["baseline", "none", "auto"]))
        self.assertEqual(len(lines), 5)
        self.assertTrue(lines[3].startswith("auto"))
        self.assertIn("2.00 2.00", lines[3])
        self.assertTrue(lines[3].rstrip().endswith("0.42"))
        self.assertTrue(lines[4].startswith("target (1gbit)"))

    def test_perGigabyteAndPeakMemory(self) -> None:
        """The daemons' CPU per GB of the process and their median peak memory, under the table."""
        runs = self.runs(2.0)
        for run, peak in zip(runs, (600, 800)):
            run["auto"]["peak_memory_bytes"] = {"proxy": peak << 20, "cache": 100 << 20}
        lines = list(report.table("1gbit", runs, ["baseline", "none", "auto"], processBytes=500 * 10**6))
        self.assertEqual(len(lines), 6)
        self.assertEqual(
            lines[4], "auto      cpu s per GB of the process: proxy 4.00;  peak MiB (resident + memfds + pipes): proxy 700  cache 100"
        )
        self.assertTrue(lines[5].startswith("target (1gbit)"))


class PeakMemoryTests(SynchronousTestCase):
    def test_residentExceptShared(self) -> None:
        status = "VmRSS:\t  900 kB\nRssAnon:\t  500 kB\nRssFile:\t  100 kB\nRssShmem:\t  300 kB\n"
        self.assertEqual(memory.residentExceptShared(status), 600 << 10)

    def test_countsMemfdsHeld(self) -> None:
        """A memfd this process fills counts (it is not resident memory); its peak stays after it is closed."""
        before = memory.memoryOf(os.getpid())
        peak = memory.PeakMemory({"me": os.getpid()}, interval=0.01)
        fd = os.memfd_create("test-peak")
        try:
            os.write(fd, b"x" * (64 << 20))
            time.sleep(0.1)
        finally:
            os.close(fd)
        peaks = peak.stop()
        self.assertGreater(peaks["me"], before + (60 << 20))
        self.assertLess(memory.memoryOf(os.getpid()), before + (32 << 20))

    def test_memfdCountedOnce(self) -> None:
        """A memfd open twice (a reader dups the writer's descriptor) is counted once."""
        fd = os.memfd_create("test-once")
        self.addCleanup(os.close, fd)
        os.write(fd, b"x" * (8 << 20))
        once = memory.heldBytes(os.getpid())
        other = os.dup(fd)
        self.addCleanup(os.close, other)
        self.assertEqual(memory.heldBytes(os.getpid()), once)
        self.assertGreaterEqual(once, 8 << 20)

    def test_pipesCounted(self) -> None:
        """
        Bytes held in a pipe count (once for both its ends), in a child
        that holds nothing else (the test process's other pipes change
        while it runs).
        """
        readyRead, readyWrite = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.closerange(0, readyWrite)
                os.closerange(readyWrite + 1, 1 << 16)
                r, w = os.pipe()
                os.write(w, b"x" * 50_000)
                os.write(readyWrite, b"!")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(readyWrite)
        self.addCleanup(os.close, readyRead)

        def reap() -> None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

        self.addCleanup(reap)
        self.assertEqual(os.read(readyRead, 1), b"!")
        self.assertEqual(memory.heldBytes(pid), 50_000)

    def test_goneProcess(self) -> None:
        self.assertEqual(memory.memoryOf(2**22 + 12345), 0)


class InterruptTests(SynchronousTestCase):
    def test_laterSignalsIgnored(self) -> None:
        """
        The first signal stops the benchmark; one sent again while it
        cleans up (timeout passes its SIGTERM on to the child) must not
        cut the clean-up short (it left a redis running).
        """
        from bench.downtime.command import interrupt

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
            signal.signal(signum, interrupt)
        with self.assertRaises(KeyboardInterrupt):
            interrupt(signal.SIGTERM, None)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.assertIs(signal.getsignal(signum), signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test goes on


class CommandLineTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        args = parser().parse_args([])
        self.assertEqual((args.runs, args.size), (3, 512 << 20))
        self.assertEqual(args.rates, ["1gbit", "10gbit", "none"])
        self.assertEqual(args.modes, ["baseline", "none", "auto"])

    def test_lists(self) -> None:
        args = parser().parse_args(["--rates", "500mbit, NONE", "--modes", "baseline,none", "--size", "16M"])
        self.assertEqual(args.rates, ["500mbit", "none"])
        self.assertEqual(args.modes, ["baseline", "none"])
        self.assertEqual(args.size, 16 << 20)

    def test_badLists(self) -> None:
        args = parser().parse_args(["--modes", "zstd,auto"])
        self.assertEqual(args.modes, ["zstd", "auto"])
        for argv in (["--rates", "fast"], ["--modes", "baseline,zstd9"], ["--rates", ","]):
            self.assertRaises(SystemExit, parser().parse_args, argv)

    def test_phases(self) -> None:
        """Each step's end, in the order the migration reached them."""
        self.assertEqual(
            phases({"dump": 0.871, "transfer": 5.4, "restore": 6.299, "answered": 6.3}),
            "dump 0.87 transfer 5.40 restore 6.30 answered 6.30",
        )

    def test_compressOption(self) -> None:
        self.assertFalse(hasCompress("Options:\n  --cache-port=  port\n  --checksum  ...\n"))
        self.assertTrue(hasCompress("Options:\n      --compress=  auto|none|zstd|lz4 [default: auto]\n"))
        self.assertTrue(hasCompress("  -z, --compress   compress the link\n"))
        self.assertFalse(hasCompress("      --compress-level=  3\n      --no-compress  raw\n"))

    def test_missingPackages(self) -> None:
        present = {"tar", "socat"}
        self.assertEqual(
            missingPackages(lambda name: f"/usr/bin/{name}" if name in present else None),
            ["redis-server", "zstd", "iproute2"],
        )
        self.assertEqual(missingPackages(lambda name: "/bin/" + name), [])
