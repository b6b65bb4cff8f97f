"""Benchmarks of eventlog beside raw psycopg baselines; run with ``python -m bench``."""
