"""Benchmarks report; they never assert timings. Run with:

    .venv/bin/python -m pytest bench --benchmark-only
"""
