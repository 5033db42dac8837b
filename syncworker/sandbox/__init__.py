"""Real servers for tests and for trying the product locally (see docs/testing.md)."""
