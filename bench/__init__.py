"""Benchmarks: each module measures one thing, writes bench/results/<name>.json and prints a table."""
