"""Helpers shared by the tests, the compliance harness and the demo."""
