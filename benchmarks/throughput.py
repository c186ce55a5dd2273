"""End-to-end throughput: whole requests per second through real servers, bare and (later) instrumented.

Why: per-call microseconds (:mod:`benchmarks.step_overhead`) say nothing about what a user sees, which is
requests per second and latency percentiles of a whole server. A KServe iris request costs about a millisecond
here; this measure shows what share of that instrumentation takes, once the instrumented servers exist.

How: each server of :mod:`benchmarks.servers` runs in its own process on a free loopback port; a load generator
drives ``POST /v1/models/iris:predict`` at concurrency 1 and 8 (one connection each, keep-alive) for a fixed
number of seconds after a warm-up, a few times; the table holds the medians of those runs. An uninstrumented
server and its instrumented twin run side by side and take turns, run after run, so that a slow minute of
the machine weighs on both. Each round runs the baseline first and after every instrumented run (A B A C A):
an instrumented run's ratio is to the geometric mean of the two baseline runs around it, so a drift of the
machine's speed within the round cancels; the target is the median of those ratios.

Load generators: ``wrk`` when it is installed (``apt-get install wrk``; C, one thread: it leaves the server a
core of its own), else a small asyncio HTTP/1.1 client in Python. The Python client is CPU-bound: on two cores it
competes with the server, so its numbers are a floor, comparable only with each other. ``BENCH_LOADGEN=wrk`` or
``python`` (``benchmarks.run --loadgen``) forces one.

Targets: the instrumented KServe iris server keeps at least 0.97 of KServe's own throughput, the instrumented
trivial Starlette app at least 0.90 of the bare app's, at each concurrency; so does a KServe server with two
workers (``kserve2w``), both of them scraped once a second while under load, where every scrape of the
instrumented one reads both workers' series files. The two reference layers around the
same Starlette app (``starlette-passthrough``, ``starlette-status-layer``: see :mod:`benchmarks.servers`) have
no target: they show the share that any ASGI middleware, and any that records durations by status, costs
before doing anything of its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from time import perf_counter, perf_counter_ns
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from .harness import ROOT, Section, Table, Target, free_port, module_main, stop
from .servers import KINDS, MODEL_NAME, PREDICT_PATH, READY_PATHS, REQUEST_BODY, SPANS_PER_REQUEST, TRACED, pending

CONCURRENCIES = (1, 8)
#: What each instrumented kind is compared with.
BASELINES = {
    "starlette-instrumented": "starlette", "starlette-passthrough": "starlette", "starlette-status-layer": "starlette",
    "kserve-instrumented": "kserve", "kserve2w-instrumented": "kserve2w",
    "kserve-traced": "kserve", "kserve-ratio": "kserve", "starlette-traced": "starlette",
    "starlette-contrib": "starlette",
}
#: The least share of the uninstrumented throughput each instrumented server must keep (issue targets).
THROUGHPUT_TARGETS = {
    "kserve-instrumented": 0.97, "starlette-instrumented": 0.90, "kserve2w-instrumented": 0.97,
    "kserve-traced": 0.85, "kserve-ratio": 0.97,
}
#: Kinds scraped once a second while they run (a multi-process server's scrape reads every worker's series).
SCRAPED_EVERY_SECOND = ("kserve2w", "kserve2w-instrumented")


@dataclass
class LoadResult:
    """One run of a load generator: completed requests, failures, and latency percentiles in milliseconds."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- servers


@contextmanager
def running_server(kind: str, ready_timeout: float = 90.0) -> Iterator[str]:
    """Start ``python -m benchmarks.servers KIND`` on free loopback ports; yields its base URL."""
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BENCH_HTTP_PORT": str(http_port), "BENCH_GRPC_PORT": str(grpc_port)}
    base = f"http://127.0.0.1:{http_port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.servers", kind], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            _wait_ready(proc, base + READY_PATHS[kind.split("-")[0]], ready_timeout, log)
            yield base
        finally:
            stop(proc, 15)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    log.seek(0)  # type: ignore[attr-defined]
    tail = log.read()[-2000:].decode(errors="replace")  # type: ignore[attr-defined]
    raise RuntimeError(f"server at {url} did not become ready (exit code {proc.poll()}):\n{tail}")


# --------------------------------------------------------------------------------------------- load generators


def choose_loadgen() -> str:
    wanted = os.environ.get("BENCH_LOADGEN", "auto")
    if wanted == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if wanted not in ("wrk", "python"):
        raise SystemExit(f"BENCH_LOADGEN must be auto, wrk or python, not {wanted!r}")
    return wanted


_WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """The numbers of ``wrk --latency`` output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not done:
        raise ValueError(f"no request count in wrk output:\n{output}")
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)$", output, re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return LoadResult(
        requests=int(done.group(1)), errors=errors, seconds=_wrk_ms(done.group(2) + done.group(3)) / 1e3,
        p50_ms=_wrk_ms(percentiles["50"]), p99_ms=_wrk_ms(percentiles["99"]),
    )


def wrk_load(url: str, concurrency: int, seconds: int) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT.format(body=REQUEST_BODY.decode()))
        script.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout
    return parse_wrk(out)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; returns its status and whether the server keeps the connection open."""
    status = int((await reader.readline()).split()[1])
    length, chunked, keep_alive = 0, False, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            keep_alive = False
    if not chunked:
        await reader.readexactly(length)
        return status, keep_alive
    while size := int((await reader.readline()).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    while await reader.readline() not in (b"\r\n", b""):  # trailers
        pass
    return status, keep_alive


async def _drive(url: str, concurrency: int, seconds: float | None, requests: int | None) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY
    latencies: list[int] = []
    errors = 0
    remaining = requests if requests is not None else -1
    deadline = perf_counter() + seconds if seconds is not None else float("inf")

    async def client() -> None:
        nonlocal errors, remaining
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while remaining != 0 and perf_counter() < deadline:
                remaining -= 1
                start = perf_counter_ns()
                writer.write(request)
                try:
                    status, keep_alive = await _read_response(reader)
                except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    status, keep_alive = 0, False
                latencies.append(perf_counter_ns() - start)
                if status != 200:
                    errors += 1 if status else 0
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    started = perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return LoadResult(len(latencies) - errors, errors, elapsed, cuts[49] / 1e6, cuts[98] / 1e6)


def python_load(url: str, concurrency: int, seconds: float | None = None, requests: int | None = None) -> LoadResult:
    """Drive ``url`` with ``concurrency`` keep-alive connections for ``seconds`` or a total of ``requests``."""
    return asyncio.run(_drive(url, concurrency, seconds, requests))


def load(loadgen: str, url: str, concurrency: int, seconds: int) -> LoadResult:
    if loadgen == "wrk":
        return wrk_load(url, concurrency, seconds)
    return python_load(url, concurrency, seconds=seconds)


# --------------------------------------------------------------------------------------------- report


def predict_observations(base: str) -> int | None:
    """``request_predict_seconds_count`` of the iris model on the server's ``/metrics``, if it serves one."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "request_predict_seconds_count" and sample.labels.get("model_name") == MODEL_NAME:
                return int(sample.value)
    return None


@contextmanager
def span_receiver() -> Iterator[str]:
    """A real OTLP/HTTP receiver (:mod:`benchmarks.otlp_sink`) in a process of its own; yields its endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.otlp_sink", str(port)], cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/count", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the OTLP receiver did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def received_spans(endpoint: str) -> dict[str, int]:
    """Spans the receiver decoded so far, by service name (the benchmark names each traced server's service
    after its kind)."""
    with urllib.request.urlopen(endpoint + "/count", timeout=10) as response:
        return dict(json.load(response)["by_service"])


def http_requests(base: str) -> int | None:
    """Requests the server's own /metrics counted (``http_server_request_duration_seconds_count``, summed)."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    return int(sum(sample.value for family in text_string_to_metric_families(text)
                   if family.name == "http_server_request_duration_seconds"
                   for sample in family.samples if sample.name.endswith("_count")))


@contextmanager
def scraping(urls: list[str], interval: float = 1.0) -> Iterator[None]:
    """Scrape each of ``urls`` every ``interval`` seconds from a thread while the block runs, as Prometheus does."""
    import threading

    stop = threading.Event()

    def scrape_all() -> None:
        while not stop.wait(interval):
            for url in urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        response.read()
                except OSError:
                    pass

    thread = threading.Thread(target=scrape_all, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _fmt(results: list[LoadResult]) -> tuple[float, float, float, int]:
    return (
        statistics.median(r.rps for r in results), statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results), sum(r.errors for r in results),
    )


def _pairs() -> list[tuple[str, ...]]:
    """The kinds grouped as they are compared: each uninstrumented server with its instrumented one."""
    pairs, seen = [], set()
    wanted = os.environ.get("BENCH_KINDS")  # e.g. "kserve2w": only these baselines and their instrumented twins
    for kind in KINDS:
        if wanted and kind not in wanted.split(",") and BASELINES.get(kind) not in wanted.split(","):
            continue
        if kind in seen:
            continue
        group = (kind, *[k for k, base in BASELINES.items() if base == kind])
        seen.update(group)
        pairs.append(group)
    return pairs


def run(quick: bool) -> Section:
    warmup, seconds, repeats = (0, 1, 1) if quick else (1, 3, 7)
    loadgen = choose_loadgen()
    section = Section("End-to-end throughput (whole requests)", __doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
    medians: dict[tuple[str, int], float] = {}
    ratios: dict[tuple[str, int], float] = {}  # median of the paired runs' ratios, by (instrumented kind, concurrency)
    rows = []
    stack = ExitStack()
    if any(kind in TRACED for group in _pairs() for kind in group):
        os.environ["BENCH_OTLP_ENDPOINT"] = receiver = stack.enter_context(span_receiver())
    for group in _pairs():
        kinds = [kind for kind in group if pending(kind) is None]
        rows.extend([kind, "—", "pending", "", "", "", "", pending(kind)] for kind in group if kind not in kinds)
        try:
            with ExitStack() as servers:
                # Both servers of a pair run at once (the idle one costs nothing) and take turns under load,
                # run after run: a drift of the machine's speed over the minutes then hits both alike.
                urls = {kind: servers.enter_context(running_server(kind)) for kind in kinds}
                scraped = [urls[kind] + "/metrics" for kind in kinds if kind in SCRAPED_EVERY_SECOND]
                if scraped:
                    servers.enter_context(scraping(scraped))
                answered = dict.fromkeys(kinds, 0)
                for concurrency in CONCURRENCIES:
                    results: dict[str, list[LoadResult]] = {kind: [] for kind in kinds}
                    for kind in kinds:
                        if warmup:
                            answered[kind] += load(loadgen, urls[kind] + PREDICT_PATH, concurrency, warmup).requests
                    # Each round brackets every instrumented run by baseline runs, the baseline first and
                    # last: A B A C A D A. A run's ratio is to the geometric mean of the baseline runs either
                    # side of it, so that a drift of the machine's speed within a round cancels (the machine
                    # here moves by more than the effects measured from one run to the next).
                    bracketing: dict[str, list[float]] = {kind: [] for kind in kinds}
                    base_kind = kinds[0] if kinds and kinds[0] not in BASELINES else None
                    for _ in range(repeats):
                        if base_kind is None:
                            for kind in kinds:
                                results[kind].append(load(loadgen, urls[kind] + PREDICT_PATH, concurrency, seconds))
                            continue
                        before = load(loadgen, urls[base_kind] + PREDICT_PATH, concurrency, seconds)
                        results[base_kind].append(before)
                        for kind in kinds[1:]:
                            ours = load(loadgen, urls[kind] + PREDICT_PATH, concurrency, seconds)
                            after = load(loadgen, urls[base_kind] + PREDICT_PATH, concurrency, seconds)
                            results[kind].append(ours)
                            results[base_kind].append(after)
                            if before.rps and after.rps:
                                bracketing[kind].append(ours.rps / math.sqrt(before.rps * after.rps))
                            before = after
                    for kind in kinds:
                        answered[kind] += sum(r.requests for r in results[kind])
                        rps, p50, p99, errors = _fmt(results[kind])
                        medians[(kind, concurrency)] = rps
                        base = BASELINES.get(kind, "")
                        if base in results and bracketing.get(kind):
                            ratios[(kind, concurrency)] = statistics.median(bracketing[kind])
                        ratio = ratios.get((kind, concurrency))
                        rows.append([
                            kind, str(concurrency), f"{rps:,.0f}", f"{p50:.2f} ms", f"{p99:.2f} ms", str(errors),
                            f"{len(results[kind])} x {seconds} s",
                            "—" if ratio is None else f"{ratio:.2f} of {base}",
                        ])
                traced = [kind for kind in kinds if kind in TRACED]
                if traced:
                    time.sleep(7)  # the batch span processors' 5 s schedule: the last spans go out
                    spans = received_spans(receiver)
                    for kind in traced:
                        served = http_requests(urls[kind]) if kind in SPANS_PER_REQUEST else None
                        per = SPANS_PER_REQUEST.get(kind)
                        predicted = predict_observations(urls[kind]) or 0
                        # each request has its span; each predict request its step spans too
                        expected = "" if served is None or not per else (
                            f"; the server served {served:,} requests, {predicted:,} of them predictions with "
                            f"{per - 1} step spans each: {served + predicted * (per - 1):,} spans expected")
                        section.notes.append(
                            f"{kind} (sampler {TRACED[kind]}): the OTLP receiver decoded {spans.get(kind, 0):,} "
                            f"spans for {answered[kind]:,} requests answered{expected}."
                        )
                for kind in kinds:
                    observed = predict_observations(urls[kind])
                    if observed is not None:
                        section.notes.append(
                            f"{kind}: /metrics holds {observed:,} predict observations for {answered[kind]:,} "
                            "requests answered."
                        )
        except (RuntimeError, subprocess.SubprocessError, ValueError, OSError) as exc:
            rows.append([" + ".join(kinds), "—", "failed", "", "", "", "", str(exc).splitlines()[0]])
            section.notes.append(f"{' + '.join(kinds)} failed: {exc}")
    stack.close()
    section.tables.append(Table(
        f"requests per second and latency (load generator: {loadgen}; medians of the runs)",
        ["server", "concurrency", "requests/s", "p50", "p99", "errors", "runs", "vs uninstrumented"], rows,
    ))
    section.notes.insert(0, (
        "Predict observations below: `request_predict_seconds_count{model_name=\"iris\"}` on the server's /metrics "
        "after all its runs (warm-ups included), against the requests the load generator saw answered; a "
        "request in flight when a run stops is observed without being counted as answered."
    ))
    for kind, limit in THROUGHPUT_TARGETS.items():
        base = BASELINES[kind]
        for concurrency in CONCURRENCIES:
            ours, theirs = medians.get((kind, concurrency)), medians.get((base, concurrency))
            section.targets.append(Target(
                f"throughput, concurrency {concurrency}: {kind} / {base}", ratios.get((kind, concurrency)), limit,
                "—" if ours is None or not theirs
                else f"median of {repeats} bracketed runs; medians {ours:,.0f} / {theirs:,.0f} requests/s",
                at_least=True,
            ))
    for concurrency in CONCURRENCIES:
        ours, contrib = medians.get(("starlette-traced", concurrency)), medians.get(("starlette-contrib", concurrency))
        bare = medians.get(("starlette", concurrency))
        if ours and contrib and bare:
            section.notes.append(
                f"Starlette, every request traced, concurrency {concurrency}: kserve-otel {ours / bare:.2f} of the bare "
                f"app, contrib's OpenTelemetryMiddleware with the SDK's exporter {contrib / bare:.2f}; kserve-otel "
                f"{ours / contrib:.2f} x contrib."
            )
    if loadgen == "python":
        section.notes.append(
            "Load generator: Python asyncio client (wrk not installed). It is CPU-bound and shares two cores with "
            "the server: the numbers are a floor, comparable with each other only."
        )
    return section


if __name__ == "__main__":
    module_main(run)
