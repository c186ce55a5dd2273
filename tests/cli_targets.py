"""Targets for the ``kserve-otel-run`` tests: one of each kind the command accepts, and some it does not."""

from __future__ import annotations

from fastapi import FastAPI

from examples.sklearn_iris.model import IrisModel
from tests.kserve_e2e.models import EchoModel

#: A list of KServe models (instances).
models = [IrisModel("iris"), EchoModel("echo")]


def make_app() -> FastAPI:
    """A zero-argument factory of a FastAPI app with a path parameter."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    def read_item(item_id: int) -> dict:
        return {"item": item_id}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    return app


async def bare_asgi(scope, receive, send):  # noqa: ANN001 - the ASGI signature
    """An ASGI callable with no framework at all."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


#: Not servable.
answer = 42


def broken_factory() -> None:
    raise RuntimeError("the factory is broken")
