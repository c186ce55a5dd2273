"""The benchmarks measure what they claim: every call they time is recorded (benchmarks/checks.py).

No timing is asserted here. Each check runs in a fresh interpreter, because the benchmarks install
OpenTelemetry providers and call ``kserve_otel.configure()``, which are process-global.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_python


def _check(call: str, timeout: float = 120) -> None:
    result = run_python(f"from benchmarks import checks; checks.{call}", timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_step_benchmark_records_every_call() -> None:
    _check("verify_step_benchmark(calls=300)")


def test_scrape_benchmark_exposes_every_observation() -> None:
    _check("verify_scrape_benchmark(models=5, observations=3)")


def test_memory_benchmark_records_every_call() -> None:
    _check("verify_memory_benchmark(calls=2000)")


@pytest.mark.e2e
def test_throughput_benchmark_gets_an_answer_to_every_request() -> None:
    _check("verify_throughput_benchmark(requests=200)")


def test_instruction_count_driver_answers_every_request() -> None:
    # what benchmarks.instructions counts under callgrind: every request of every kind answered with a 200
    result = run_python(
        """
        from benchmarks.instructions import KINDS, WARMUP, drive
        for _, kind, _ in KINDS:
            assert drive(kind, 20) == WARMUP + 20, kind
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrk_output_is_parsed() -> None:
    result = run_python(
        """
        from benchmarks.throughput import parse_wrk
        out = '''Running 1s test @ http://127.0.0.1:1/v1/models/iris:predict
          1 threads and 8 connections
          Latency Distribution
             50%  420.00us
             75%  500.00us
             90%  600.00us
             99%    1.54ms
          18401 requests in 1.00s, 3.20MB read
          Non-2xx or 3xx responses: 3
          Socket errors: connect 0, read 1, write 0, timeout 2
        Requests/sec:  18401.00
        '''
        r = parse_wrk(out)
        assert (r.requests, r.errors, r.seconds) == (18401, 6, 1.0), r
        assert abs(r.p50_ms - 0.42) < 1e-9 and abs(r.p99_ms - 1.54) < 1e-9, r
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_quick_run_writes_results(tmp_path) -> None:
    output = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "step,memory", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = output.read_text()
    assert "## Machine" in text and "Per-step overhead" in text and "Memory after" in text
