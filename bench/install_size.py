"""The default install's size and time: a fresh virtualenv, ``pip install .`` of this tree (no extras).

    python bench/install_size.py [--extras alibi,k8s] [--no-cache] [--keep DIR]

Copies the working tree (without virtualenvs, git and caches) to a temporary folder, so the build
leaves nothing in the repository, makes a virtualenv with this interpreter, and times
``pip install <copy>[extras]`` with the machine's pip configuration (the local torch CPU wheel
and indexes; pip's cache, if warm, makes the time mostly unpacking). Prints the environment's
size (MB = 10^6 bytes, file sizes summed), the largest distributions, and any installed
distribution whose licence metadata names the Business Source License (alibi-detect's, from 0.12
on): a default install must list none. Ends with a JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "node_modules", ".oversight-demo"}
BSL_MARKERS = ("business source license", "bsl 1.1", "bsl-1.1", "busl-1.1")


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in SKIP or n.startswith(".venv") or n.endswith(".egg-info") or n == "__pycache__"}


def tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links not followed, each file once)."""
    total, seen = 0, set()
    for p in root.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def distributions(venv: Path) -> list[dict[str, Any]]:
    """Installed distributions with their size on disk (the files their RECORD lists) and licence text."""
    out = []
    site = site_packages(venv)
    for dist in metadata.distributions(path=[str(site)]):
        size = 0
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f)))
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
        meta = dist.metadata
        fields = [*(meta.get_all("License") or []), *(meta.get_all("License-Expression") or [])]
        licence = " ".join(str(v) for v in [*fields, *(meta.get_all("Classifier") or [])] if v)
        out.append({"name": meta["Name"], "version": dist.version, "bytes": size, "licence": licence})
    return sorted(out, key=lambda d: -int(d["bytes"]))


def install(venv: Path, src: Path, extras: str, no_cache: bool) -> float:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    target = f"{src}[{extras}]" if extras else str(src)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", target]
    if no_cache:
        cmd.insert(4, "--no-cache-dir")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def report(venv: Path, extras: str, seconds: float) -> dict[str, Any]:
    dists = distributions(venv)
    size = tree_size(venv)
    bsl = [f"{d['name']} {d['version']}" for d in dists if any(m in d["licence"].lower() for m in BSL_MARKERS)]
    print(f"install: pip install .{f'[{extras}]' if extras else ''} into a fresh virtualenv")
    print(f"  time            {seconds:8.1f} s")
    print(f"  size            {size / 1e6:8.0f} MB ({len(dists)} distributions)")
    print("  largest:")
    for d in dists[:12]:
        print(f"    {d['name']:<28}{d['version']:<16}{int(d['bytes']) / 1e6:8.0f} MB")
    print(f"  BSL-licensed    {', '.join(bsl) if bsl else 'none'}")
    names = {str(d["name"]).lower() for d in dists}
    return {
        "bench": "install_size",
        "extras": extras,
        "seconds": round(seconds, 1),
        "megabytes": round(size / 1e6),
        "distributions": len(dists),
        "bsl": bsl,
        "alibi_detect": "alibi-detect" in names or "alibi_detect" in names,
        "kubernetes": "kubernetes" in names,
        "versions": {
            str(d["name"]).lower(): d["version"]
            for d in dists
            if str(d["name"]).lower() in ("numpy", "torch", "transformers", "river", "sqlalchemy", "scipy")
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extras", default="", help="comma-separated extras (default: none, the plain install)")
    ap.add_argument("--no-cache", action="store_true", help="pip --no-cache-dir (a cold install; downloads again)")
    ap.add_argument("--keep", help="make the virtualenv here and keep it (default: a temporary one)")
    ap.add_argument("--src", default=str(REPO), help="the project tree to install (default: this repository)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="oversight-install-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(args.src, src, ignore=_ignore, symlinks=True)
        venv = Path(args.keep) if args.keep else Path(tmp) / "venv"
        if venv.exists():
            print(f"{venv} exists: give a new folder", file=sys.stderr)
            return 2
        try:
            seconds = install(venv, src, args.extras, args.no_cache)
        except subprocess.CalledProcessError as e:
            print(f"pip install failed (exit {e.returncode})", file=sys.stderr)
            return 1
        print(json.dumps(report(venv, args.extras, seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
