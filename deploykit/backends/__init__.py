"""Backends: one module per runtime, found through ``base.BACKENDS``."""
