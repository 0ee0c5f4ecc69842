"""A throwaway PostgreSQL 15 server for tests: initdb + pg_ctl in a temp dir, TCP on a free loopback port
(password auth, scram-sha-256) and a Unix socket in the data dir (trust, for setup). Stopped and
deleted in teardown.

As root, initdb refuses to run, so the server runs as the `postgres` user (or NORMBENCH_PG_USER) via
runuser, in a dir that user owns. `scripts/install.sh --dev` installs postgresql-15 when missing; tests
using the `postgres` fixture skip when the binaries are not there.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("NORMBENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER, PASSWORD, DATABASE = "bench", "pw-Secr3t-9f2b", "normbench"


def pg_available() -> bool:
    return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    root: Path
    port: int
    run_as: str | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def _cmd(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else args

    def _run(self, args: list[str], timeout: int = 120) -> None:
        proc = subprocess.run(self._cmd(args), check=False, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                   "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync"])
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                   "-o", options, "-w", "-t", "60", "start"])
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def psql(self, sql: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return str(cur.fetchall()) if cur.description else ""
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._cmd([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                      "-t", "60", "stop"]), check=False, capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    run_as = None
    root = Path(tempfile.mkdtemp(prefix="normbench-pg-"))
    if os.geteuid() == 0:
        run_as = os.environ.get("NORMBENCH_PG_USER", "postgres")
        try:
            entry = pwd.getpwnam(run_as)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"running as root and there is no user {run_as!r} to run PostgreSQL as")
        os.chmod(root, 0o755)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(root=root, port=free_port(), run_as=run_as)
    (server.socket_dir).mkdir()
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(server.socket_dir, entry.pw_uid, entry.pw_gid)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL 15 server for the whole test session (skips when it is not installed)."""
    if not pg_available():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN}); scripts/install.sh --dev installs it")
    started = time.perf_counter()
    server = start_server()
    print(f"PostgreSQL on 127.0.0.1:{server.port} in {time.perf_counter() - started:.1f}s")
    try:
        yield server
    finally:
        server.stop()
