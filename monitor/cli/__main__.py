"""``python -m monitor.cli``: the same as the ``oversight`` script."""

import sys

from monitor.cli import entry

sys.exit(entry())
