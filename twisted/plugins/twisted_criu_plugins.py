"""twistd dropins: C{twistd criu-proxy} and C{twistd criu-cache}."""

from twisted.application.service import ServiceMaker

criuProxy = ServiceMaker(
    "CRIU image proxy",
    "twisted_criu.twistd.proxy_tap",
    "Receive images from criu dump --stream (or --remote) and forward them to a criu-cache",
    "criu-proxy",
)
criuCache = ServiceMaker(
    "CRIU image cache",
    "twisted_criu.twistd.cache_tap",
    "Receive images from a criu-proxy and serve them to criu restore --stream (or --remote)",
    "criu-cache",
)
