"""``oversight``: the command line, as a table of commands (one function each).

``app`` builds the parser from the tables of the command modules and runs the chosen command;
the command modules import what they need inside their functions, so ``--help`` stays fast.
Nothing else in the project imports this package: what the CLI shares with the demo and the
benchmarks lives below it (``monitor.errors``, ``monitor.fileio``, ``monitor.service.replay``).
"""

from monitor.cli.app import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
