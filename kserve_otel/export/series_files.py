"""Every process's series in a memory-mapped file that the other processes of the server read: counts that
survive a worker's death, and a scrape that never waits on a stalled one.

Why it exists: a KServe server with ``workers=N`` runs N worker processes plus the parent, each with its own
:class:`~kserve_otel.recording.series.SeriesRegistry`; a Prometheus scrape lands on one of them, which must
answer for all (kserve#2979) and must never go backwards. Asking the others over a socket (what this package
did first) loses a worker's counts when it is killed and waits when it is stopped or holds its GIL. Here each
process keeps the cells of its series (bucket counts, sums, counters) in its own file-backed shared mapping:
the C extension's ``bind`` points a series at its place in the mapping, so an observation costs what it did in
private memory, and nothing is ever sent. A scrape reads every file of the directory, live or dead, without a
message and without the owner's help: the counts of a worker killed with SIGKILL stay in its file, a stopped
worker's can be read while it is stopped. prometheus_client's multiprocess mode does the same with one file
per metric and a Python ``struct`` write per observation; here the write is the C extension's ordinary
increment.

Files: ``<pid>-<ns>.<k>.series`` (``k`` = 0, 1, ... as the process needs room), each a 64-byte header (magic,
version, owner pid, bytes used) and then records: a length, a JSON description of the series (family, kind,
labels, bounds, start time) and its cells (see :meth:`kserve_otel.recording.speedups.PyHistogram.bind`).
Records are appended and never change but for their cells; the header's "bytes used" is written after a
record, so a reader sees whole records only. The owner holds an exclusive ``flock`` on its file ``.0`` (the
kernel lets go of it when the process ends, however it ends): a reader that can take the lock knows the owner
is gone, and leaves out its requests in flight (a gauge), never its counts.
Dead processes' files are folded into ``retired.json`` (a sum) by whichever process scrapes, so a server whose
workers restart often keeps few files.

Trust: the directory is private state. It is created with mode 0700 by the parent, and every process opens it
once (no symbolic link followed), checks that it is a directory owned by its own user that no one else may
enter, and from then on works through that descriptor only: files are created exclusively, opened without
following links and read only if they are regular files of the same owner. A directory that fails the check
is refused with one line and the process keeps its series to itself (its own endpoint still serves them).
A parent killed with SIGKILL leaves its directory behind: the next server of the same user removes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
from typing import Any

from ..recording.series import REGISTRY, SeriesRegistry
from ..recording.speedups import EXEMPLAR_SLOT as _EXEMPLAR
from ..recording.speedups import NATIVE_HEADER, NATIVE_MAX_BUCKETS, NATIVE_ZERO_THRESHOLD, histogram_layout
from .snapshots import (
    Snapshot, exemplar_entries, family_entry, histogram_entry, merge_snapshots, native_entry, snapshot_registry,
    warn_now_and_then, without_gauges,
)

logger = logging.getLogger(__name__)

__all__ = ["DirectoryRefused", "SeriesFile", "SharedSeries", "create_directory", "open_private_directory"]

DIRECTORY_PREFIX = "kserve-otel-series-"
CHUNK_SIZE = 1 << 20  # bytes per file; sparse until used (a series with KServe's buckets takes about 250)
MAX_FILE_SIZE = 1 << 30  # a reader refuses a file claiming more
MAGIC = b"KOSERIES"
VERSION = 1
_HEADER = struct.Struct("=8sIIIIQQ")  # magic, version, header size, pid, reserved, bytes used, created ns
HEADER_SIZE = 64
_USED_OFFSET = 24  # of "bytes used" in the header: 8-byte aligned, written in one store
_RECORD = struct.Struct("=II")  # whole record's length (a multiple of 8), description's length
_SUFFIX = ".series"
_RETIRED = "retired.json"
_OWNER_LOCK = "owner.lock"
_COMPACT_LOCK = "compact.lock"
_COMPACT_INTERVAL = 5.0  # seconds between two attempts to fold dead processes' files


class DirectoryRefused(Exception):
    """The series directory is not private state of this user; nothing is read from it or written to it."""


def _align(n: int) -> int:
    return (n + 7) & ~7


def open_private_directory(path: str) -> int:
    """A descriptor of the directory ``path``, if it is one (not a link) owned by this process's user, with no
    access for anyone else; else :class:`DirectoryRefused`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise DirectoryRefused(f"series directory {path!r} cannot be opened as a directory (links are not "
                               f"followed): {error.strerror}") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise DirectoryRefused(
            f"series directory {path!r} is not private: owner uid {info.st_uid} (this process runs as "
            f"{os.geteuid()}), mode {stat.S_IMODE(info.st_mode):04o} (0700 expected)")
    return fd


_owner_locks: list[int] = []  # descriptors of the owner locks of directories this process created


def create_directory(parent: str | None = None) -> str:
    """A fresh private (0700) series directory for the processes of one server, owned by this process while it
    lives; directories that earlier servers of this user left behind (their parent killed) are removed first."""
    parent = parent or tempfile.gettempdir()
    remove_stale_directories(parent)
    path = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=parent)
    fd = open_private_directory(path)
    try:
        lock = os.open(_OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=fd)
    finally:
        os.close(fd)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _owner_locks.append(lock)
    return path


def remove_stale_directories(parent: str) -> list[str]:
    """Remove the series directories in ``parent`` that belong to this user and whose creator is gone."""
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(DIRECTORY_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = open_private_directory(path)
        except (DirectoryRefused, OSError):
            continue  # not ours to judge
        try:
            lock = os.open(_OWNER_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            os.close(fd)
            continue  # being created, or not one of ours
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its creator lives
        finally:
            os.close(lock)  # releases the lock we may have taken
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)  # rmtree does not follow links out of the tree
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------- writing


def _description(family: Any, series: Any) -> bytes:
    entry = family_entry(family)
    del entry["series"]
    entry.update(attributes=dict(series.attributes), start=series.start_time_ns)
    return json.dumps(entry, separators=(",", ":")).encode()


class SeriesFile:
    """This process's series file(s) in the directory ``dir_fd``: :meth:`place` moves a series' cells into it."""

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self._open()

    def _open(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:  # a forked child's copy of its parent's lock: let go of it
            os.close(self._lock_fd)  # (the parent's own descriptor keeps the lock)
        self.pid = os.getpid()
        self.prefix = f"{self.pid}-{time.time_ns()}"
        self._lock = threading.Lock()
        self._maps: list[mmap.mmap] = []
        self._used = 0
        self._lock_fd = self._new_chunk(CHUNK_SIZE)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this process lives

    def _new_chunk(self, size: int) -> int:
        name = f"{self.prefix}.{len(self._maps)}{_SUFFIX}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        os.ftruncate(fd, size)
        chunk = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _HEADER.pack_into(chunk, 0, MAGIC, VERSION, HEADER_SIZE, self.pid, 0, HEADER_SIZE, time.time_ns())
        self._maps.append(chunk)
        self._used = HEADER_SIZE
        if self._maps[1:]:
            os.close(fd)
        return fd  # the first chunk's stays open: it carries the lock

    @property
    def names(self) -> list[str]:
        """The files this process writes."""
        return [f"{self.prefix}.{k}{_SUFFIX}" for k in range(len(self._maps))]

    def place(self, family: Any, series: Any) -> None:
        """Append ``series``' record and bind its cells there, with what it counted so far."""
        self._append(family, series, carry=True)

    def _append(self, family: Any, series: Any, carry: bool) -> None:
        description = _description(family, series)
        cells_at = _RECORD.size + _align(len(description))
        length = cells_at + _align(series.cells_size)
        with self._lock:
            if self._used + length > len(self._maps[-1]):
                self._new_chunk(max(CHUNK_SIZE, HEADER_SIZE + length))
            chunk, at = self._maps[-1], self._used
            _RECORD.pack_into(chunk, at, length, len(description))
            chunk[at + _RECORD.size: at + _RECORD.size + len(description)] = description
            series.bind(chunk, at + cells_at, carry=carry)
            self._used = at + length
            struct.pack_into("=Q", chunk, _USED_OFFSET, self._used)  # publish: readers now see the record

    def after_fork(self, registry: SeriesRegistry) -> None:
        """In a forked child, whose series still point into the parent's file: a file of the child's own, where
        every series counts from zero (the parent keeps counting what the child inherited)."""
        self._open()
        for family in registry.families():
            for series in family.all_series():
                self._append(family, series, carry=False)


# ------------------------------------------------------------------------------------------------- reading


class _NotReady(Exception):
    """A file whose owner is still creating it (nothing is counted in it yet): read it at the next scrape."""


class _Record:
    __slots__ = ("kind", "family", "attributes", "start", "at", "buckets", "exemplars", "native", "exemplars_at",
                 "native_at", "size")

    def __init__(self, description: dict[str, Any], at: int) -> None:
        self.kind = description["kind"]
        self.family = {k: description[k] for k in ("name", "kind", "description", "unit", "label_names")}
        if "bounds" in description:
            self.family["bounds"] = [float(b) for b in description["bounds"]]
        self.exemplars = description.get("exemplars") is True
        if self.exemplars:
            self.family["exemplars"] = True
        self.native = description.get("native") is True
        if self.native:
            self.family["native"] = True
        self.attributes = description["attributes"]
        self.start = int(description["start"])
        self.at = at
        self.buckets = len(self.family.get("bounds", ())) + 1
        #: Where its exemplar slots and native block start, and the bytes its cells take (a counter's: 8).
        self.exemplars_at, self.native_at, self.size = histogram_layout(self.buckets, self.exemplars, self.native) \
            if self.kind == "histogram" else (8, 8, 8)
        if self.kind not in ("histogram", "counter", "updowncounter") or not isinstance(self.attributes, dict):
            raise ValueError(f"bad record of kind {self.kind!r}")


class _Chunk:
    """One file of another process, mapped read-only, with the records parsed so far."""

    def __init__(self, dir_fd: int, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError("not a regular file of this user")
            if info.st_size < HEADER_SIZE:
                raise _NotReady  # being created: nothing is counted in it yet
            if info.st_size > MAX_FILE_SIZE:
                raise ValueError(f"size {info.st_size} out of range")
            self.map = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, version, header_size, self.pid, _, _, _ = _HEADER.unpack_from(self.map, 0)
        if magic == bytes(len(MAGIC)):
            raise _NotReady
        if magic != MAGIC or version != VERSION or header_size != HEADER_SIZE:
            raise ValueError("not a series file of this version")
        self.records: list[_Record] = []
        self.parsed = HEADER_SIZE

    def refresh(self) -> None:
        """Parse the records published since the last call."""
        (used,) = struct.unpack_from("=Q", self.map, _USED_OFFSET)
        if not HEADER_SIZE <= used <= len(self.map):
            raise ValueError(f"bytes used {used} out of range")
        at = self.parsed
        while at < used:
            length, described = _RECORD.unpack_from(self.map, at)
            cells_at = at + _RECORD.size + _align(described)
            if length % 8 or length < _RECORD.size or at + length > used or cells_at > at + length:
                raise ValueError(f"bad record at {at}")
            description = json.loads(self.map[at + _RECORD.size: at + _RECORD.size + described])
            record = _Record(description, cells_at)
            if cells_at + record.size > at + length:
                raise ValueError(f"record at {at} too short for its cells")
            self.records.append(record)
            at += length
        self.parsed = at

    def snapshot(self) -> Snapshot:
        """The current values of every record, as snapshot families."""
        families: dict[str, dict[str, Any]] = {}
        for record in self.records:
            family = families.get(record.family["name"])
            if family is None:
                family = families[record.family["name"]] = {**record.family, "series": []}
            if record.kind == "histogram":
                values = struct.unpack_from(f"={record.buckets}Q3d", self.map, record.at)
                counts = values[: record.buckets]
                if sum(counts):
                    item = histogram_entry(dict(record.attributes), record.start, counts, *values[record.buckets:])
                    if record.exemplars:
                        exemplars = exemplar_entries(self._exemplars(record))
                        if exemplars is not None:
                            item["exemplars"] = exemplars
                    native = native_entry(self._native(record)) if record.native else None
                    if native is not None:
                        item["native"] = native
                    family["series"].append(item)
            else:
                (value,) = struct.unpack_from("=q", self.map, record.at)
                family["series"].append({"attributes": dict(record.attributes), "start": record.start,
                                         "value": value})
        return [family for family in families.values() if family["series"]]


    def _native(self, record: _Record) -> tuple[int, float, int, int, tuple[int, ...]] | None:
        """The record's native histogram, read whole (its sequence number even and unchanged around the read;
        read again while it is being written, and left out after a hundred tries)."""
        at = record.at + record.native_at
        for _ in range(100):
            seq, schema, zero, offset, used = NATIVE_HEADER.unpack_from(self.map, at)
            if seq & 1 or used > NATIVE_MAX_BUCKETS:
                continue
            counts = struct.unpack_from(f"={used}Q", self.map, at + NATIVE_HEADER.size)
            if struct.unpack_from("=Q", self.map, at)[0] == seq:
                return schema, NATIVE_ZERO_THRESHOLD, zero, offset, counts
        return None

    def _exemplars(self, record: _Record) -> list[tuple[float, float, int, int] | None]:
        """The record's exemplar slots, each read whole (its sequence number even and unchanged around the
        read; a slot being written is read again, and left out after three tries)."""
        found: list[tuple[float, float, int, int] | None] = []
        at = record.at + record.exemplars_at
        for index in range(record.buckets):
            slot = at + _EXEMPLAR.size * index
            exemplar = None
            for _ in range(3):
                seq, value, when, hi, lo, span = _EXEMPLAR.unpack_from(self.map, slot)
                if seq == 0 or seq & 1 or struct.unpack_from("=Q", self.map, slot)[0] != seq:
                    if seq == 0:
                        break
                    continue
                exemplar = (value, when, (hi << 64) | lo, span)
                break
            found.append(exemplar)
        return found


class _Process:
    """The files of one other process."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.chunks: dict[str, _Chunk] = {}
        self.dead = False
        self.failed = False

    def snapshot(self, dir_fd: int, names: list[str]) -> Snapshot:
        for name in names:
            if name not in self.chunks:
                try:
                    self.chunks[name] = _Chunk(dir_fd, name)
                except _NotReady:
                    continue
        self.chunks = dict(sorted(self.chunks.items(), key=lambda item: _chunk_number(item[0])))
        if not self.dead:
            self.dead = self._owner_gone(dir_fd)
        parts = []
        for chunk in self.chunks.values():
            chunk.refresh()
            parts.append(chunk.snapshot())
        merged = merge_snapshots(parts)
        return without_gauges(merged) if self.dead else merged

    def _owner_gone(self, dir_fd: int) -> bool:
        try:
            fd = os.open(f"{self.prefix}.0{_SUFFIX}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # the owner holds it
            raise
        finally:
            os.close(fd)  # and with it our lock, if we took it; never the owner's
        return True


def _chunk_number(name: str) -> int:
    return int(name[: -len(_SUFFIX)].rsplit(".", 1)[1])


def _split(name: str) -> tuple[str, int] | None:
    """(process prefix, chunk number) of a series file name, else None."""
    if not name.endswith(_SUFFIX) or name.startswith("."):
        return None
    prefix, _, number = name[: -len(_SUFFIX)].rpartition(".")
    if not prefix or not number.isdigit():
        return None
    return prefix, int(number)


class _Restart(Exception):
    """A file vanished while reading: it was folded into the retired sum meanwhile; read again."""


class SharedSeries:
    """The processes of one server, which share the series directory ``directory``: :meth:`start` puts this
    process's series there, :meth:`merged_snapshot` reads everyone's. The interface the Prometheus endpoint
    uses (``Telemetry.merge_peers``)."""

    def __init__(self, directory: str, registry: SeriesRegistry = REGISTRY) -> None:
        self.directory = os.path.abspath(directory)
        self.registry = registry
        self._lock = threading.Lock()
        self._dir_fd: int | None = None
        self._file: SeriesFile | None = None
        self._others: dict[str, _Process] = {}
        self._last_compaction = 0.0
        self._fork_hook = False

    create_directory = staticmethod(create_directory)

    def start(self) -> None:
        """Open the directory (refusing one that is not private, with :class:`DirectoryRefused`) and move this
        process's series into a file there. Idempotent."""
        with self._lock:
            if self._file is not None and self._file.pid == os.getpid():
                return
            fd = open_private_directory(self.directory)
            self._dir_fd = fd
            self._file = SeriesFile(fd)
            self.registry.place_series(self._file.place)
            if not self._fork_hook:
                os.register_at_fork(after_in_child=self._after_fork)
                self._fork_hook = True

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._others = {}
        if self._file is None:
            return
        try:
            self._file.after_fork(self.registry)
        except Exception:  # noqa: BLE001 - a forked child must run on
            logger.exception("kserve-otel: a forked process could not create its series file")

    def stop(self) -> None:
        """Nothing to do: the file stays for the others to read (the counts outlive the process)."""

    @property
    def started(self) -> bool:
        return self._file is not None

    def merged_snapshot(self) -> Snapshot:
        """This process's series plus every other process's, live or dead: what a scrape of any one process
        reports. Reads files only; never waits for another process."""
        own = snapshot_registry(self.registry)
        with self._lock:
            if self._dir_fd is None or self._file is None:
                return own
            for _ in range(5):
                try:
                    return merge_snapshots([own, *self._read_others()])
                except _Restart:
                    continue
                except (OSError, ValueError, KeyError, TypeError) as error:
                    warn_now_and_then(f"read {self.directory}", "kserve-otel cannot read the series files in %s; "
                                      "serving this process's series only: %r", self.directory, error)
                    return own
            warn_now_and_then(f"restart {self.directory}", "kserve-otel: the series files in %s kept changing "
                              "during a scrape; serving this process's series only", self.directory)
            return own

    def _read_others(self) -> list[Snapshot]:
        assert self._dir_fd is not None and self._file is not None
        names = os.listdir(self._dir_fd)
        retired_groups, retired = self._read_retired()
        by_process: dict[str, list[str]] = {}
        for name in names:
            split = _split(name)
            if split is not None and split[0] != self._file.prefix and split[0] not in retired_groups:
                by_process.setdefault(split[0], []).append(name)
        snapshots = [retired]
        for prefix, chunk_names in by_process.items():
            process = self._others.get(prefix)
            if process is None:
                process = self._others[prefix] = _Process(prefix)
            if process.failed:
                continue
            try:
                snapshots.append(process.snapshot(self._dir_fd, chunk_names))
            except FileNotFoundError:
                raise _Restart from None
            except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
                process.failed = True
                warn_now_and_then(f"file {prefix}", "kserve-otel skips the series file %s/%s: %r",
                                  self.directory, prefix, error)
        for prefix in list(self._others):
            if prefix not in by_process:
                del self._others[prefix]  # folded into the retired sum
        dead = [p for p in self._others.values() if p.dead and not p.failed]
        if dead and time.monotonic() - self._last_compaction > _COMPACT_INTERVAL:
            self._last_compaction = time.monotonic()
            self._compact(dead)
        return snapshots

    def _read_retired(self) -> tuple[set[str], Snapshot]:
        assert self._dir_fd is not None
        try:
            fd = os.open(_RETIRED, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return set(), []
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > MAX_FILE_SIZE:
                raise ValueError(f"{_RETIRED} is not a regular file of this user")
            retired = json.load(file)
        return set(retired["processes"]), retired["snapshot"]

    def _compact(self, dead: list[_Process]) -> None:
        """Fold dead processes' files into ``retired.json``, then remove them. One process at a time."""
        assert self._dir_fd is not None
        try:
            lock = os.open(_COMPACT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=self._dir_fd)
        except OSError:
            return
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another process is at it
            groups, retired = self._read_retired()
            folding = [p for p in dead if p.prefix not in groups]
            if not folding:
                return
            names = os.listdir(self._dir_fd)
            parts = [retired]
            for process in folding:
                chunk_names = [n for n in names if (_split(n) or ("",))[0] == process.prefix]
                parts.append(process.snapshot(self._dir_fd, chunk_names))
            document = {"processes": sorted(groups | {p.prefix for p in folding}),
                        "snapshot": without_gauges(merge_snapshots(parts))}
            temporary = f".{_RETIRED}.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._dir_fd)
            with os.fdopen(fd, "w") as file:
                json.dump(document, file)
            os.replace(temporary, _RETIRED, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            for process in folding:  # only now: a reader that missed the new sum still finds the files
                for name in process.chunks:
                    try:
                        os.unlink(name, dir_fd=self._dir_fd)
                    except FileNotFoundError:
                        pass
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            warn_now_and_then(f"compact {self.directory}", "kserve-otel could not fold ended processes' series "
                              "files in %s: %r", self.directory, error)
        finally:
            os.close(lock)
