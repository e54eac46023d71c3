"""The embedded in-process simulator (the default host)."""
