"""The twistd plugins' command lines: usage.Options and makeService for criu-proxy and criu-cache."""
