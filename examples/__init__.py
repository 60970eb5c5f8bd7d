"""Example applications; a package so the tests can import their helpers."""
