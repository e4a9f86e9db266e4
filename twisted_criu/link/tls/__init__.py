# -*- test-case-name: tests.test_tls -*-
"""
Mutual TLS on the proxy -> cache link, with the flags of CRIU's page server
(C{--tls}, C{--tls-cacert}, C{--tls-cert}, C{--tls-key},
C{--tls-no-cn-verify}).

Both ends present a certificate and check the other's against a CA.  The
proxy also checks that the cache's certificate names the host it dialled
(unless told not to).  The wrapping is Twisted's own
(L{TLSMemoryBIOFactory<twisted.protocols.tls.TLSMemoryBIOFactory>} around
whatever stream endpoint the user gave), with one addition: the link
protocol is told about a connection only once the TLS handshake has
succeeded (L{twisted_criu.link.tls.gate}).  Until then a peer has not proven
who it is, so the cache must not let it touch a session (even a connect that
goes nowhere would otherwise reopen a finished one), and the proxy must not
count it as a link.

The modules: L{errors} (CRIU's defaults, the exceptions), L{credentials}
(files and connection creators), L{diagnostics} (one-line explanations),
L{gate}, L{endpoints}.
"""

from twisted_criu.link.tls.credentials import (
    TLSCredentials,
    clientConnectionCreator,
    loadCredentials,
    serverConnectionCreator,
)
from twisted_criu.link.tls.diagnostics import describeFailure
from twisted_criu.link.tls.endpoints import TLSClientEndpoint, TLSServerEndpoint
from twisted_criu.link.tls.errors import (
    DEFAULT_CACERT,
    DEFAULT_CERT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KEY,
    TLSHandshakeFailed,
    TLSSetupError,
)

__all__ = [
    "DEFAULT_CACERT",
    "DEFAULT_CERT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_KEY",
    "TLSClientEndpoint",
    "TLSCredentials",
    "TLSHandshakeFailed",
    "TLSServerEndpoint",
    "TLSSetupError",
    "clientConnectionCreator",
    "describeFailure",
    "loadCredentials",
    "serverConnectionCreator",
]
