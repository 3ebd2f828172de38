"""Build the tests' bundled data from the shared data set (run by hand; the output is committed).

    python tests/data/build.py [../shared/data]

Deterministic: the AlpacaEval files are copied byte for byte, the HH-RLHF subset is written with
a fixed gzip header, so a rebuild from the same source gives the same bytes. It also checks that
the three models the tests rebuild from the demo traffic (``tests/realdata.py``) come back equal,
row for row, to the shared files.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HH_ROWS = 500  # the first rows of the file: ~100 on the test side of the prompt split


def main(argv: list[str]) -> int:
    sys.path[:0] = [str(REPO), str(HERE.parent)]
    import realdata

    src = Path(argv[0]) if argv else REPO.parent / "shared" / "data"
    if not (src / "alpaca_eval").is_dir() or not (src / "hh_rlhf").is_dir():
        print(f"build.py: no shared data set at {src} (alpaca_eval/ and hh_rlhf/)", file=sys.stderr)
        return 2
    (HERE / "alpaca_eval").mkdir(exist_ok=True)
    for model in realdata.STORED_MODELS:
        shutil.copyfile(src / "alpaca_eval" / f"{model}.jsonl.gz", HERE / "alpaca_eval" / f"{model}.jsonl.gz")
    (HERE / "hh_rlhf").mkdir(exist_ok=True)
    with gzip.open(src / "hh_rlhf" / "harmless-base-test.jsonl.gz", "rb") as fh:
        head = [line for _, line in zip(range(HH_ROWS), fh, strict=False)]
    with gzip.GzipFile(HERE / "hh_rlhf" / "harmless-base-test.jsonl.gz", "wb", compresslevel=9, mtime=0) as out:
        out.write(b"".join(head))
    for model in realdata.DEMO_MODELS:
        with gzip.open(src / "alpaca_eval" / f"{model}.jsonl.gz", "rt", encoding="utf-8") as fh:
            shared = [json.loads(line) for line in fh]
        if realdata.alpaca_rows(model) != shared:
            print(f"build.py: the demo traffic's {model} rows differ from {src}", file=sys.stderr)
            return 1
    for f in sorted(HERE.rglob("*.jsonl.gz")):
        print(f"{f.relative_to(HERE)}  {f.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
