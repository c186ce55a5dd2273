"""Instructions per request of whole KServe servers, uninstrumented, instrumented and traced, counted by callgrind.

Why: on this project's shared two-core machine the throughput measure's paired runs of the traced server swing
by 10-20 % from one run to the next, more than a change of the tracing path is worth; the instructions a server
executes per request are the same for the same code whatever else the machine does. Unlike
:mod:`benchmarks.instructions` (the Starlette app driven in process), this counts the real servers of
:mod:`benchmarks.servers`: uvicorn, KServe's app and model, the instrumentation, and for a traced server the span
processor's thread encoding and sending every span by OTLP/HTTP to the benchmark's receiver.

How: each server runs under ``valgrind --tool=callgrind --instr-atstart=no`` (start-up and import are not
counted), takes ``WARMUP`` requests from a keep-alive HTTP client on loopback, then counting is switched on
(``callgrind_control -i on``), ``REQUESTS`` more requests are served, the server is left ``SETTLE`` seconds
for its last spans to be exported, and the count is dumped (``callgrind_control -d``). Instructions per request
= (that count - the count of as long again with the server idle, dumped next) / ``REQUESTS``; every thread
of the server is counted. Two servers are counted at a time (the
counts do not depend on what runs beside them).

What this leaves out: memory stalls, which instructions do not count. A traced request touches more objects
and more code than an untraced one, and on a saturated server its instructions run slower than the average
(compare the ratio below with the throughput measure's); the count says what the code does, the throughput
what it costs.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .harness import ROOT, Section, Table, free_port, module_main, stop
from .servers import PREDICT_PATH, REQUEST_BODY
from .throughput import span_receiver

#: The servers counted, the baseline first: (kind of benchmarks.servers, what it is).
KINDS = (
    ("kserve", "KServe iris, uninstrumented"),
    ("kserve-instrumented", "metrics only"),
    ("kserve-traced", "every request traced (always_on)"),
    ("kserve-ratio", "parentbased_traceidratio 0.1"),
)
WARMUP, REQUESTS, SETTLE = 300, 400, 6.0


def _requests(port: int, n: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            connection.request("POST", PREDICT_PATH, REQUEST_BODY, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}")
    finally:
        connection.close()


def count(kind: str, receiver: str, warmup: int, requests: int) -> float:
    """Instructions per request of the server ``kind`` (see the module's docstring)."""
    port = free_port()
    env = {**os.environ, "BENCH_HTTP_PORT": str(port), "BENCH_GRPC_PORT": str(free_port()),
           "BENCH_OTLP_ENDPOINT": receiver}
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             "-m", "benchmarks.servers", kind],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    _requests(port, 1)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{kind} did not start under valgrind") from None
                    time.sleep(1)
            _requests(port, warmup)
            time.sleep(SETTLE)  # the warm-up's spans go out before counting starts
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], capture_output=True, check=True)
            _requests(port, requests)
            time.sleep(SETTLE)
            _dump(server.pid)
            time.sleep(SETTLE)  # the same time idle, counted alone: subtracted
            _dump(server.pid)
        finally:
            stop(server, 60)
        served, idle = (_total(f"{out}.{n}") for n in (1, 2))
        return (served - idle) / requests


def _dump(pid: int) -> None:
    """Write the counts so far to the next numbered dump, and zero them."""
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    time.sleep(1)


def _total(dump: str) -> int:
    with open(dump) as lines:
        for line in lines:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in the callgrind dump {dump}")


def run(quick: bool) -> Section:
    section = Section("Instructions per request of whole KServe servers (callgrind)",
                      __doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        section.notes.append("valgrind is not installed (scripts/setup.sh installs it): nothing was counted.")
        return section
    warmup, requests = (100, 100) if quick else (WARMUP, REQUESTS)
    with span_receiver() as receiver, ThreadPoolExecutor(max_workers=2) as pool:
        futures = {kind: pool.submit(count, kind, receiver, warmup, requests) for kind, _ in KINDS}
        counts = {kind: future.result() for kind, future in futures.items()}
    bare = counts[KINDS[0][0]]
    section.tables.append(Table(
        f"instructions per request ({requests:,} requests counted after {warmup:,}, every thread of the server)",
        ["server", "what", "instructions / request", "added to KServe's", "kserve / this"],
        [[kind, what, f"{counts[kind]:,.0f}", "—" if kind == KINDS[0][0] else f"{counts[kind] - bare:+,.0f}",
          f"{bare / counts[kind]:.3f}"] for kind, what in KINDS],
    ))
    return section


if __name__ == "__main__":
    module_main(run)
