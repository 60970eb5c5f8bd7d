"""The test suite; tests/support holds the helpers, imported as tests.support."""
