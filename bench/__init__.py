"""Benchmarks that print tables; never imported by tests and never asserted on."""
