"""Ray clusters for the tests: each its own, on loopback addresses only, whatever ran on the machine before.

Why a module of its own: by default Ray's node address is the machine's interface address (Ray rewrites
``127.0.0.1`` into it), and a bare ``ray.init()`` joins whatever cluster ``/tmp/ray/ray_current_cluster`` names,
so a stale entry left by any earlier ``ray start`` made a test fail or hang. Every cluster started here has

* node addresses of its own on loopback (``127.0.0.2`` for the head, ``127.0.0.3`` for a second node: Ray keeps
  those as they are), and every client of the test targets them;
* a temporary directory of its own (``--temp-dir``; a second node reads it from the head): its sessions, logs,
  address file and Prometheus service-discovery file are the test's, never ``/tmp/ray``'s;
* explicit free ports for everything Ray would otherwise take from fixed defaults (dashboard, agents, the
  head's autoscaler and dashboard metrics), so that two test runs on one machine do not collide;
* token authentication off (``RAY_AUTH_MODE=disabled``: with it on, a second node on one machine is refused).

Ray 2.60 still binds some of its own servers (GCS, raylet, the metrics export port of a node whose address is
not 127.0.0.1) to every interface; nothing in the tests connects to anything but 127.0.0.0/8.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from conftest import ROOT, free_port

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))


def loopback_environment(metrics_interval_ms: int = 2000) -> dict[str, str]:
    """What every node and driver of a test cluster needs in its environment (see the module docstring), with
    Ray's metrics export every ``metrics_interval_ms`` (Ray's default is 10 s) so that tests wait less."""
    return {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Serve's proxy (on the head only) would send every request to replicas on its own node.
        "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
        "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0",
        "RAY_metrics_report_interval_ms": str(metrics_interval_ms),
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }


def private_temp_dir() -> str:
    """A fresh directory for one cluster's sessions; short, because Ray puts Unix sockets under it."""
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def session_ids(pid: int) -> list[int]:
    """Every process of session ``pid`` (a process started with ``start_new_session=True`` leads one): Ray's
    workers put themselves in process groups of their own, but stay in the session."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pid:  # field 6 of stat: the session id
            found.append(int(entry))
    return found


def kill_session(pid: int) -> None:
    """SIGKILL what is left of the session that process ``pid`` started."""
    for member in session_ids(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayNode:
    """One ``ray start --block`` node on loopback address ``ip``, in a session of its own: the head when
    ``head_address`` is None (with the dashboard on ``ip`` when ``dashboard``), else a node joining it.
    ``metrics_url`` is its Ray metrics endpoint; :meth:`stop` SIGTERMs its process group (Ray drains the node)
    and kills what is left of its session."""

    def __init__(self, ip: str, temp_dir: str, env: dict[str, str], *, head_address: str | None = None,
                 num_cpus: int = 1, dashboard: bool = False, log_dir: str | None = None) -> None:
        self.ip = ip
        self.metrics_port = free_port()
        self.metrics_url = f"http://{ip}:{self.metrics_port}/metrics"
        command = [
            RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
            f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--object-store-memory={200 * 2**20}",
        ]
        full_env = {**os.environ, **env}
        if head_address is None:
            self.gcs_port = free_port()
            self.address = f"{ip}:{self.gcs_port}"
            command += ["--head", f"--port={self.gcs_port}", f"--temp-dir={temp_dir}",
                        f"--ray-client-server-port={free_port()}", f"--include-dashboard={str(dashboard).lower()}"]
            if dashboard:
                self.dashboard_url = f"http://{ip}:{free_port()}"
                command += [f"--dashboard-host={ip}", f"--dashboard-port={self.dashboard_url.rsplit(':', 1)[1]}"]
            # The head's own metrics servers, which default to fixed ports (44227, 44217).
            full_env.update(DASHBOARD_METRIC_PORT=str(free_port()), AUTOSCALER_METRIC_PORT=str(free_port()))
        else:
            self.address = head_address
            command.append(f"--address={head_address}")
        self.log_path = os.path.join(log_dir or temp_dir, f"ray-start-{ip}.log")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def log(self) -> str:
        return Path(self.log_path).read_text()

    def metrics(self) -> str:
        """One scrape of the node's Ray metrics endpoint."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start on {self.ip} exited with {self.process.returncode}:\n{self.log()}")
        try:
            self.metrics()
            return True
        except OSError:
            return False

    def terminate(self) -> None:
        """SIGTERM the node's process group: Ray drains the node and stops it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        """:meth:`terminate`, wait up to ``grace`` seconds, then kill whatever is left of the node's session."""
        self.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        kill_session(self.process.pid)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def stopped(self) -> bool:
        """Whether every process of the node is gone."""
        return self.process.poll() is not None and not session_ids(self.process.pid)


def stop_nodes(nodes: list[RayNode], grace: float = 10.0) -> None:
    """Stop ``nodes`` together (every one SIGTERMed first, so that their drains overlap)."""
    for node in nodes:
        node.terminate()
    for node in nodes:
        node.stop(grace)


def remove_temp_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

