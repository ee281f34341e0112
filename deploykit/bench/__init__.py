"""Latency measurement: timing protocol, statistics, sweeps and their result rows.

- ``spec``: what a sweep measures (YAML or flags), expanded into configurations;
- ``sweep``: runs them, rounds interleaved within groups, and appends result rows;
- ``prepare``: builds (once, cached) and loads the artifact of each configuration;
- ``timing`` and ``stats``: warm-up, timed rounds, medians, intervals, paired ratios;
- ``results``: the JSONL rows; ``fingerprint``: device and tool versions; ``memory``: peak RSS.

``stats``, ``timing`` and ``results`` need only numpy and the standard library; ``prepare``
reaches the runtimes through the backends, which import them on first use.
"""
from __future__ import annotations
