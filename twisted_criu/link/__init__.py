"""
The remote leg: proxy -> cache over one stream connection (TCP, TLS, ...).

For every image, a C{remote_image_entry} frame then exactly C{size} raw
bytes; a clean close where a header would start ends the session.  That is
all CRIU's C daemons know, and nothing flows from the cache to the proxy.

twisted-criu's daemons add an extension that the C peers never notice: a
twisted-criu proxy sets field 6 (C{link_version}) on every header, which a
C cache skips; a twisted-criu cache that sees it answers with a
C{link_status_entry} HELLO (it never writes to a proxy that did not set it:
a C proxy does not read its socket, and closing it with unread bytes would
reset the connection and lose the stream's tail).  A proxy that was
greeted ends each dump with an end-of-dump marker instead of closing the
link; the cache confirms it with DUMP_RECEIVED (so the proxy knows every
byte was stored, not just sent), and once the restore has finished it
sends SESSION_DONE and closes the link, which tells the proxy that its
chain of dumps is over.  A proxy that is not greeted ends the session
with EOF, as the C proxy does.

Security: by default the link runs inside TLS 1.3 authenticated by the
link key both ends hold (L{key}); C{--tls} uses a PKI instead (L{tls});
C{--plain-link} is the bare stream the C daemons speak.  L{allow} and
L{localpeers} decide who may connect at all, under any of them.
"""
