"""Several hosts: one process per host, joined with `jax.distributed.initialize`.

Call `initialize(...)` first thing, before any other JAX call (it must run before the
backend starts). Where the settings come from, first match wins:

1. arguments / command-line flags: `--coordinator HOST:PORT --num-processes N --process-id I`
2. environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
   (the same names JAX itself reads)
3. a cluster JAX detects by itself (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes
   JobSets): `jax.distributed.initialize()` with no arguments, when one of their
   environment markers is present
4. otherwise: a single process, nothing to do.

On CPU the processes exchange collectives over gloo. Afterwards `jax.devices()` lists every
device of every host, `jax.local_devices()` this host's; a mesh over `jax.devices()` spans
the hosts. Every process runs the same program on the same inputs; only process 0 prints
(`print0`) or serves (`is_main`).

Recipes (the same command on every host):

    # TPU pod slice (e.g. v5e-32 = 8 hosts x 4 chips): the TPU runtime tells JAX the rest
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
        "python -m bluelm_jax generate --model /gcs-fuse/bluelm-7b-chat-32k --mesh data=1,tensor=32 --prompt 'Hi'"

    # GPU hosts (2 hosts x 8 GPUs), host 0 at 10.0.0.1
    python -m bluelm_jax generate --model DIR --mesh data=2,tensor=8 \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id $RANK --prompt 'Hi'
    # under SLURM: srun --ntasks-per-node=1 python -m bluelm_jax generate ... (no flags needed)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# Environment markers of the clusters `jax.distributed.initialize()` auto-detects.
CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                   "JOBSET_NAME")

_initialized = False


class DistributedError(ValueError):
    """Inconsistent multi-process settings."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes, --process-id (default: from the environment)."""
    group = parser.add_argument_group("several hosts (one process per host)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0 (default: $JAX_COORDINATOR_ADDRESS or cluster auto-detection)")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None, help="this process's id (default: $JAX_PROCESS_ID)")


def settings(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
             process_id: Optional[int] = None, environ=None) -> Optional[dict]:
    """The arguments for jax.distributed.initialize, {} to auto-detect, or None for one process."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise DistributedError("--num-processes/--process-id need --coordinator HOST:PORT")
        if any(env.get(k) for k in CLUSTER_MARKERS):
            return {}
        return None
    if num_processes is None or process_id is None:
        raise DistributedError("--coordinator needs --num-processes and --process-id (or a cluster that sets them)")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, cpu_collectives: str = "gloo") -> bool:
    """Joins the processes (see the module docstring); returns whether this is a multi-process run.

    Call before any other JAX call. Safe to call twice.
    """
    global _initialized
    kwargs = settings(coordinator, num_processes, process_id)
    if kwargs is None:
        return False
    import jax

    if not _initialized:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(**kwargs)
        _initialized = True
    return jax.process_count() > 1


def initialize_from_args(args: argparse.Namespace) -> bool:
    """initialize() with the flags of `add_arguments`."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None))


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main() -> bool:
    """Whether this is process 0 (the one that prints, writes files and serves)."""
    return process_index() == 0


def print0(*args, **kwargs) -> None:
    """print() on process 0 only."""
    if is_main():
        kwargs.setdefault("file", sys.stdout)
        print(*args, **kwargs)
