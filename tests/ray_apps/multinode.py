"""Ray Serve applications for the 2-node tests (``tests/test_ray_multinode.py``).

``ranker``: a ``Gateway`` ingress with a deliberately slow ``preprocess`` step (the report must name it) and
a ``postprocess`` step, calling a ``Scorer`` deployment with one replica on each node, whose ``__call__`` is
its ``predict`` step by kserve-otel's ``ray_steps`` default. All steps share the model name ``ranker``.

``unconfigured``: a deployment whose steps are ``@instrument_step`` methods, deployed by a driver that calls
``kserve_otel.configure()`` but never instruments Ray Serve (``tests/ray_apps/unconfigured_driver.py``).
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from kserve_otel import instrument_step

MODEL = "ranker"
#: The Gateway's preprocess takes this long: far longer than any other step.
SLOW_PREPROCESS_S = 0.03


@serve.deployment(num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0})
class Scorer:
    """One replica per node; ``__call__`` is the predict step (no method of the class is decorated)."""

    def __init__(self) -> None:
        self.name = MODEL

    def __call__(self, features: list[float]) -> float:
        return float(sum(features))


#: Ray gives the head node this resource: the ingress stays up when another node stops.
ON_THE_HEAD = {"node:__internal_head__": 0.001}


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": ON_THE_HEAD})
class Gateway:
    """The HTTP ingress, on the head: preprocess (slow), the scorer on whichever node, postprocess."""

    def __init__(self, scorer: DeploymentHandle) -> None:
        self.name = MODEL
        self.scorer = scorer

    @instrument_step("preprocess")
    def preprocess(self, body: dict[str, Any]) -> list[float]:
        time.sleep(SLOW_PREPROCESS_S)
        return [float(x) for x in body["features"]]

    @instrument_step("postprocess")
    def postprocess(self, score: float) -> dict[str, float]:
        return {"score": score}

    async def __call__(self, request: Request) -> dict[str, float]:
        features = self.preprocess(await request.json())
        return self.postprocess(await self.scorer.remote(features))


ranker = Gateway.bind(Scorer.bind())


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Unconfigured:
    """What a new user writes: decorated steps, nothing else."""

    @instrument_step("preprocess", model_name="unconfigured")
    def preprocess(self, body: dict[str, Any]) -> int:
        return int(body["x"])

    @instrument_step("predict", model_name="unconfigured")
    def predict(self, x: int) -> int:
        return x + 1

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"y": self.predict(self.preprocess(await request.json()))}


unconfigured = Unconfigured.bind()
