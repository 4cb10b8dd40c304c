"""A Ray cluster of this machine alone, and every socket of a run on it listening on loopback.

A plain ``fr_train`` (no ``RAY_ADDRESS``: the quickstart, a laptop, the tests) starts its own Ray
cluster. Nothing on other machines has any business talking to it, yet by default Ray 2.60 and
torch.distributed listen on every interface (measured with psutil, 2026-12-03: 11 listeners on
0.0.0.0, :: and the LAN address). Three levers close that, each the owner's documented one:

- **Ray.** With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray treats the node as single-machine: the
  node IP stays the loopback address it is given (``services.get_node_ip_address``; otherwise a
  loopback ``_node_ip_address`` is resolved back to the LAN address) and its gRPC servers bind it.
  Ray reads the variable when ``ray._private.ray_constants`` is imported, and every process Ray
  starts (GCS, raylet, dashboard, workers) inherits the driver's environment: so it is set in
  ``os.environ`` before ``ray.init``, and on the constant too when Ray was imported earlier. It also
  keeps other nodes from joining, which a local cluster does not want.
- **torch.distributed.** Its TCPStore server binds every interface whatever address it is given
  (only a pre-bound socket, ``master_listen_fd``, changes that). Ray Train creates the process
  group with a TCPStore; on one machine the rendezvous needs no socket at all, so a local run's
  process group meets in a ``FileStore`` instead (:class:`LocalTorchConfig`). Why not a pre-bound
  TCPStore: it would mean creating the store in the workers with a socket handed between
  processes; a file in a private directory is simpler and has nothing to listen on.
- **gloo / NCCL** bind the interface named by ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``:
  ``lo`` (set in the workers' runtime env, cluster/launch.py).

A run that joins a cluster (``RAY_ADDRESS``, ``ray job submit``) is untouched: multi-node clusters
keep Ray's and torch's defaults, and README's trusted-network and token advice.

What a local cluster prints: Ray's driver logger (``ray.init(logging_level=...)``) at
``run.ray_log_level``. Token authentication is Ray 2.60's default for a new local cluster and
fr_train keeps it; Ray warns at every start that it enabled it, which for a cluster fr_train made
for itself is no news: that one logger is raised to ERROR unless Ray's lines were asked for
(``RAY_AUTH_MODE`` itself cannot be set here: a driver that imported Ray caches the mode, and its
client then lacks the token the cluster requires). Ray Train's ``PreemptionWatcher`` is not started (``RAY_TRAIN_ENABLE_PREEMPTION_
WATCHER=0``): it watches for drained nodes, and the one node of a local cluster cannot be drained
without the driver on it going too; it also logged an error-level line at every worker group start
(a restartable actor given actor handles as constructor arguments, Ray's own code). A cluster run
keeps it: there a drain notice is a spot reclaim, answered with a checkpoint.

The State API (which Ray Train's placement-group cleaner polls from inside the cluster) finds its
server by ``RAY_API_SERVER_ADDRESS`` first, else by scanning this machine's processes for Ray
instances: with two local runs on one machine that scan raises ``Found multiple active Ray
instances`` every few seconds into each run's console. The dashboard's port is therefore chosen
here and exported, so each cluster's processes ask their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
# Inherited by every process of a local cluster (see the module docstring); a value the user set wins.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# The interface gloo and NCCL bind in a local run's workers.
LOOPBACK_SOCKET_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start_local_ray(log_level: str) -> str:
    """``ray.init`` a new cluster of this machine only, every Ray listener on 127.0.0.1; Ray's
    driver lines at ``log_level``. Returns the dashboard's URL."""
    import logging

    import ray

    os.environ[SINGLE_MACHINE_RAY] = "0"
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    if getattr(logging, log_level) >= logging.WARNING:
        logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported before the variable was set: it holds the default
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    port = _free_loopback_port()
    os.environ[API_SERVER_ADDRESS] = f"http://{LOOPBACK}:{port}"
    # A local cluster keeps its dashboard: Ray Train's placement-group cleaner queries the State API
    # it serves, and logs a failure every few seconds without it.
    ray.init(log_to_driver=True, _node_ip_address=LOOPBACK, include_dashboard=True, dashboard_host=LOOPBACK,
             dashboard_port=port, logging_level=getattr(logging, log_level))
    return f"http://{LOOPBACK}:{port}"



@dataclass
class LocalTorchConfig(TorchConfig):
    """Ray Train's TorchConfig for a cluster of one machine: the process group meets in a FileStore
    (no socket) instead of a TCPStore (which listens on every interface)."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _FileRendezvous


def _join_group(backend: str, rank: int, world_size: int, init_method: str, timeout_s: int) -> None:
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    # The variables torchrun sets (fr_train reads LOCAL_RANK; DeepSpeed reads RANK and WORLD_SIZE).
    os.environ.update(LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
                      NODE_RANK=str(context.get_node_rank()), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _FileRendezvous(Backend):
    """Runs in Ray Train's controller, on this machine (a local cluster has no other): a fresh
    private directory per worker group, so a restarted group never meets a dead one's store file."""

    def __init__(self) -> None:
        self._dir: str | None = None

    def on_start(self, worker_group, backend_config: LocalTorchConfig) -> None:  # type: ignore[no-untyped-def]
        import ray

        self._dir = tempfile.mkdtemp(prefix="fr_train-rendezvous-")  # mode 0700: this user only
        url = "file://" + os.path.join(self._dir, "store")
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join_group, backend_config.backend or "gloo", rank, n, url,
                                                   backend_config.timeout_s) for rank in range(n)])

    def on_shutdown(self, worker_group, backend_config: LocalTorchConfig) -> None:  # type: ignore[no-untyped-def]
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get(worker_group.execute_async(_leave_group), timeout=30)
        except GetTimeoutError:
            pass  # a worker stuck in a collective: Ray kills the group next, and the store with it
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
