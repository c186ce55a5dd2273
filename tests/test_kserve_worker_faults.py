"""Counts that never go backwards: a real 2-worker KServe server under load, one worker killed (``kill -9``),
one terminated (``SIGTERM``, uvicorn's clean shutdown), one stopped (``SIGSTOP`` for 6 s, which KServe's
supervisor answers by killing and replacing it) and one stalled (a synchronous predict holding its GIL and
event loop for 3.5 s), in turn, while a real Prometheus scrapes every second.

What users rely on: Prometheus sees no counter reset (``resets()`` is 0) for the step and HTTP histograms, every
scrape the test makes itself is at least the one before, and the final count covers every request that was
answered. The requests in flight of a dead worker drop out of ``http_server_active_requests``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import KServeProcess, PrometheusProcess, histogram_count, scrape, wait_until

pytestmark = pytest.mark.e2e

BODY = {"instances": [[6.8, 2.8, 4.8, 1.4]]}
COUNTED = ("request_predict_seconds", "request_preprocess_seconds", "http_server_request_duration_seconds")


def workers_of(server: KServeProcess) -> list[int]:
    """The pids of the server's REST worker processes (spawned children running ``spawn_main``)."""
    found = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, found.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return sorted(pids)


class Load:
    """Threads that send predict requests until stopped, counting the requests answered with 200."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = f"{url}/v1/models/iris:predict"
        self.answered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=BODY)
                except httpx.HTTPError:
                    continue  # the worker that had the connection died: not answered
                if response.status_code == 200:
                    with self._lock:
                        self.answered += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


class Scrapes:
    """Scrapes the endpoint twice a second from a thread, keeping the step and HTTP counts of every scrape."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict[str, float]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = scrape(self.url)
            except OSError:
                self.failures += 1
            else:
                self.seen.append({name: histogram_count(text, name, **({"model_name": "iris"} if "request_" in name
                                                                      and "http" not in name else {}))
                                  for name in COUNTED})
            self._stop.wait(0.5)

    def __enter__(self) -> Scrapes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[KServeProcess]:
    server = KServeProcess("iris,stall", args=["--workers", "2"], env={"OTEL_TRACES_EXPORTER": "none"})
    try:
        server.wait_ready()
        wait_until(lambda: len(workers_of(server)) == 2, "two workers")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[PrometheusProcess]:
    with PrometheusProcess.scraping(server.http_port, tmp_path_factory.mktemp("prometheus")) as prometheus:
        yield prometheus


def _replace(server: KServeProcess, fault: signal.Signals, hold: float = 0.0) -> None:
    """Send ``fault`` to one worker under load (and SIGCONT after ``hold`` s), then wait until KServe's
    supervisor has two live workers again and they answer."""
    victim = workers_of(server)[0]
    os.kill(victim, fault)
    if hold:
        time.sleep(hold)
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass  # KServe killed it for not answering its ping
    wait_until(lambda: victim not in workers_of(server) or fault == signal.SIGSTOP, "the victim gone", 30)
    wait_until(lambda: len(workers_of(server)) == 2, "two workers again", 60)
    time.sleep(2)  # both answer and Prometheus scrapes them


def test_worker_deaths_and_stalls_never_take_counts_back(server, prometheus):
    with Load(server.url) as load, Scrapes(f"{server.url}/metrics") as scrapes:
        time.sleep(3)
        _replace(server, signal.SIGKILL)
        _replace(server, signal.SIGTERM)
        _replace(server, signal.SIGSTOP, hold=6.0)
        stalled = httpx.post(f"{server.url}/v1/models/stall:predict", json={"instances": [3.5]}, timeout=30)
        assert stalled.status_code == 200
        time.sleep(2)
    answered = load.answered
    time.sleep(3)  # Prometheus scrapes the final state

    final = scrape(f"{server.url}/metrics")
    assert answered > 100, "the load reached the server"
    assert histogram_count(final, "request_predict_seconds", model_name="iris") >= answered
    assert histogram_count(final, "http_server_request_duration_seconds") >= answered
    assert len(scrapes.seen) > 20
    for name in COUNTED:
        counts = [seen[name] for seen in scrapes.seen]
        drops = [(a, b) for a, b in zip(counts, counts[1:]) if b < a]
        assert not drops, f"{name} went back between scrapes: {drops}"

    for name in COUNTED:
        result = prometheus.query(f"sum(resets({name}_count[10m]))")["data"]["result"]
        assert result and float(result[0]["value"][1]) == 0, f"Prometheus saw {name} reset: {result}"
        total = prometheus.query(f"sum(max_over_time({name}_count[10m]))")["data"]["result"]
        assert float(total[0]["value"][1]) >= answered


def test_requests_in_flight_of_a_dead_worker_drop_out(server):
    text = scrape(f"{server.url}/metrics")
    in_flight = sum(v for k, v in _gauges(text).items())
    assert in_flight <= 1, "only this scrape may be in flight; the killed workers' requests are not"


def _gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {str(sample.labels): sample.value for family in text_string_to_metric_families(text)
            if family.name == "http_server_active_requests" for sample in family.samples}
