"""twisted-criu: CRIU remote images (image-proxy / image-cache) on Twisted."""

__version__ = "0.1.0"
