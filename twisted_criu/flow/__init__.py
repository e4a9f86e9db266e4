"""
Flow control: moving image bytes between pipes, sockets and stores at the
pace of the slowest.

L{pipes} (criu's pipes), L{pacing} (pause a feeder while its disk is
behind), L{send} (a stored image into any consumer), L{chunks} (an image
criu still writes, as chunks), L{sockets} (the one C{sendfile} producer
for plain sockets), L{_fastpath} (every step outside Twisted's public API).
What a source or sink can do is asked with the interfaces of
L{twisted_criu.interfaces} (C{IKernelSource}, C{IKernelSink},
C{ISpliceSink}, C{IPacedWriter}).
"""
