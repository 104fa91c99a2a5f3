"""Benchmarks for callosum_gevent: ``python -m benchmarks --help``."""
