"""Shared series files: real worker processes count into memory-mapped files; the scraping one reads them all,
whatever happened to the workers (killed, stopped, exited, forked), and trusts only private state."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT

from kserve_otel.export import series_files, snapshots
from kserve_otel.recording.series import SeriesRegistry
from kserve_otel.export.series_files import (
    DirectoryRefused, SharedSeries, create_directory, open_private_directory,
)
from kserve_otel.export.snapshots import merge_snapshots, snapshot_registry

# A worker: observes `n` values of `value` seconds, counts them, puts 2 requests in flight, shares its series
# in the directory, prints "ready"; then "loop" on stdin makes it observe one value every millisecond (printing
# "looping"), end of input makes it exit normally.
WORKER = """
import json, sys, time
from kserve_otel.recording.series import REGISTRY
from kserve_otel.export.series_files import SharedSeries

directory, n, value = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
bounds = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
histogram = REGISTRY.histogram("request_predict", "d", "s", ("model_name",), bounds=bounds).series("m")
for _ in range(n):
    histogram.observe(value)
REGISTRY.counter("request_total", "c", "1", ("model_name",)).series("m").add(n)
active = REGISTRY.up_down_counter("active", "a", "1", ("m",)).series("GET")
active.increment(); active.increment()
SharedSeries(directory).start()
histogram.observe(value)  # observed after start: lands in the file directly
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "loop":
        print("looping", flush=True)
        while True:
            histogram.observe(value)
            time.sleep(0.001)
"""

Worker = Callable[..., subprocess.Popen]


@pytest.fixture
def directory(tmp_path) -> Iterator[str]:
    path = create_directory(str(tmp_path))
    yield path


@pytest.fixture
def worker(directory: str) -> Iterator[Worker]:
    """Starts worker processes sharing ``directory`` and waits until they are ready; kills them all after."""
    started: list[subprocess.Popen] = []

    def start(n: int, value: float, bounds: list[float] | None = None) -> subprocess.Popen:
        args = [sys.executable, "-c", WORKER, directory, str(n), str(value)]
        args += [json.dumps(bounds)] if bounds else []
        child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
        started.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in started:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
        child.wait(timeout=30)
        for stream in (child.stdin, child.stdout):
            if stream:
                stream.close()


def looping(child: subprocess.Popen) -> None:
    """Make a worker observe continuously, and wait until it does."""
    assert child.stdin and child.stdout
    child.stdin.write("loop\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "looping"


def family(snapshot: list[dict], name: str) -> dict:
    return next(f for f in snapshot if f["name"] == name)


def predict(snapshot: list[dict]) -> dict:
    """The one series of request_predict (model "m")."""
    [series] = family(snapshot, "request_predict")["series"]
    assert series["attributes"] == {"model_name": "m"}
    return series


def total(snapshot: list[dict]) -> int:
    [series] = family(snapshot, "request_total")["series"]
    return series["value"]  # type: ignore[no-any-return]


def in_flight(snapshot: list[dict]) -> int:
    families = [f for f in snapshot if f["name"] == "active"]
    return sum(s["value"] for f in families for s in f["series"])


def registry_with(observations: list[tuple[int, float]]) -> SeriesRegistry:
    """One process's registry holding these (count, value) observations, as a worker records them."""
    registry = SeriesRegistry()
    for n, value in observations:
        for _ in range(n):
            registry.histogram("request_predict", "d", "s", ("model_name",)).series("m").observe(value)
        registry.counter("request_total", "c", "1", ("model_name",)).series("m").add(n)
    return registry


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_merge_across_three_processes_is_exact(directory, worker):
    workers = [(3, 0.02), (5, 0.3), (7, 4.0)]
    for n, value in workers:
        worker(n, value)
    reader = SharedSeries(directory, registry=registry_with([(2, 0.5)]))
    reader.start()

    merged = reader.merged_snapshot()

    series = predict(merged)
    assert sum(series["counts"]) == 2 + (3 + 1) + (5 + 1) + (7 + 1)
    assert series["sum"] == pytest.approx(2 * 0.5 + 4 * 0.02 + 6 * 0.3 + 8 * 4.0)
    assert (series["min"], series["max"]) == (0.02, 4.0)
    assert total(merged) == 2 + 3 + 5 + 7
    assert in_flight(merged) == 6


def test_a_killed_worker_keeps_its_counts_and_drops_its_requests_in_flight(directory, worker, caplog):
    survivor, victim = worker(3, 0.1), worker(5, 0.2)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()
    before = reader.merged_snapshot()
    assert sum(predict(before)["counts"]) == 4 + 6 and in_flight(before) == 4

    victim.kill()
    victim.wait(timeout=30)
    after = reader.merged_snapshot()

    assert sum(predict(after)["counts"]) == 10 and total(after) == 8, "a SIGKILL takes no count with it"
    assert in_flight(after) == 2, "only the live worker's requests are in flight"
    assert survivor.poll() is None and not warnings(caplog)


def test_ended_workers_are_folded_into_one_sum_and_the_totals_never_change(directory, worker, monkeypatch):
    monkeypatch.setattr(series_files, "_COMPACT_INTERVAL", 0.0)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()
    totals = []
    for n in range(1, 6):  # a worker restarted five times, each killed
        child = worker(n, 0.1)
        totals.append(sum(predict(reader.merged_snapshot())["counts"]))
        child.kill()
        child.wait(timeout=30)
        totals.append(sum(predict(reader.merged_snapshot())["counts"]))
    for _ in range(2):
        totals.append(sum(predict(reader.merged_snapshot())["counts"]))

    assert totals == sorted(totals), "a scraped count never decreases"
    assert totals[-1] == sum(n + 1 for n in range(1, 6))
    names = os.listdir(directory)
    assert "retired.json" in names
    assert [n for n in names if n.endswith(".series")] == [f"{p}" for p in reader._file.names], \
        "only the live reader's file is left"
    # a second reader (another worker of the server) sees the same sum
    other = SharedSeries(directory, registry=SeriesRegistry())
    other.start()
    assert sum(predict(other.merged_snapshot())["counts"]) == totals[-1]


def test_a_stopped_worker_is_read_without_waiting_for_it(directory, worker):
    child = worker(4, 0.1)
    looping(child)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()
    counts = [sum(predict(reader.merged_snapshot())["counts"])]
    child.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(20):
            counts.append(sum(predict(reader.merged_snapshot())["counts"]))
        reading = time.monotonic() - started
    finally:
        child.send_signal(signal.SIGCONT)
    time.sleep(0.2)
    counts.append(sum(predict(reader.merged_snapshot())["counts"]))

    assert counts == sorted(counts) and counts[-1] > counts[1] >= counts[0] >= 5
    assert len(set(counts[1:-1])) == 1, "nothing counts while the worker is stopped, and nothing is lost"
    # 20 reads of a stopped process's file: no read waits for it (a wait would be seconds, a read is µs)
    assert reading < 5.0


def test_counts_are_read_while_a_worker_observes_and_never_go_back(directory, worker):
    child = worker(0, 0.1)
    looping(child)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()
    seen = [sum(predict(reader.merged_snapshot())["counts"]) for _ in range(300)]
    assert seen == sorted(seen) and seen[-1] > seen[0]


def test_a_forked_child_counts_in_a_file_of_its_own(directory):
    registry = SeriesRegistry()
    histogram = registry.histogram("request_predict", "d", "s", ("model_name",))
    histogram.series("m").observe(0.1)
    shared = SharedSeries(directory, registry=registry)
    shared.start()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: counts three more, in its own file
        try:
            os.close(read)
            for _ in range(3):
                histogram.series("m").observe(0.2)
            os.write(write, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 1) == b"x"
        histogram.series("m").observe(0.3)
        reader = SharedSeries(directory, registry=SeriesRegistry())
        reader.start()
        assert sum(predict(reader.merged_snapshot())["counts"]) == 1 + 1 + 3, "inherited counts are not doubled"
        assert sum(predict(shared.merged_snapshot())["counts"]) == 5
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)


def test_mismatched_bounds_are_skipped_with_one_warning(directory, worker, caplog):
    worker(3, 0.1)
    worker(100, 0.1, bounds=[0.5, 1.0])
    reader = SharedSeries(directory, registry=registry_with([(1, 0.1)]))
    reader.start()

    merged = reader.merged_snapshot()

    assert sum(predict(merged)["counts"]) == 1 + 4  # this process came first: its bounds win
    assert total(merged) == 104  # the counter family still merges
    [warning] = warnings(caplog)
    assert "request_predict" in warning


def test_garbage_in_the_directory_is_skipped_with_a_warning(directory, worker, caplog):
    worker(3, 0.1)
    fd = open_private_directory(directory)
    try:
        for name, content in [("1-1.0.series", b"KOSERIES" + b"\xff" * 100), ("2-2.0.series", b"x" * 80)]:
            file = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
            os.write(file, content)
            os.close(file)
    finally:
        os.close(fd)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()

    assert sum(predict(reader.merged_snapshot())["counts"]) == 4
    assert len(warnings(caplog)) == 2 and all("skips the series file" in w for w in warnings(caplog))
    reader.merged_snapshot()
    assert len(warnings(caplog)) == 2, "each is reported once"


# ------------------------------------------------------------------------------------- a hostile neighbour


def test_a_directory_that_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "recreated"
    shared.mkdir()
    os.chmod(shared, 0o777)  # as another user recreates a vanished /tmp directory
    with pytest.raises(DirectoryRefused, match=r"not private: .*mode 0777 \(0700 expected\)"):
        SharedSeries(str(shared), registry=SeriesRegistry()).start()
    assert os.listdir(shared) == [], "nothing was written into it"


def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another user")  # CI runs as root
    shared = tmp_path / "theirs"
    shared.mkdir(mode=0o700)
    os.chown(shared, 65534, 65534)
    with pytest.raises(DirectoryRefused, match=r"owner uid 65534"):
        SharedSeries(str(shared), registry=SeriesRegistry()).start()


def test_a_link_to_a_directory_is_refused(tmp_path, directory):
    link = tmp_path / "link"
    link.symlink_to(directory)
    with pytest.raises(DirectoryRefused, match="links are not followed"):
        SharedSeries(str(link), registry=SeriesRegistry()).start()


def test_links_and_foreign_files_inside_are_never_followed_nor_merged(tmp_path, directory, worker, caplog,
                                                                     monkeypatch):
    monkeypatch.setattr(series_files, "_COMPACT_INTERVAL", 0.0)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o600)
    worker(3, 0.1)
    real = next(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".0.series"))
    os.symlink(real, os.path.join(directory, "3-3.0.series"))  # a link to a real file: would double its counts
    forged = os.path.join(directory, "4-4.0.series")  # a copy of a real file, owned by another user
    with open(real, "rb") as source, open(forged, "wb") as copy:
        copy.write(source.read())
    os.chown(forged, 65534, 65534)
    os.symlink(victim, os.path.join(directory, f".retired.json.{os.getpid()}.tmp"))  # where the sum is written
    dead = worker(5, 0.1)
    dead.kill()
    dead.wait(timeout=30)
    reader = SharedSeries(directory, registry=SeriesRegistry())
    reader.start()

    assert sum(predict(reader.merged_snapshot())["counts"]) == 4 + 6, "only the real workers count"
    assert victim.read_bytes() == b"precious", "no link is followed when writing"
    assert any("3-3" in w for w in warnings(caplog)) and any("4-4" in w for w in warnings(caplog))


def test_stale_directories_of_killed_servers_are_removed_and_live_ones_kept(tmp_path):
    make = "import sys, time; from kserve_otel.export.series_files import create_directory; " \
           "print(create_directory(sys.argv[1]), flush=True); time.sleep(60)"
    killed = subprocess.Popen([sys.executable, "-c", make, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    living = subprocess.Popen([sys.executable, "-c", make, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert killed.stdout and living.stdout
        stale, alive = killed.stdout.readline().strip(), living.stdout.readline().strip()
        killed.kill()
        killed.wait(timeout=30)
        foreign = tmp_path / f"{series_files.DIRECTORY_PREFIX}foreign"
        foreign.mkdir(mode=0o755)  # not private: not ours to judge, left alone

        fresh = create_directory(str(tmp_path))

        assert not os.path.exists(stale) and os.path.isdir(alive) and foreign.is_dir()
        assert oct(os.stat(fresh).st_mode & 0o777) == "0o700"
    finally:
        for child in (killed, living):
            child.kill()
            child.wait(timeout=30)
            if child.stdout:
                child.stdout.close()


# ------------------------------------------------------------------------------------------ snapshots


def test_merge_skips_a_family_whose_kind_differs():
    histograms, counters = SeriesRegistry(), SeriesRegistry()
    histograms.histogram("mixed_kind", "d", "s", ("k",)).series("a").observe(0.2)
    counters.counter("mixed_kind", "d", "s", ("k",)).series("a").add(5)
    merged = merge_snapshots([snapshot_registry(histograms), snapshot_registry(counters)])
    assert merged == snapshot_registry(histograms)


def test_merge_matches_series_by_attributes_in_any_order():
    first = [{"name": "t", "kind": "counter", "description": "", "unit": "1", "label_names": ["a", "b"],
              "series": [{"attributes": {"a": "1", "b": "2"}, "start": 5, "value": 2}]}]
    second = [{**first[0], "series": [{"attributes": {"b": "2", "a": "1"}, "start": 3, "value": 7},
                                      {"attributes": {"a": "x", "b": "2"}, "start": 9, "value": 1}]}]
    merged = merge_snapshots([first, second])
    assert merged[0]["series"] == [{"attributes": {"a": "1", "b": "2"}, "start": 3, "value": 9},
                                   {"attributes": {"a": "x", "b": "2"}, "start": 9, "value": 1}]
    assert first[0]["series"][0]["value"] == 2, "inputs are not modified"


def test_snapshot_is_json_round_trippable():
    registry = SeriesRegistry()
    histogram = registry.histogram("request_predict", "Latency", "s", ("model_name",), bounds=[0.1, 1.0])
    histogram.series("m").observe(0.5)
    histogram.series("m").observe(2.0)
    histogram.series("unobserved")
    registry.counter("request_total", "Requests", "1", ("model_name",)).series("m")
    registry.histogram("never_used", "d", "s", ())

    snapshot = snapshot_registry(registry)

    assert json.loads(json.dumps(snapshot, allow_nan=False)) == snapshot
    [series] = family(snapshot, "request_predict")["series"]
    assert family(snapshot, "request_predict")["bounds"] == [0.1, 1.0]
    assert {k: v for k, v in series.items() if k != "start"} == {
        "attributes": {"model_name": "m"}, "counts": [0, 1, 1], "sum": 2.5, "min": 0.5, "max": 2.0,
    }
    assert family(snapshot, "request_total")["series"][0]["value"] == 0
    assert [f["name"] for f in snapshot] == ["request_predict", "request_total"]
    assert histogram.series("m").snapshot()[4:] == (0.5, 2.0), "the interval min/max are not reset"
    assert snapshots.without_gauges(snapshot) == snapshot


EXEMPLAR_WORKER = """
import sys, time
from kserve_otel.recording.series import REGISTRY
from kserve_otel.export.series_files import SharedSeries

family = REGISTRY.histogram("request_predict", "d", "s", ("model_name",), bounds=[0.1, 1.0], exemplars=True)
family.series("m").observe_exemplar(0.5, 0xABC, 0xDEF)
SharedSeries(sys.argv[1]).start()
family.series("m").observe_exemplar(0.05, 0x123, 0x456)  # after start: written in the file directly
print("ready", flush=True)
sys.stdin.read()
"""


def test_exemplars_are_read_from_other_processes_and_the_latest_of_a_bucket_wins(directory):
    child = subprocess.Popen([sys.executable, "-c", EXEMPLAR_WORKER, directory], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        registry = SeriesRegistry()
        family = registry.histogram("request_predict", "d", "s", ("model_name",), bounds=[0.1, 1.0], exemplars=True)
        family.series("m").observe_exemplar(0.7, 0x777, 0x888)  # later than the worker's 0.5: it wins that bucket
        reader = SharedSeries(directory, registry=registry)
        reader.start()
        series = predict(reader.merged_snapshot())
        assert sum(series["counts"]) == 3
        low, middle, high = series["exemplars"]
        assert low[0] == 0.05 and low[2:] == [f"{0x123:032x}", f"{0x456:016x}"]
        assert middle[0] == 0.7 and middle[2:] == [f"{0x777:032x}", f"{0x888:016x}"]
        assert high is None
        child.kill()
        child.wait(timeout=30)
        assert predict(reader.merged_snapshot())["exemplars"][0][0] == 0.05, "a dead worker's exemplars stay"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for stream in (child.stdin, child.stdout):
            if stream:
                stream.close()
