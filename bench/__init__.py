"""Benchmarks (bench/README.md); bench.downtime is the real-workload downtime benchmark."""
