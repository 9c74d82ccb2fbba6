"""Benchmarks: Sluice over HTTP side by side with a raw-SQL baseline and pgmq.

Run `python -m bench.run --help`; results and how to read them are in bench/RESULTS.md.
"""
