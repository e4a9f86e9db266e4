# -*- test-case-name: tests.test_downtime -*-
"""
Typical cache data for the workload, built once per benchmark from a seed
and replayed into every fresh redis, so every run migrates the same data set.

A mix, by key count: user profiles (hashes with repeated field names, words,
names, cities, plans, dates, a small hex token), sessions (JSON strings:
user, address, user agent, cart, a base64 CSRF token), and opaque blobs
(random bytes, as cached compressed or encrypted payloads are).  The blobs'
share (L{BLOB_SHARE}) sets how well the process memory compresses; it is
chosen so that zstd level 1 packs it about 2.5x (the benchmark measures and
prints the ratio of a sample).
"""

from __future__ import annotations

import base64
import json
import random
from typing import Callable, Iterator

from bench.downtime.redis import command

#: Commands per pipelined batch.
BATCH = 2000
#: Of every 20 keys, how many are opaque random blobs (the rest: 11 users, the others sessions).
BLOB_SHARE = 3
#: Blob sizes, bytes.
BLOB_SIZES = (256, 512, 1024, 2048)

_FIRST = ["ada", "alan", "grace", "linus", "margaret", "ken", "dennis", "barbara", "edsger", "donald",
          "frances", "john", "radia", "tim", "vint", "whitfield", "leslie", "niklaus", "sophie", "guido"]
_LAST = ["lovelace", "turing", "hopper", "torvalds", "hamilton", "thompson", "ritchie", "liskov", "dijkstra",
         "knuth", "allen", "backus", "perlman", "berners-lee", "cerf", "diffie", "lamport", "wirth", "wilson"]
_CITIES = ["paris", "berlin", "lisbon", "oslo", "madrid", "rome", "vienna", "prague", "dublin", "warsaw",
           "amsterdam", "brussels", "zurich", "helsinki", "athens", "budapest", "copenhagen", "tallinn"]
_PLANS = ["free", "basic", "pro", "team", "enterprise"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "corp.example"]
_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15",
    "okhttp/4.12.0",
]
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "sor", "vel", "an", "ti", "que", "bar", "zo", "nu", "fel", "ix", "dra"]


def words(rng: random.Random, count: int) -> list[str]:
    """A vocabulary of C{count} made-up words."""
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(count)]


class Records:
    """The key/value commands of one data set, from C{seed}."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocabulary = words(self.rng, 3000)
        self.n = 0

    def user(self) -> bytes:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        return command(
            "HSET", f"user:{self.n}",
            "name", f"{first.title()} {last.title()}",
            "email", f"{first}.{last}{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}",
            "city", rng.choice(_CITIES),
            "plan", rng.choice(_PLANS),
            "created", f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
            "logins", rng.randint(0, 5000),
            "bio", " ".join(rng.choices(self.vocabulary, k=rng.randint(6, 30))),
            "token", rng.randbytes(8).hex(),
        )

    def session(self) -> bytes:
        rng = self.rng
        value = {
            "user": rng.randint(0, 10**7),
            "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "agent": rng.choice(_AGENTS),
            "cart": [{"sku": f"sku-{rng.randint(1, 50000)}", "qty": rng.randint(1, 4)} for _ in range(rng.randint(0, 5))],
            "csrf": base64.b64encode(rng.randbytes(24)).decode(),
            "locale": rng.choice(["en-GB", "fr-FR", "de-DE", "es-ES", "it-IT"]),
        }
        return command("SET", f"session:{rng.randbytes(12).hex()}", json.dumps(value))

    def blob(self) -> bytes:
        return command("SET", f"blob:{self.n}", self.rng.randbytes(self.rng.choice(BLOB_SIZES)))

    def next(self) -> bytes:
        """The next key's command: users, sessions and blobs interleaved by L{BLOB_SHARE}."""
        slot = self.n % 20
        self.n += 1
        if slot < BLOB_SHARE:
            return self.blob()
        if slot < BLOB_SHARE + 11:
            return self.user()
        return self.session()

    def batches(self) -> Iterator[tuple[bytes, int]]:
        """Endless batches of L{BATCH} commands: (payload, count)."""
        while True:
            yield b"".join(self.next() for _ in range(BATCH)), BATCH


def build(seed: int, target: int, send: Callable[[bytes, int], None], used: Callable[[], int]) -> list[tuple[bytes, int]]:
    """
    Batches from C{seed}, each C{send}ed as it is made, until C{used()} (the
    server's allocated bytes) reaches C{target}; the batches, for replaying.
    """
    kept: list[tuple[bytes, int]] = []
    for payload, count in Records(seed).batches():
        send(payload, count)
        kept.append((payload, count))
        if used() >= target:
            return kept
    raise AssertionError("unreachable")  # pragma: no cover
