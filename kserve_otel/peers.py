"""Sums the step series of every process of one model server, at scrape time.

A KServe server with ``workers=N`` runs N worker processes plus the parent, each with its own
:class:`~kserve_otel.series.SeriesRegistry`; a Prometheus scrape of the shared port lands on one of
them, which must answer for all (kserve#2979). prometheus_client's multiprocess mode would put an mmap
write on the hot path (several µs per observation against ~0.75 µs here), so we pull instead: every
process serves a JSON snapshot of its registry on ``<directory>/<pid>.sock``, and the scraping process
asks all the others and adds them up (:meth:`PeerExchange.merged_snapshot`). Nothing is added to the
hot path, and the sum is exact at the moment of the scrape. A process that stops cleanly leaves its
last snapshot in ``<pid>.final.json``, so counters do not go backwards when a worker exits; one killed
with SIGKILL takes its observations with it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .series import REGISTRY, CounterFamily, HistogramFamily, SeriesRegistry

logger = logging.getLogger(__name__)

Snapshot = list[dict[str, Any]]
_COUNTER_KINDS = ("counter", "updowncounter")

#: Longest Unix socket path the kernel accepts (``sun_path`` less its NUL byte).
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
_WIDEST_PID = "4194304"  # Linux's highest pid_max: the path check holds for every process of the server
_FINAL = ".final.json"
_WARN_INTERVAL = 300.0  # seconds between two warnings about the same peer or family
_last_warned: dict[str, float] = {}


def _warn(key: str, message: str, *args: object) -> None:
    """Log a warning, or a debug line if the same ``key`` warned less than ``_WARN_INTERVAL`` ago."""
    now = time.monotonic()
    repeated = now - _last_warned.get(key, -math.inf) < _WARN_INTERVAL
    if not repeated:
        _last_warned[key] = now
    logger.log(logging.DEBUG if repeated else logging.WARNING, message, *args)


def snapshot_registry(registry: SeriesRegistry) -> Snapshot:
    """The cumulative state of ``registry`` as JSON-able dicts: one per family that has series."""
    snapshot = []
    for family in registry.families():
        entry: dict[str, Any] = {
            "name": family.name, "kind": family.kind, "description": family.description,
            "unit": family.unit, "label_names": list(family.label_names), "series": [],
        }
        if isinstance(family, HistogramFamily):
            entry["bounds"] = list(family.bounds)
            for series in family.all_series():
                counts, total, low, high, _, _ = series.snapshot()  # never resets: delta readers own that
                if sum(counts):
                    entry["series"].append({
                        "attributes": dict(series.attributes), "start": series.start_time_ns,
                        "counts": list(counts), "sum": total, "min": low if math.isfinite(low) else None,
                        "max": high if math.isfinite(high) else None,
                    })
        elif isinstance(family, CounterFamily):
            entry["series"] = [
                {"attributes": dict(s.attributes), "start": s.start_time_ns, "value": s.value}
                for s in family.all_series()
            ]
        if entry["series"]:
            snapshot.append(entry)
    return snapshot


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Add snapshots up: families by name, series by attributes, both in the order first seen."""
    families: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            if family["name"] not in families:
                families[family["name"]] = ({**family, "series": []}, {})
            merged, by_attributes = families[family["name"]]
            if family["kind"] != merged["kind"] or family.get("bounds") != merged.get("bounds"):
                _warn(f"merge {family['name']}", "cannot merge metric %s: its kind or bounds differ between "
                      "processes; skipping one process's series", family["name"])
                continue
            for series in family["series"]:
                key = json.dumps(series["attributes"], sort_keys=True)
                into = by_attributes.get(key)
                if into is None:
                    by_attributes[key] = into = {**series, "attributes": dict(series["attributes"])}
                    if "counts" in series:
                        into["counts"] = list(series["counts"])
                    merged["series"].append(into)
                    continue
                into["start"] = min(into["start"], series["start"])
                if "value" in series:
                    into["value"] += series["value"]
                    continue
                into["counts"] = [a + b for a, b in zip(into["counts"], series["counts"], strict=True)]
                into["sum"] += series["sum"]
                into["min"] = min((v for v in (into["min"], series["min"]) if v is not None), default=None)
                into["max"] = max((v for v in (into["max"], series["max"]) if v is not None), default=None)
    return [merged for merged, _ in families.values()]


def _checked(snapshot: Any) -> Snapshot:
    """``snapshot`` if shaped like :func:`snapshot_registry`'s; else ValueError, KeyError or TypeError."""
    if not isinstance(snapshot, list):
        raise ValueError("a snapshot is a list of families")
    for family in snapshot:
        histogram = family["kind"] == "histogram"
        if not (histogram or family["kind"] in _COUNTER_KINDS) or not isinstance(family["name"], str):
            raise ValueError(f"bad family {family.get('name')!r}")
        for series in family["series"]:
            extremes = [] if not histogram else [v for v in (series["min"], series["max"]) if v is not None]
            numbers = [*series["counts"], series["sum"], *extremes] if histogram else [series["value"]]
            if (not isinstance(series["attributes"], dict) or not isinstance(series["start"], int)
                    or (histogram and len(series["counts"]) != len(family["bounds"]) + 1)
                    or not all(isinstance(n, (int, float)) for n in numbers)):
                raise ValueError(f"bad series in family {family['name']!r}")
    return snapshot


class PeerExchange:
    """Lets the processes of one server, which share ``directory``, read each other's registry snapshots."""

    def __init__(self, directory: str, registry: SeriesRegistry = REGISTRY) -> None:
        self.directory = os.path.abspath(directory)
        self.registry = registry
        longest = os.path.join(self.directory, f"{_WIDEST_PID}.sock")
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"peer directory {self.directory!r} is too long: {longest!r} exceeds the"
                f" {MAX_SOCKET_PATH}-byte Unix socket path limit; use a shorter one"
                " (PeerExchange.create_directory())"
            )
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process serving, while started
        self._final_written = False
        self._serving: tuple[threading.Thread, socket.socket] | None = None  # the thread, and what wakes it

    @staticmethod
    def create_directory() -> str:
        """A fresh private (0o700) directory for the peers of one server."""
        return tempfile.mkdtemp(prefix="kserve-otel-peers-")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def start(self) -> None:
        """Serve this process's snapshot on ``<directory>/<pid>.sock`` from a daemon thread. Idempotent."""
        with self._lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            final = self._path(f"{pid}{_FINAL}")
            if os.path.exists(final):  # ours from an earlier start (the registry still holds it): drop it;
                if self._final_written:  # else a dead process had our pid: keep its counts under another name
                    os.unlink(final)
                else:
                    os.replace(final, self._path(f"{pid}.{time.time_ns()}{_FINAL}"))
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:  # bind aside, then rename: a scraper must never find the socket before it listens
                temporary = self._path(f"{pid}.bind")
                _unlink(temporary)
                listener.bind(temporary)
                listener.listen(64)
                os.replace(temporary, self._path(f"{pid}.sock"))
            except BaseException:
                listener.close()
                raise
            waker, wake = socket.socketpair()
            thread = threading.Thread(target=self._serve, args=(listener, wake), name="kserve-otel-peers",
                                      daemon=True)
            thread.start()
            self._serving = (thread, waker)
            self._pid, self._final_written = pid, False
            atexit.register(self.stop)

    def _serve(self, listener: socket.socket, wake: socket.socket) -> None:
        with listener, wake, selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not any(key.fileobj is wake for key, _ in selector.select()):
                try:
                    connection, _ = listener.accept()
                    with connection:
                        connection.settimeout(5.0)
                        connection.sendall(json.dumps(snapshot_registry(self.registry)).encode())
                except Exception as error:  # a client that went away must not end the service
                    _warn(f"serve {self.directory}", "kserve-otel peer snapshot not sent: %r", error)
                    time.sleep(0.01)  # no busy loop if accept keeps failing (EMFILE)

    def stop(self) -> None:
        """Leave ``<pid>.final.json`` behind, stop serving, remove the socket. Idempotent; never raises."""
        with self._lock:
            pid = self._pid
            if pid != os.getpid():
                return
            self._pid = None
            atexit.unregister(self.stop)
            try:  # written while still serving, so a scraper always sees one or the other (it prefers this)
                temporary = self._path(f".{pid}{_FINAL}.tmp")
                with open(temporary, "w") as file:
                    json.dump(snapshot_registry(self.registry), file)
                os.replace(temporary, self._path(f"{pid}{_FINAL}"))
                self._final_written = True
            except Exception as error:
                logger.warning("kserve-otel left no final snapshot in %s: %r", self.directory, error)
            thread, waker = self._serving or (None, None)
            try:
                if thread is not None and waker is not None:
                    with waker:
                        waker.send(b"\0")
                    thread.join(timeout=10)
                _unlink(self._path(f"{pid}.sock"))
            except Exception as error:
                logger.warning("kserve-otel peer socket in %s not stopped cleanly: %r", self.directory, error)

    def peer_snapshots(self, timeout: float = 2.0) -> list[Snapshot]:
        """Snapshots of every other process, live or exited cleanly; within ``timeout``, never raising."""
        deadline = time.monotonic() + timeout
        me = str(os.getpid())
        try:
            names = os.listdir(self.directory)
        except OSError as error:
            _warn(f"list {self.directory}", "kserve-otel cannot list peers in %s: %r", self.directory, error)
            return []
        own_final = me + _FINAL if self._final_written else None  # its counts are in our registry again
        finals = sorted(n for n in names if n.endswith(_FINAL) and n != own_final)
        # A peer that left its final snapshot is stopping: the file is its last word, not the socket.
        sockets = [n[: -len(".sock")] for n in names if n.endswith(".sock")]
        pids = [pid for pid in sockets if pid != me and pid + _FINAL not in finals]
        snapshots: list[Snapshot | None] = []
        if pids:
            with ThreadPoolExecutor(max_workers=min(len(pids), 16)) as pool:
                snapshots.extend(pool.map(lambda pid: self._ask(pid, deadline), pids))
        snapshots.extend(self._read_final(name) for name in finals)
        return [snapshot for snapshot in snapshots if snapshot is not None]

    def _ask(self, pid: str, deadline: float) -> Snapshot | None:
        path = self._path(f"{pid}.sock")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(_remaining(deadline))
                sock.connect(path)
                chunks: list[bytes] = []
                while True:
                    sock.settimeout(_remaining(deadline))
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        return _checked(json.loads(b"".join(chunks)))
                    chunks.append(chunk)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            if isinstance(error, ConnectionRefusedError):  # nobody listens: the process died
                _unlink(path)
            return self._read_final(pid + _FINAL)  # it may have just stopped cleanly
        except (OSError, ValueError, KeyError, TypeError) as error:
            _warn(f"peer {path}", "kserve-otel skips peer %s: %r", path, error)
            return None

    def _read_final(self, name: str) -> Snapshot | None:
        try:
            with open(self._path(name), "rb") as file:
                return _checked(json.load(file))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            _warn(f"final {name}", "kserve-otel skips the final snapshot %s: %r", self._path(name), error)
            return None

    def merged_snapshot(self) -> Snapshot:
        """This process's snapshot plus every peer's: what a scrape of any one process should report."""
        return merge_snapshots([snapshot_registry(self.registry), *self.peer_snapshots()])


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no complete answer in time")
    return remaining


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
