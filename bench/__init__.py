"""Benchmarks, run by hand: python bench/NAME.py --help (tests/test_accelerator_bench.py runs accelerator.py on a tiny shape)."""
