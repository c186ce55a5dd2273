"""Ray Serve applications for the tests, besides the example: batching, a KServe model, OTLP metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.requests import Request

from examples.sklearn_iris.model import IrisModel

#: How long the batch handler waits for more requests, and the most it takes at once.
BATCH_WAIT_S = 0.05
MAX_BATCH = 8


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Doubler:
    """Batches requests: ``__call__`` (the default ``ray_steps`` map) is the per-request predict step, and
    ``double`` the batched method."""

    def __init__(self) -> None:
        self.name = "doubler"

    async def __call__(self, request: Request) -> int:
        return await self.double(int(await request.json()))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def double(self, numbers: list[int]) -> list[int]:
        assert self.name == "doubler", "Serve hands the method its own object, not a batch of them"
        await asyncio.sleep(0.01)
        return [2 * n for n in numbers]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RayIris(IrisModel):
    """The KServe iris model as a Ray Serve deployment (as ``kserve.ray.RayModel`` serves it): its handlers
    run in the replica, called through KServe's ``Model.__call__``."""

    def __init__(self) -> None:
        super().__init__("iris-on-ray")
        self.load()


@serve.deployment(ray_actor_options={"num_cpus": 0})
async def echo(request: Request) -> Any:
    """A function deployment: it is its own predict step."""
    return await request.json()
