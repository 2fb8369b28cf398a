"""Harnesses for the tests and benchmarks (fixtures, a fake cluster); production code never imports them."""
