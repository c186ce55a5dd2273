"""Instructions per request of the trivial Starlette app, bare and instrumented, counted by callgrind.

Why: the throughput measure (:mod:`benchmarks.throughput`) is what users see, but on a shared two-core machine
its paired runs still swing by several per cent, and how much of a request the middleware takes depends on
how costly the machine makes the network. Valgrind's callgrind counts the instructions a process executes:
the same count for the same code, whatever else the machine is doing. This measure says, repeatably, what
share of a request's own work the instrumentation adds, and what the optional C extension
(``kserve_otel.recording._speedups``) saves against the pure-Python twin (``KSERVE_OTEL_NO_EXTENSION=1``).

How: the app of :func:`benchmarks.servers.starlette_app` (the one the throughput measure serves; default
settings, the endpoint mounted in the app) is driven in process with no server and no sockets: one event loop
awaits ``app(scope, receive, send)`` for a ``POST /v1/models/iris:predict`` with the load generator's headers
and body, a fresh scope each time, ``send`` a no-op coroutine. Each kind runs twice under
``valgrind --tool=callgrind`` (after the same warm-up), with ``SMALL`` and ``LARGE`` requests; instructions per
request = the difference of the two totals / (``LARGE`` - ``SMALL``), so start-up and import cancel out.

What this leaves out: the server (uvicorn's protocol, the event loop's polling, the kernel's sockets), which
costs the same with or without the middleware and makes the in-process share an upper bound of the share of
a whole request; and memory stalls, which instructions do not count (on a saturated machine the middleware's
instructions cost more than average: see the throughput measure's reference layers).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .harness import ROOT, Section, Table, module_main
from .servers import PREDICT_PATH, REQUEST_BODY, starlette_app

#: (label, servers kind, extra environment): what is counted, the bare app first.
KINDS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("starlette", "starlette", {}),
    ("starlette-passthrough", "starlette-passthrough", {}),
    ("starlette-status-layer", "starlette-status-layer", {}),
    ("starlette-instrumented", "starlette-instrumented", {}),
    ("starlette-instrumented, pure Python", "starlette-instrumented", {"KSERVE_OTEL_NO_EXTENSION": "1"}),
)
WARMUP, SMALL, LARGE = 2000, 1000, 3000
PORT = 18099  # only a label here: nothing is bound


def _scope() -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "server": ("127.0.0.1", PORT), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "POST",
        "root_path": "", "path": PREDICT_PATH, "raw_path": PREDICT_PATH.encode(), "query_string": b"",
        "headers": [(b"host", f"127.0.0.1:{PORT}".encode()), (b"content-type", b"application/json"),
                    (b"content-length", str(len(REQUEST_BODY)).encode())],
    }


def drive(kind: str, requests: int) -> int:
    """Serve ``requests`` requests (after the warm-up) to the app of ``kind`` in process; returns the 200s."""
    app = starlette_app(kind, PORT)
    scope = _scope()
    message = {"type": "http.request", "body": REQUEST_BODY, "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            statuses.append(event["status"])

    async def serve(n: int) -> None:
        for _ in range(n):
            await app(dict(scope), receive, send)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve(WARMUP + requests))
    finally:
        loop.close()
    return statuses.count(200)


def count(kind: str, requests: int, env: dict[str, str]) -> int:
    """Instructions callgrind counted for a whole driver process serving ``requests`` requests."""
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
         "benchmarks.instructions", "--drive", kind, str(requests)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900, check=True,
    )
    answered = re.search(r"answered (\d+)", result.stdout)
    if answered is None or int(answered.group(1)) != WARMUP + requests:
        raise RuntimeError(f"{kind}: the driver did not answer every request:\n{result.stdout}{result.stderr}")
    collected = re.search(r"Collected : (\d+)", result.stderr)
    if collected is None:
        raise RuntimeError(f"no callgrind total for {kind}:\n{result.stderr[-2000:]}")
    return int(collected.group(1))


def per_request(kind: str, env: dict[str, str], small: int = SMALL, large: int = LARGE) -> float:
    return (count(kind, large, env) - count(kind, small, env)) / (large - small)


def run(quick: bool) -> Section:
    section = Section("Instructions per request (callgrind, in process)",
                      __doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
    if shutil.which("valgrind") is None:
        section.notes.append("valgrind is not installed (scripts/setup.sh installs it): nothing was counted.")
        return section
    small, large = (300, 1300) if quick else (SMALL, LARGE)
    # Two cores: two callgrind processes at a time (counts do not depend on what runs beside them).
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {label: pool.submit(per_request, kind, env, small, large) for label, kind, env in KINDS}
        counts = {label: future.result() for label, future in futures.items()}
    bare = counts[KINDS[0][0]]
    rows = []
    for label, _, env in KINDS:
        value = counts[label]
        rows.append([
            label, f"{value:,.0f}", "—" if label == KINDS[0][0] else f"+{value - bare:,.0f}",
            f"{bare / value:.3f}", ", ".join(f"{k}={v}" for k, v in env.items()) or "—",
        ])
    section.tables.append(Table(
        f"instructions per request (difference of {large:,} and {small:,} requests, after {WARMUP:,} warm-up)",
        ["app", "instructions / request", "added to the bare app", "bare / this (a throughput bound)", "environment"],
        rows,
    ))
    section.notes.append(
        "`bare / this` is what throughput would be if the whole request were the in-process work counted here; "
        "the server's own work dilutes it, memory stalls under load sharpen it (compare the throughput measure)."
    )
    return section


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--drive":
        print(f"answered {drive(sys.argv[2], int(sys.argv[3]))}")
    else:
        module_main(run)
