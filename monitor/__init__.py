"""Oversight monitor service: ingest, sampling, review queue, metrics, CLI.

Kept import-light on purpose: ``oversight --help`` must answer fast, so
heavy libraries are imported where they are used.
"""

__version__ = "0.1.0"
