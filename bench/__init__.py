"""Benchmark harness: datasets, peer adapters, recall/latency/memory runs and plots.

Nothing here runs as part of the project's test suite except bench/tests, which only
checks that the harness itself measures correctly.
"""
