"""The pod-annotations file is read by the start-up hook in every Python process of the environment: whatever
sits at its path (a FIFO, ``/dev/zero``, a directory, a huge or malformed file) must not hang or break a Python
start, and a problem is reported once per process tree, by the process that acts on it (issue 13, item 6)."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

from kserve_otel.config.annotations import MAX_ANNOTATIONS_BYTES, read_annotations
from kserve_otel.config.problems import REPORTED_VARIABLE

ENABLED = 'serving.kserve.io/enable-prometheus-scraping="true"\n'


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    """Each test starts as a new process tree: nothing reported yet (and nothing leaks into other tests)."""
    monkeypatch.delenv(REPORTED_VARIABLE, raising=False)


def _fifo(tmp: Path) -> str:
    path = tmp / "annotations"
    os.mkfifo(path)
    return str(path)


def _directory(tmp: Path) -> str:
    path = tmp / "annotations"  # the volume mounted at the file's path: a common mistake
    path.mkdir()
    (path / "annotations").write_text(ENABLED)
    return str(path)


def _oversized(tmp: Path) -> str:
    path = tmp / "annotations"
    line = 'example.com/padding="' + "x" * 1000 + '"\n'
    path.write_text(ENABLED + line * (MAX_ANNOTATIONS_BYTES // len(line) + 1))
    return str(path)


def _not_utf8(tmp: Path) -> str:
    path = tmp / "annotations"
    path.write_bytes(ENABLED.encode() + b'prometheus.kserve.io/path="/m\xff\xfe"\n')
    return str(path)


def _bad_value(tmp: Path) -> str:
    path = tmp / "annotations"
    path.write_text('serving.kserve.io/enable-prometheus-scraping="maybe"\n')
    return str(path)


CASES: dict[str, Callable[[Path], str]] = {
    "fifo": _fifo,
    "dev_zero": lambda tmp: "/dev/zero",
    "directory": _directory,
    "oversized": _oversized,
    "not_utf8": _not_utf8,
    "bad_value": _bad_value,
}


def _limit_memory() -> None:
    # Before the fix /dev/zero was read until MemoryError: keep that from eating the machine.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def _start(args: list[str], annotations: str, enabled: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KSERVE_OTEL_", REPORTED_VARIABLE))}
    env["KSERVE_OTEL_ANNOTATIONS_FILE"] = annotations
    if enabled:
        env["KSERVE_OTEL_ENABLED"] = "true"
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory)


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"the Python start did not finish in {timeout} s") from None
    return process.returncode, stdout, stderr


def _reports(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kserve-otel:")]


# ----------------------------------------------------------------------------------------- every Python start


@pytest.mark.parametrize("enabled", [False, True], ids=["annotation_decides", "variable_set"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_python_start_finishes_and_stays_quiet_whatever_is_at_the_annotations_path(tmp_path, case, enabled):
    """A program that never imports a model server (pip, a probe, a script) starts as if there were no file."""
    code, stdout, stderr = _finish(_start(["-c", "print('started')"], CASES[case](tmp_path), enabled), timeout=30)
    assert (code, stdout) == (0, "started\n"), stderr
    assert _reports(stderr) == [], stderr


# ----------------------------------------------------------------------------------------- the process acting on it

PROGRAM = textwrap.dedent("""
    import multiprocessing
    import kserve  # the process that would act on the annotations reports their problem

    def child():
        import kserve  # a KServe worker: spawned, inheriting the environment

    if __name__ == "__main__":
        worker = multiprocessing.get_context("spawn").Process(target=child)
        worker.start()
        worker.join(120)
        print("exit", worker.exitcode)
""")

MESSAGES = {
    "fifo": "(a FIFO, not a regular file)",
    "dev_zero": "(a character device, not a regular file)",
    "directory": "(a directory, not a regular file)",
    "oversized": f"more than the {MAX_ANNOTATIONS_BYTES} read",
    "not_utf8": "(not UTF-8 text",
    "bad_value": "setting enabled: 'maybe' from pod annotation serving.kserve.io/enable-prometheus-scraping",
}


#: (case, KSERVE_OTEL_ENABLED set): each case once, in either mode (every import of kserve costs seconds).
TREE_CASES = [("fifo", False), ("directory", False), ("not_utf8", False), ("bad_value", False),
              ("dev_zero", True), ("oversized", True)]


def test_a_model_server_process_tree_reports_each_problem_once(tmp_path):
    """The process importing kserve reports the problem in one line; its spawned worker, which resolves the same
    file again, does not. With ``KSERVE_OTEL_ENABLED=true`` the file is read (and its problem reported) when
    kserve is instrumented, not at every Python start."""
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    started = {}
    for case, enabled in TREE_CASES:  # all at once: they take seconds each
        directory = tmp_path / case
        directory.mkdir()
        started[case, enabled] = _start([str(program)], CASES[case](directory), enabled)
    for (case, enabled), process in started.items():
        code, stdout, stderr = _finish(process, timeout=240)
        assert (code, stdout) == (0, "exit 0\n"), stderr
        reports = _reports(stderr)
        assert len(reports) == 1, f"{case}: {reports}"
        assert MESSAGES[case] in reports[0], reports[0]
        assert reports[0].endswith("auto-instrumentation by pod annotation is off") != enabled, reports[0]


# ----------------------------------------------------------------------------------------- the reader itself


# /dev/zero only in a child process with a memory limit (above): read in this process, a regression would
# fill the machine's memory before failing.
@pytest.mark.parametrize("case", [case for case in CASES if case != "dev_zero"])
def test_read_annotations_refuses_what_is_not_a_small_regular_utf8_file(tmp_path, case, caplog):
    path = CASES[case](tmp_path)
    with caplog.at_level(logging.ERROR):
        annotations = read_annotations(path)
        again = read_annotations(path)
    if case == "bad_value":
        assert annotations == again == {"serving.kserve.io/enable-prometheus-scraping": "maybe"}  # settings judge it
        return
    assert annotations == again == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and MESSAGES[case] in lines[0] and path in lines[0], lines


def test_a_symbolic_link_is_followed_as_the_downward_api_publishes_the_file(tmp_path):
    data = tmp_path / "..2026_12_03_10_00_00.000000001"
    data.mkdir()
    (data / "annotations").write_text(ENABLED)
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "annotations").symlink_to("..data/annotations")
    assert read_annotations(tmp_path / "annotations") == {"serving.kserve.io/enable-prometheus-scraping": "true"}
