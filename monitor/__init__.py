"""Oversight monitor service: ingest, sampling, review queue, metrics, CLI.

Kept import-light on purpose: ``oversight --help`` must answer fast, so
heavy libraries are imported where they are used.
"""

#: The version, in one place: pyproject.toml reads it (``dynamic = ["version"]``), ``oversight
#: --version`` prints it and the ``oversight_build_info`` metric carries it. Bump it with a
#: CHANGELOG.md section of the same number.
__version__ = "0.1.0"
