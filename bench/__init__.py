"""Benchmarks, run by hand (never by the tests): python bench/NAME.py --help."""
