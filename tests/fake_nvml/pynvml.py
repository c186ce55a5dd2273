"""A fake ``pynvml`` (nvidia-ml-py) for machines without a GPU: two devices with fixed memory and utilisation.

Put this directory first on ``sys.path`` (or ``PYTHONPATH`` for a server process) and ``import pynvml``
finds it instead of the real package. ``FAKE_NVML_FAIL=1`` in the environment makes ``nvmlInit`` fail the
way the real one does without a driver. Only the calls kserve-otel makes are here, with the real ones'
signatures and return types (``nvmlDeviceGetUUID`` returns ``str``, as nvidia-ml-py 12+ does).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

GIB = 2**30
#: index -> (uuid, memory total, memory used, utilisation in percent)
DEVICES = {
    0: ("GPU-00000000-fake-4000-8000-000000000000", 16 * GIB, 4 * GIB, 37),
    1: ("GPU-11111111-fake-4000-8000-111111111111", 80 * GIB, 60 * GIB, 62),
}

_initialised = 0
#: How many times nvmlInit / nvmlShutdown were called (tests read them).
calls = {"nvmlInit": 0, "nvmlShutdown": 0}


class NVMLError(Exception):
    """As pynvml.NVMLError: the base of every NVML failure."""


class NVMLError_Uninitialized(NVMLError):  # noqa: N801 - pynvml's name
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801
    pass


def nvmlInit() -> None:  # noqa: N802 - pynvml's names
    global _initialised
    calls["nvmlInit"] += 1
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
    _initialised += 1


def nvmlShutdown() -> None:  # noqa: N802
    global _initialised
    calls["nvmlShutdown"] += 1
    _check()
    _initialised -= 1


def nvmlDeviceGetCount() -> int:  # noqa: N802
    _check()
    return len(DEVICES)


def nvmlDeviceGetHandleByIndex(index: int) -> SimpleNamespace:  # noqa: N802
    _check()
    return SimpleNamespace(index=index)


def nvmlDeviceGetUUID(handle: SimpleNamespace) -> str:  # noqa: N802
    _check()
    return DEVICES[handle.index][0]


def nvmlDeviceGetMemoryInfo(handle: SimpleNamespace, version: int | None = None) -> SimpleNamespace:  # noqa: N802
    _check()
    _, total, used, _ = DEVICES[handle.index]
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: SimpleNamespace) -> SimpleNamespace:  # noqa: N802
    _check()
    return SimpleNamespace(gpu=DEVICES[handle.index][3], memory=20)


def _check() -> None:
    if _initialised <= 0:
        raise NVMLError_Uninitialized("Uninitialized")
