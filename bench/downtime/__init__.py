"""
The real-workload downtime benchmark (C{admin/bench-downtime}): a redis
holding typical cache data, migrated by a real criu over a shaped loopback
link, C{tar | socat} against twisted-criu.
"""
