"""Benchmarks for Eureka-Audio Studio: ``python -m bench`` (see docs/performance.md)."""
