"""
Public test tooling, for our tests and for code that embeds twisted-criu.

  - L{twisted_criu.testing.fakes}: in-memory fakes, no sockets or reactor
    needed: L{FakeLocalService<twisted_criu.testing.fakes.FakeLocalService>}
    (an C{ILocalImageService}), L{FakeSink<twisted_criu.testing.fakes.FakeSink>}
    (an C{IRemoteImageSink}), C{storedImage} (an C{IStoredImage} of given
    bytes), C{pump} (runs a C{MemoryReactor}'s descriptors) and
    C{driveProducer} (runs a pull producer on a C{StringTransport}).
  - L{twisted_criu.testing.criu}: blocking clients that behave as criu does:
    C{LocalImageClient} (C{criu --remote}, pipe and seed variants) and
    C{StreamClient} (C{criu --stream}).
  - L{twisted_criu.testing.traces}: recorded criu traffic
    (C{tests/criu-traces}) loaded into a C{Trace}; and
    L{twisted_criu.testing.replay}: C{TraceReplay} plays one against
    running daemons, as criu did.
  - L{twisted_criu.testing.processes}: real C{twistd criu-proxy|criu-cache}
    child processes (C{Daemon}), free loopback ports, waiting for sockets.
  - L{twisted_criu.testing.workload}: C{Workload}, a process to migrate
    that checks its own memory; L{twisted_criu.testing.realcriu}: a real
    C{criu dump|restore --stream} as child processes (C{Criu}), with the
    hook as its action script.
  - L{twisted_criu.testing.demo}: the migration demo (C{./admin/demo},
    C{twisted-criu-demo}, C{python -m twisted_criu.testing.demo}): a real
    process moved by the real criu, or criu played by the demo with the
    synthetic images of L{twisted_criu.testing.imageset}.
"""
