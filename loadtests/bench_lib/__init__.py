"""Helpers of ``loadtests/bench.py``.

The modules run in two places: imported by the benchmark driver (process
management, targets, reporting), and as their own processes through
``python -m bench_lib.NAME`` (the load generators and the canned upstream), so
each of those imports nothing but the standard library and, optionally, uvloop.
"""
