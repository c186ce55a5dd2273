"""Models the ``kserve-otel report`` tests serve: one with a deliberately slow step, one quick one with a step
of its own. Plain ``kserve.Model`` subclasses; the KServe instrumentation times their handlers."""

from __future__ import annotations

import time
from typing import Any

import kserve

from kserve_otel import instrument_step

#: Seconds the slow model's preprocess sleeps: inside KServe's (0.05, 0.075] bucket, far above the rest.
SLOW_PREPROCESS_SECONDS = 0.06


class SlowPreprocessModel(kserve.Model):
    """Its preprocess is the bottleneck (a blocking sleep, as slow feature fetching would be)."""

    def __init__(self, name: str = "slow") -> None:
        super().__init__(name)
        self.ready = True

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        time.sleep(SLOW_PREPROCESS_SECONDS)
        return payload

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return {"predictions": payload.get("instances", [])}


class QuickModel(kserve.Model):
    """Fast everywhere; its preprocess runs a step of its own, ``tokenize`` (request_tokenize_seconds)."""

    def __init__(self, name: str = "quick") -> None:
        super().__init__(name)
        self.ready = True

    @instrument_step("tokenize")
    def tokenize(self, instances: list[Any]) -> list[str]:
        return [str(instance) for instance in instances]

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return {"instances": self.tokenize(payload.get("instances", []))}

    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return {"predictions": payload["instances"]}
