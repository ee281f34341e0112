"""Reports: result rows rendered into tables (Markdown, CSV, HTML) and plots (PNG).

A report measures nothing. It reads rows written by ``deploykit bench`` on any number of
devices, keeps the latest row per device and configuration, and derives comparisons (ratios
with intervals over the rows' stored round medians) and verdicts from them.
"""
from __future__ import annotations
