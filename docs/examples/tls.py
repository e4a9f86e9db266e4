"""
Mutual TLS with your own PKI, run for the security page:

    python docs/examples/tls.py OUTPUT_DIR

Runs the page's C{openssl} recipe (C{recipe.sh}, written to OUTPUT_DIR as
it ran: the cache's certificate names C{localhost} and C{127.0.0.1}, the
names the proxy dials here), starts C{twistd criu-cache} and C{twistd
criu-proxy} with C{--tls} and those files on 127.0.0.1, sends one image
through them as C{criu dump --stream} does, and writes what each daemon
logged about TLS (C{cache-log.txt}, C{proxy-log.txt}) and their command
lines (C{daemons.txt}).  Needs C{openssl}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from _transcript import logLines, writeLines

from twisted_criu.testing.criu import StreamClient
from twisted_criu.testing.processes import Daemon, freePort, waitForSockets

RECIPE = """\
# the CA
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=criu migration CA" \\
    -keyout ca-key.pem -out ca.pem
# the cache (restore host): every name the proxy may dial goes in subjectAltName
openssl req -newkey rsa:3072 -nodes -subj "/CN=cache" -keyout cache-key.pem -out cache.csr
openssl x509 -req -in cache.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \\
    -out cache.pem -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth")
# the proxy (dump host)
openssl req -newkey rsa:3072 -nodes -subj "/CN=proxy" -keyout proxy-key.pem -out proxy.csr
openssl x509 -req -in proxy.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \\
    -out proxy.pem -extfile <(printf "extendedKeyUsage=clientAuth,serverAuth")
chmod 600 *-key.pem
"""


def main(output: str) -> None:
    work = tempfile.mkdtemp(prefix="twisted-criu-docs-tls-")
    with open(os.path.join(output, "recipe.sh"), "w") as f:
        f.write(RECIPE)
    done = subprocess.run(["bash", "-e", "-c", RECIPE], cwd=work, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the openssl recipe failed:\n{done.stderr}")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    port = str(freePort())
    cacheArgs = ["--address", "127.0.0.1", "--port", port, "-D", "dst", "--tls",
                 "--tls-cacert", "ca.pem", "--tls-cert", "cache.pem", "--tls-key", "cache-key.pem"]
    proxyArgs = ["--address", "localhost", "--port", port, "-D", "src", "--tls",
                 "--tls-cacert", "ca.pem", "--tls-cert", "proxy.pem", "--tls-key", "proxy-key.pem"]
    cache = Daemon("criu-cache", work, dst, "streamer-serve.sock")
    proxy = Daemon("criu-proxy", work, src, "streamer-capture.sock")
    try:
        cache.start(cacheArgs, cwd=work)
        waitForSockets([cache], timeout=30)
        proxy.start(proxyArgs, cwd=work)
        waitForSockets([proxy], timeout=30)
        dump = StreamClient(proxy.socketPath, timeout=60)
        dump.write("inventory.img", os.urandom(44))
        dump.close()
        restore = StreamClient(cache.socketPath, timeout=60)
        if restore.read("inventory.img") is None:
            sys.exit("the image did not reach the cache")
        restore.close()
    finally:
        proxy.stop()
        cache.stop()
    writeLines(os.path.join(output, "daemons.txt"), [
        "dst$ twistd -n criu-cache " + " ".join(cacheArgs),
        "src$ twistd -n criu-proxy " + " ".join(proxyArgs),
    ])
    for daemon, name in ((cache, "cache-log.txt"), (proxy, "proxy-log.txt")):
        lines = logLines(daemon.logPath, ["TLS"])
        if not lines:
            sys.exit(f"{daemon.tapname} logged nothing about TLS")
        writeLines(os.path.join(output, name), lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/tls.py OUTPUT_DIR")
    main(os.path.abspath(sys.argv[1]))
