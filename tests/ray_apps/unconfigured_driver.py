"""A Ray Serve driver as a new user writes it: ``kserve_otel.configure()`` and ``serve.run``, and no
``RayServeInstrumentor().instrument()``. Deploys ``tests.ray_apps.multinode:unconfigured`` on a running cluster
and exits (the application stays).

    python -m tests.ray_apps.unconfigured_driver <head address> <driver node address> <route prefix>
"""

from __future__ import annotations

import sys

import ray
from ray import serve

import kserve_otel
from tests.ray_apps.multinode import unconfigured


def main() -> None:
    address, node_ip, route_prefix = sys.argv[1:4]
    kserve_otel.configure()
    ray.init(address=address, _node_ip_address=node_ip)
    serve.run(unconfigured, name="unconfigured", route_prefix=route_prefix)
    print("deployed", flush=True)


if __name__ == "__main__":
    main()
