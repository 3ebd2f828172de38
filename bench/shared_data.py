"""The shared real data set that some benchmarks read: ``../shared/data`` beside the repository,
or the folder ``$REWARD_DATA_DIR`` names (``alpaca_eval/``, ``hh_rlhf/``; see
``../shared/data/README.md``).

The tests carry small subsets of it (``tests/data/``) and need nothing beside the repository; the
benchmarks below need the whole set. Without it they say so and exit with status 2, not a
traceback: ``drift.py`` (and ``cusum_allowance.py``, which uses its scenarios), ``closed_loop.py``,
``rm_score.py`` and ``rm_train.py``. ``kafka_ingest.py`` uses it when present and synthetic text
otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shared_data(*parts: str) -> Path:
    """``parts`` inside the shared data set; exits with a message when it is not there."""
    from monitor.reward.data import DATA_DIR_ENV, default_data_dir

    try:
        path = default_data_dir().joinpath(*parts)
    except FileNotFoundError:
        path = REPO.parent / "shared" / "data" / Path(*parts)
    if not path.exists():
        print(
            f"{Path(sys.argv[0]).name}: this benchmark needs the shared data set, and {path} is missing: put the data"
            f" set at {REPO.parent / 'shared' / 'data'} or set {DATA_DIR_ENV} to the folder holding alpaca_eval/"
            " and hh_rlhf/ (the tests do not need it: they carry their own data, tests/data/)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return path
