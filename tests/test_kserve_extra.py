"""The ``kserve`` extra alone: a stock KServe server with ``KSERVE_OTEL_ENABLED=true`` is fully instrumented
without what only the ``asgi`` extra installs (``opentelemetry-instrumentation-asgi`` and
``opentelemetry-util-http``): the server runs with those made unimportable, as on a machine without them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import KServeProcess, histogram_count, scrape

pytestmark = pytest.mark.e2e

#: Installed first thing at interpreter start (after site's .pth files): the asgi extra's modules are missing.
BLOCKER = '''
import sys
from importlib.abc import MetaPathFinder

MISSING = ("opentelemetry.util.http", "opentelemetry.instrumentation.asgi")

class Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MISSING or name.startswith(tuple(m + "." for m in MISSING)):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
for name in list(sys.modules):
    if name in MISSING or name.startswith(tuple(m + "." for m in MISSING)):
        del sys.modules[name]
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[KServeProcess]:
    blocker = tmp_path_factory.mktemp("without-asgi-extra")
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    server = KServeProcess("iris", bare=True, env={"KSERVE_OTEL_ENABLED": "true", "PYTHONPATH": str(blocker),
                                                   "OTEL_TRACES_EXPORTER": "none"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_the_kserve_extra_alone_instruments_a_stock_server(server):
    check = httpx.post(f"{server.url}/v1/models/iris:predict", json={"instances": [[6.8, 2.8, 4.8, 1.4]]})
    assert check.status_code == 200
    text = scrape(f"{server.url}/metrics")
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 1
    assert histogram_count(text, "http_server_request_duration_seconds") >= 1
    log = server.log()
    assert "failed" not in log and "ModuleNotFoundError" not in log, log
