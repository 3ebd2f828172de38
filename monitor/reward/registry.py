"""Reward-model versions: folders under ``reward.models_dir`` plus rows in the database.

A version is written once (its folder name is its content id) and registered as a
``candidate``; the gate makes it ``active`` (the previous one becomes ``retired``),
``rejected`` or ``undecided``. ``rm_active`` holds exactly one version per stream set; promotion swaps it
and bumps its generation in one transaction, so every reader sees either the old or the
new version, and scorers notice the new generation at their next batch boundary.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from monitor.config import Settings
from monitor.store import Store
from monitor.store import tables as t


class RegistryError(RuntimeError):
    pass


class ActiveChanged(RegistryError):
    """The active version moved since a gate compared a candidate with it."""

    def __init__(self, expected: int, now: int, active: str | None) -> None:
        super().__init__(
            f"the active version changed since the gate compared with it (generation {expected}, now {now}: "
            f"{active or 'none'}): the candidate is kept undecided, to be gated again"
        )
        self.active = active


class Registry:
    def __init__(self, store: Store, models_dir: str | Path, stream_set: str = "default"):
        self.store = store
        self.root = Path(models_dir)
        self.stream_set = stream_set

    @classmethod
    def for_settings(cls, store: Store, settings: Settings) -> Registry:
        """The registry the service uses: ``reward.models_dir`` and ``reward.stream_set``."""
        return cls(store, settings.reward.models_dir, settings.reward.stream_set)

    def path_of(self, version: str) -> Path:
        return self.root / version

    def register(
        self,
        model: Any,
        *,
        data_window: dict[str, Any],
        metrics: dict[str, Any],
        status: str = "candidate",
    ) -> str:
        """Save ``model`` (a RewardModel) under its content id and record it; idempotent."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{time.time_ns()}"
        model.save(tmp)
        version = str(model.version)
        dest = self.path_of(version)
        if dest.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)  # atomic on one filesystem: a folder is complete or absent
        row = {
            "version": version,
            "parent": model.parent,
            "path": str(dest),
            "status": status,
            "data_window": data_window,
            "metrics": metrics,
            "created_at": time.time(),
        }
        with self.store.engine.begin() as conn:
            if conn.execute(sa.select(t.rm_versions.c.version).where(t.rm_versions.c.version == version)).first():
                return version
            conn.execute(t.rm_versions.insert().values(**row))
        return version

    def active(self) -> tuple[str, Path, int] | None:
        a = t.rm_active
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(a.c.version, a.c.generation).where(a.c.stream_set == self.stream_set)).first()
        if row is None:
            return None
        return str(row.version), self.path_of(str(row.version)), int(row.generation)

    def generation(self) -> int:
        a = self.active()
        return -1 if a is None else a[2]

    def promote(self, version: str, gate: dict[str, Any] | None = None, *, expect_generation: int | None = None) -> int:
        """Make ``version`` the active one (atomically); returns the new generation.

        ``expect_generation``: the generation the gate compared against (-1: none was active). A
        promotion, rollback or other update since then refuses this one (:class:`ActiveChanged`):
        it was gated against a version no longer active, and promoting it would undo what happened
        meanwhile (an update training for minutes overwrote a rollback made during it)."""
        now = time.time()
        v, a = t.rm_versions, t.rm_active
        with self.store.engine.begin() as conn:
            if conn.execute(sa.select(v.c.version).where(v.c.version == version)).first() is None:
                raise RegistryError(f"unknown version {version}")
            cur = conn.execute(sa.select(a.c.version, a.c.generation).where(a.c.stream_set == self.stream_set)).first()
            now_gen = -1 if cur is None else int(cur.generation)
            if expect_generation is not None and now_gen != expect_generation:
                raise ActiveChanged(expect_generation, now_gen, None if cur is None else str(cur.version))
            if cur is not None and cur.version == version:
                return int(cur.generation)
            gen = 0 if cur is None else int(cur.generation) + 1
            if cur is None:
                conn.execute(
                    a.insert().values(stream_set=self.stream_set, version=version, generation=gen, updated_at=now)
                )
            else:
                # Compare-and-set on the generation: two concurrent promotions cannot both win.
                res = conn.execute(
                    a.update()
                    .where(a.c.stream_set == self.stream_set, a.c.generation == cur.generation)
                    .values(version=version, generation=gen, updated_at=now)
                )
                if res.rowcount != 1:
                    raise RegistryError("another promotion happened concurrently")
                conn.execute(v.update().where(v.c.version == cur.version).values(status="retired"))
            values: dict[str, Any] = {"status": "active", "promoted_at": now}
            if gate is not None:
                values["gate"] = gate
            conn.execute(v.update().where(v.c.version == version).values(**values))
        return gen

    def promote_by_hand(self, version: str, reason: str, by: str, now: float | None = None) -> dict[str, Any]:
        """A person makes ``version`` active over its gate's verdict (a rejected or undecided
        candidate, or a retired version: a rollback). The gate's record stays as it was, with an
        ``override`` beside it: who, when, why, and the status and verdict it overrode.

        The gate refuses a candidate that loses a protected sensitivity however much better it
        ranks the new traffic (README, "The gate"): after a policy swap the starting version may
        rank the new answers worse than chance while the update that would fix it lost, say,
        ``off_topic``. That trade is a person's decision, made here, on the record."""
        row = self.get(version)
        if row is None:
            raise RegistryError(f"unknown version {version} (oversight rm versions lists them)")
        if not reason.strip():
            raise RegistryError("a reason is required: it is recorded with the version")
        if not Path(str(row["path"])).exists():
            raise RegistryError(f"version {version} has no files at {row['path']}: it cannot be loaded")
        active = self.active()
        if active is not None and active[0] == version:
            return {"version": version, "active": True, "generation": active[2], "changed": False}
        gate = dict(row.get("gate") or {})
        gate["override"] = {
            "by": by,
            "reason": reason.strip(),
            "at": time.time() if now is None else now,
            "status_before": row["status"],
            "verdict_before": gate.get("verdict"),
        }
        generation = self.promote(version, gate)
        return {
            "version": version,
            "active": True,
            "generation": generation,
            "changed": True,
            "status_before": row["status"],
            "replaced": None if active is None else active[0],
        }

    def reject(self, version: str, gate: dict[str, Any]) -> None:
        v = t.rm_versions
        with self.store.engine.begin() as conn:
            conn.execute(v.update().where(v.c.version == version).values(status="rejected", gate=gate))

    def hold(self, version: str, gate: dict[str, Any]) -> None:
        """The gate could not decide: the version is kept as ``undecided`` with its record; the active
        one stays. Gating it again later (more labels) may still promote it."""
        v = t.rm_versions
        with self.store.engine.begin() as conn:
            conn.execute(v.update().where(v.c.version == version).values(status="undecided", gate=gate))

    def versions(self) -> list[dict[str, Any]]:
        v = t.rm_versions
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(v).order_by(v.c.created_at, v.c.version)).all()
        return [dict(r._mapping) for r in rows]

    def get(self, version: str) -> dict[str, Any] | None:
        v = t.rm_versions
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(v).where(v.c.version == version)).first()
        return None if row is None else dict(row._mapping)

    def load_active(self, device: str | None = None) -> tuple[Any, int] | None:
        """The active RewardModel and its generation, or None when no version is active."""
        from monitor.reward.model import RewardModel

        a = self.active()
        if a is None:
            return None
        version, path, gen = a
        if not path.exists():
            raise RegistryError(f"active version {version} has no folder at {path}")
        return RewardModel.load(path, device=device), gen


@dataclass(frozen=True)
class ActiveChange:
    """The active version (``None``: none is active) after its generation moved."""

    active: tuple[str, Path, int] | None

    @property
    def generation(self) -> int:
        return -1 if self.active is None else self.active[2]


class VersionWatch:
    """Whether the active version changed, read at most every ``poll_s``: what a scorer polls at
    its batch boundaries. A change is reported until the caller accepts it (:meth:`accept`), so a version
    that failed to load is tried again at the next poll.

    >>> class Fixed:
    ...     def active(self): return ("v1", Path("v1"), 0)
    >>> watch = VersionWatch(Fixed(), poll_s=60.0)
    >>> change = watch.changed()
    >>> change.active[0], watch.changed()  # the next read waits for poll_s
    ('v1', None)
    >>> watch.accept(change); watch.changed(force=True) is None
    True
    """

    def __init__(self, registry: Any, poll_s: float):
        self.registry = registry  # a Registry (anything with ``active()``)
        self.poll_s = poll_s
        self.generation = -2  # unknown: the first read is a change
        self._last_check = -1e18

    def changed(self, force: bool = False) -> ActiveChange | None:
        now = time.monotonic()
        if not force and now - self._last_check < self.poll_s:
            return None
        self._last_check = now
        change = ActiveChange(self.registry.active())
        return None if change.generation == self.generation else change

    def accept(self, change: ActiveChange) -> None:
        self.generation = change.generation
