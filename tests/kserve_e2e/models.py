"""Models the KServe end-to-end tests serve, besides the iris example: plain ``kserve.Model`` subclasses with
no telemetry code, each exercising one thing (a second model, errors, streaming); the transformer is the example's."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import kserve

#: Seconds between the chunks of the streaming model, and how many it sends.
CHUNK_DELAY = 0.05
CHUNKS = 4


class EchoModel(kserve.Model):
    """A second model, with async handlers: answers its instances and the pid of the worker that served them."""

    def __init__(self, name: str = "echo") -> None:
        super().__init__(name)
        self.ready = True

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return payload

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return {"predictions": payload.get("instances", []), "pid": os.getpid()}


class FailingModel(kserve.Model):
    """Its predict raises, as a model with a bug does."""

    def __init__(self, name: str = "failing") -> None:
        super().__init__(name)
        self.ready = True

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        raise ValueError("this model cannot predict")


class StallingModel(kserve.Model):
    """A synchronous predict that holds its worker (GIL and event loop) for ``instances[0]`` seconds, as one
    slow model call in a sync handler does."""

    def __init__(self, name: str = "stall") -> None:
        super().__init__(name)
        self.ready = True

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        until = time.monotonic() + float(payload["instances"][0])
        while time.monotonic() < until:  # busy, in Python: nothing else of this worker runs meanwhile
            pass
        return {"predictions": [os.getpid()]}


class StreamingModel(kserve.Model):
    """A streaming predict: returns an async generator of CHUNKS chunks, CHUNK_DELAY seconds apart."""

    def __init__(self, name: str = "stream") -> None:
        super().__init__(name)
        self.ready = True

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            for index in range(CHUNKS):
                await asyncio.sleep(CHUNK_DELAY)
                yield f"chunk {index}\n".encode()

        return chunks()
