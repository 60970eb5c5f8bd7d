"""Tests that attack the gateway: bad input, abuse, storms (see adversary.py)."""
