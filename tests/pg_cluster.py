"""A private PostgreSQL cluster that a test may stop, crash and restart at will.

The shared server at 127.0.0.1:5432 belongs to every test and every engineer on the machine: an
outage test must never touch it. This starts Debian's server binaries
(``/usr/lib/postgresql/<version>/bin``) on their own data directory, port and socket directory
under a temporary folder. initdb refuses to run as root, so as root the server runs as the
``postgres`` user (``runuser``); as anyone else, as that user.

    with PgCluster(tmp_path) as pg:
        url = pg.create_database("t1")
        pg.crash()      # SIGQUIT to the postmaster: every connection dies mid-statement
        pg.start()      # crash recovery, same port
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType


class PgUnavailable(RuntimeError):
    """Debian's PostgreSQL server binaries are not installed, or the cluster did not start."""


def server_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has ``initdb`` and ``pg_ctl``."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if os.access(Path(p) / "pg_ctl", os.X_OK)),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """``host``/``netns``: listen on ``host`` inside the network namespace ``netns`` (whose
    link a test can cut, see ``outage_helpers.Partition``) instead of on 127.0.0.1."""

    def __init__(
        self,
        parent: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
        standby_of: PgCluster | None = None,
    ):
        bindir = server_bin()
        if bindir is None:
            raise PgUnavailable("Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
        self.bin = bindir
        # A folder of our own that the server's user can enter: under the system's temporary
        # directory by default (pytest's tmp_path sits in a 0700 directory of root's).
        self.root = Path(tempfile.mkdtemp(prefix="pgc-", dir=parent))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = port if port is not None else free_port()
        self.host = host
        self.netns = netns
        self._as_root = os.geteuid() == 0
        self.sockets.mkdir()
        self.log.touch()
        os.chmod(self.root, 0o755)
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
            shutil.chown(self.log, "postgres", "postgres")
        if standby_of is not None:
            self._clone(standby_of)
            return
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            # Throwaway data: no fsync (a crash here is the server process's, never the machine's,
            # so the OS still has every write). synchronous_commit stays on: a commit the client
            # saw must survive the crash, as in production, or exactly-once could not be checked.
            fh.write(
                f"\nport = {self.port}\nlisten_addresses = '{host}'\nunix_socket_directories = '{self.sockets}'\n"
                "fsync = off\nfull_page_writes = off\nmax_connections = 50\n"
            )
        if host != "127.0.0.1":  # initdb trusts the loopback only; this cluster's namespace is private
            with open(self.data / "pg_hba.conf", "a", encoding="utf-8") as fh:
                fh.write("\nhost all all 0.0.0.0/0 trust\n")

    def _clone(self, primary: PgCluster) -> None:
        """A streaming-replication standby of ``primary`` (running): its base backup with the
        standby's settings (``-R``: ``standby.signal`` and the primary's address), on this port."""
        self._run(
            [
                str(self.bin / "pg_basebackup"),
                "-D",
                str(self.data),
                "-h",
                primary.host,
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "--checkpoint=fast",  # not a spread checkpoint: minutes on an idle server
            ]
        )
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:  # later lines win
            fh.write(f"\nport = {self.port}\nunix_socket_directories = '{self.sockets}'\nhot_standby = on\n")

    # -- process control -------------------------------------------------------------------------
    def _run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        name = Path(argv[0]).name
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        if self.netns is not None:  # the server listens there, and pg_ctl waits for it there
            argv = ["ip", "netns", "exec", self.netns, *argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise PgUnavailable(f"{name} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-500:]}")
        return res

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), *args], check=check)

    @property
    def running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def start(self, timeout_s: float = 30) -> None:
        """Start (after a crash: crash recovery) and wait until it accepts connections."""
        self._ctl("-l", str(self.log), "-w", "-t", str(int(timeout_s)), "start")

    def stop(self) -> None:
        """A clean shutdown: clients are disconnected, then the server stops."""
        if self.running:
            self._ctl("-m", "fast", "-w", "stop")

    def crash(self) -> None:
        """An immediate shutdown (the postmaster quits every backend at once, no checkpoint):
        what a crash or an OOM kill of the server looks like to its clients."""
        if self.running:
            self._ctl("-m", "immediate", "-w", "stop")

    def _processes(self) -> list[int]:
        """The postmaster (first) and its children: the server's processes."""
        postmaster = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The field after the command (which may hold spaces, in parentheses) is the state, then the ppid.
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP): the kernel still accepts and acknowledges the
        clients' bytes, nothing answers, no timeout of the connection fires. What a server whose
        storage or VM stalled looks like to its clients."""
        for pid in self._processes():  # the postmaster first: it would notice its children stop
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in reversed(self._processes()):
            os.kill(pid, signal.SIGCONT)

    def promote(self) -> None:
        """End a standby's recovery: it becomes a primary that accepts writes (a failover)."""
        self._ctl("-w", "promote")

    def detach(self) -> None:
        """A standby stops receiving its primary's WAL (the link between them lost): what the
        primary commits from now on, this standby never has. Returns once its receiver is gone."""
        self.sql("ALTER SYSTEM SET primary_conninfo = ''", "SELECT pg_reload_conf()")
        wait_until(lambda: self.scalar("SELECT count(*) FROM pg_stat_wal_receiver") == 0, 10)

    def scalar(self, query: str, database: str = "postgres") -> object:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(database))
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(query)).scalar()
        finally:
            engine.dispose()

    def replicate_synchronously(self) -> None:
        """A primary's commits wait until a standby has the WAL on disk, so a commit a client saw
        survives a failover to that standby (``synchronous_standby_names``)."""
        self.sql("ALTER SYSTEM SET synchronous_standby_names = '*'", "SELECT pg_reload_conf()")

    def set_read_only(self, read_only: bool) -> None:
        """Every transaction, in open sessions too, becomes read-only (or writable again): what
        clients of a primary that was demoted, or of a database in maintenance, see."""
        value = "on" if read_only else "off"
        self.sql(f"ALTER SYSTEM SET default_transaction_read_only = {value}", "SELECT pg_reload_conf()")

    # -- databases ---------------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def sql(self, *statements: str, database: str = "postgres") -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for st in statements:
                    conn.execute(sa.text(st))
        finally:
            engine.dispose()

    def create_database(self, name: str | None = None) -> str:
        """A fresh database; returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:10]}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # -- lifecycle ---------------------------------------------------------------------------------
    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.crash()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self.destroy()


@contextlib.contextmanager
def pg_cluster(parent: str | os.PathLike[str] | None = None) -> Iterator[PgCluster]:
    with PgCluster(parent) as pg:
        yield pg


def wait_until(predicate: object, timeout_s: float, interval_s: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError after ``timeout_s``."""
    assert callable(predicate)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")
