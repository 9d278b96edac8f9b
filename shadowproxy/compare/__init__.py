"""Comparison of primary and shadow responses: configuration, statistics, the report.

Submodules import numpy/scipy lazily so that the proxy's start-up never pays for them.
"""
