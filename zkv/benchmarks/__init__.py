"""Benchmarks that print figures beside baselines measured in the same run.

Not tests: nothing here asserts a speed. Run one as ``python -m zkv.benchmarks.node``.
"""
