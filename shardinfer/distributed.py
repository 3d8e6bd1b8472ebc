"""Many processes, one mesh: joining them with jax.distributed.

Process 0 (the master) schedules; every process (the workers, and process 0 itself) executes
the same plan on its own devices (engine/broadcast.py sends the plans), and XLA's collectives
do the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger("shardinfer")

ENV_COORDINATOR = "SHARDINFER_COORDINATOR"
ENV_NUM_PROCESSES = "SHARDINFER_NUM_PROCESSES"
ENV_PROCESS_ID = "SHARDINFER_PROCESS_ID"
# Variables by which jax.distributed finds a cluster by itself (SLURM, Open MPI, TPU VMs).
# Kubernetes is left to the SHARDINFER_* variables (scripts/k8s-indexed-job.yaml): JAX's
# own detection there needs the kubernetes client and API access.
_CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")

# Serving wants faults found in seconds, not JAX's defaults (100 s heartbeat, 300 s shutdown).
DEFAULT_TIMEOUTS = {"initialization": 120, "heartbeat": 10, "shutdown": 30}


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeouts: Mapping[str, int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Joins this process to the others, before anything starts JAX's backend.

    From the arguments, else SHARDINFER_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, else what
    jax.distributed detects by itself (SLURM, Open MPI, TPU VMs).
    A single process is a no-op. Returns whether processes were joined."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    # An explicit process count (SHARDINFER_NUM_PROCESSES=1: one job per task of a SLURM
    # array) overrides what the cluster's variables would say.
    detect = (coordinator is None and num_processes is None
              and any(v in env for v in _CLUSTER_VARIABLES))  # fmt: skip
    if not detect and (num_processes or 1) == 1:
        return False
    if not detect and (coordinator is None or process_id is None):
        raise ValueError(
            f"{num_processes} processes need a coordinator address and this process's id "
            f"({ENV_COORDINATOR}, {ENV_PROCESS_ID})"
        )
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        # jax.distributed.initialize after the backend started gives only the local devices
        # (jax issue 12258): refuse, rather than run on a fraction of the mesh.
        raise RuntimeError(
            "shardinfer.distributed.initialize() must run before anything uses JAX devices "
            "(jax.devices(), a mesh, a model); call it first thing"
        )
    limits = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=limits["initialization"],
        heartbeat_timeout_seconds=limits["heartbeat"],
        shutdown_timeout_seconds=limits["shutdown"],
    )
    log.info("process %d of %d joined (%d local devices)", jax.process_index(),
             jax.process_count(), jax.local_device_count())  # fmt: skip
    return True
