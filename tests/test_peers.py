"""Peer exchange: real worker processes serve snapshots over real Unix sockets; the scraping one sums them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT

from kserve_otel import peers
from kserve_otel.peers import PeerExchange, merge_snapshots, snapshot_registry
from kserve_otel.series import SeriesRegistry

# A worker: observes `n` values of `value` seconds (and counts them), serves its registry, then waits on
# stdin: "stop" calls stop() explicitly, end of input exits normally (atexit then calls stop()).
WORKER = """
import json, sys
from kserve_otel.peers import PeerExchange
from kserve_otel.series import REGISTRY

directory, n, value = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
bounds = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
histogram = REGISTRY.histogram("request_predict", "d", "s", ("model_name",), bounds=bounds).series("m")
for _ in range(n):
    histogram.observe(value)
REGISTRY.counter("request_total", "c", "1", ("model_name",)).series("m").add(n)
exchange = PeerExchange(directory)
exchange.start()
for line in sys.stdin:
    if line.strip() == "stop":
        exchange.stop()
        break
"""

Worker = Callable[..., subprocess.Popen]


@pytest.fixture
def directory(tmp_path) -> Iterator[str]:
    """tmp_path when its socket paths fit the kernel's limit, else a short directory under /tmp."""
    if len(os.fsencode(str(tmp_path))) + len("/4194304.sock") <= peers.MAX_SOCKET_PATH:
        yield str(tmp_path)
        return
    short = tempfile.mkdtemp(prefix="kop-", dir="/tmp")
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def worker(directory: str) -> Iterator[Worker]:
    """Starts worker processes serving in ``directory`` and waits for their socket; kills them all after."""
    started: list[subprocess.Popen] = []

    def start(n: int, value: float, bounds: list[float] | None = None) -> subprocess.Popen:
        args = [sys.executable, "-c", WORKER, directory, str(n), str(value)]
        args += [json.dumps(bounds)] if bounds else []
        child = subprocess.Popen(args, stdin=subprocess.PIPE, cwd=ROOT)
        started.append(child)
        socket_path = os.path.join(directory, f"{child.pid}.sock")
        wait_for(lambda: os.path.exists(socket_path) or child.poll() is not None)
        assert child.poll() is None, "the worker exited before serving"
        return child

    yield start
    for child in started:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
        child.wait(timeout=30)
        if child.stdin:
            child.stdin.close()


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


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


def registry_with(observations: list[tuple[int, float]]) -> SeriesRegistry:
    """One process's registry holding these (count, value) observations, as a worker records them."""
    registry = SeriesRegistry()
    for n, value in observations:
        for _ in range(n):
            registry.histogram("request_predict", "d", "s", ("model_name",)).series("m").observe(value)
        registry.counter("request_total", "c", "1", ("model_name",)).series("m").add(n)
    return registry


def stop_cleanly(child: subprocess.Popen, explicit: bool) -> None:
    child.communicate(b"stop\n" if explicit else b"", timeout=60)
    assert child.returncode == 0


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = [r for r in caplog.records if r.name == peers.logger.name]
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_merge_across_three_processes_is_exact(directory, worker):
    workers = [(3, 0.02), (5, 0.3), (7, 4.0)]
    children = [worker(n, value) for n, value in workers]
    exchange = PeerExchange(directory, registry=registry_with([(2, 0.001)]))

    peer_snapshots = exchange.peer_snapshots()
    merged = exchange.merged_snapshot()

    assert len(peer_snapshots) == len(children)
    everything = snapshot_registry(registry_with([(2, 0.001), *workers]))  # all observations in one process
    series, expected = predict(merged), predict(everything)
    assert sum(series["counts"]) == 17
    assert series["counts"] == expected["counts"]
    assert series["sum"] == pytest.approx(expected["sum"])
    assert (series["min"], series["max"]) == (0.001, 4.0)
    parts = [snapshot_registry(exchange.registry), *peer_snapshots]
    assert series["start"] == min(predict(part)["start"] for part in parts)
    assert total(merged) == 17
    assert family(merged, "request_predict")["bounds"] == family(everything, "request_predict")["bounds"]


def test_killed_peer_is_skipped_and_its_socket_removed(directory, worker, caplog):
    alive, killed = worker(1, 0.1), worker(10, 0.1)
    killed.kill()
    killed.wait(timeout=30)
    exchange = PeerExchange(directory, registry=SeriesRegistry())

    assert total(exchange.merged_snapshot()) == 1
    assert not os.path.exists(os.path.join(directory, f"{killed.pid}.sock"))
    assert os.path.exists(os.path.join(directory, f"{alive.pid}.sock"))
    assert warnings(caplog) == []


@pytest.mark.parametrize("explicit", [True, False], ids=["stop", "atexit"])
def test_peer_that_exits_cleanly_keeps_its_counts(directory, worker, explicit):
    leaving, staying = worker(4, 0.05), worker(2, 0.05)
    exchange = PeerExchange(directory, registry=SeriesRegistry())
    before = exchange.merged_snapshot()

    stop_cleanly(leaving, explicit)
    after = exchange.merged_snapshot()

    assert total(before) == total(after) == 6
    assert predict(after)["counts"] == predict(before)["counts"]
    assert sorted(os.listdir(directory)) == [f"{leaving.pid}.final.json", f"{staying.pid}.sock"]


def test_hung_peer_is_skipped_within_the_timeout_with_one_warning(directory, worker, caplog):
    worker(1, 0.1)
    hung = worker(10, 0.1)
    exchange = PeerExchange(directory, registry=SeriesRegistry())
    hung.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):
            began = time.monotonic()
            assert [total(s) for s in exchange.peer_snapshots(timeout=0.5)] == [1]
            assert time.monotonic() - began < 3
    finally:
        hung.send_signal(signal.SIGCONT)
    assert len(warnings(caplog)) == 1, "a peer that keeps failing warns once, not at every scrape"
    assert f"{hung.pid}.sock" in warnings(caplog)[0]
    assert total(exchange.merged_snapshot()) == 11  # back once it runs again


def test_garbage_from_a_peer_is_skipped_with_a_warning(directory, caplog):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.path.join(directory, "999.sock"))
        listener.listen()

        def answer_garbage() -> None:
            for reply in [b"{not json", b'[{"name": "x", "kind": "gauge", "series": []}]']:
                connection, _ = listener.accept()
                with connection:
                    connection.sendall(reply)

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        exchange = PeerExchange(directory, registry=SeriesRegistry())
        assert exchange.peer_snapshots() == []
        assert exchange.peer_snapshots() == []
        thread.join(timeout=30)
    assert len(warnings(caplog)) == 1


def test_mismatched_bounds_are_skipped_with_one_warning(directory, worker, caplog):
    worker(3, 0.1)
    worker(100, 0.1, bounds=[0.5, 1.0])
    exchange = PeerExchange(directory, registry=registry_with([(1, 0.1)]))

    merged = exchange.merged_snapshot()

    assert sum(predict(merged)["counts"]) == 4  # this process came first: its bounds win
    assert total(merged) == 104  # the counter family still merges
    [warning] = warnings(caplog)
    assert "request_predict" in warning


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


def test_socket_path_length_is_checked():
    too_long = "/tmp/" + "d" * 100
    with pytest.raises(ValueError, match=f"{too_long}.*{peers.MAX_SOCKET_PATH}"):
        PeerExchange(too_long)
    assert not os.path.exists(too_long)


def test_start_and_stop_in_this_process(directory):
    registry = registry_with([(3, 0.1)])
    exchange = PeerExchange(os.path.join(directory, "sub"), registry=registry)
    exchange.start()
    exchange.start()
    assert os.listdir(exchange.directory) == [f"{os.getpid()}.sock"]
    assert oct(os.stat(exchange.directory).st_mode & 0o777) == oct(0o700)
    assert exchange.peer_snapshots() == [], "a process is not its own peer"

    exchange.stop()
    exchange.stop()
    assert os.listdir(exchange.directory) == [f"{os.getpid()}.final.json"]
    assert total(exchange.merged_snapshot()) == 3, "its own final snapshot is not counted twice"

    exchange.start()  # again: the registry still holds what the final file held
    assert total(exchange.merged_snapshot()) == 3
    exchange.stop()


def test_stop_never_raises_when_the_directory_is_gone(caplog):
    directory = PeerExchange.create_directory()
    exchange = PeerExchange(directory, registry=registry_with([(1, 0.1)]))
    exchange.start()
    shutil.rmtree(directory)
    exchange.stop()
    exchange.stop()
    assert len(warnings(caplog)) == 1
    assert exchange.peer_snapshots() == []
