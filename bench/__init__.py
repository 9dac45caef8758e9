"""Benchmarks of sensor-predictor against what PostgreSQL allows and the old design.

Run: .venv/bin/python -m bench   (see bench/run.py; not part of the test suite)
"""
