"""Distributed plumbing of the student's run: Fabric's strategy with a collective timeout, ending the ranks a
failing rank 0 launched, and a checksum that tells whether two ranks hold the same weights."""

from __future__ import annotations

import inspect
import subprocess
import time
from datetime import timedelta

import torch
from lightning_fabric import Fabric


def fabric_strategy(name: str, timeout_s: float):
    """Fabric's registered strategy ``name`` built with a collective timeout of ``timeout_s`` seconds where it has a
    process group (ddp*, fsdp*, deepspeed*); any other name ("auto", "dp", ...) is returned for Fabric to resolve."""
    from lightning_fabric.strategies import STRATEGY_REGISTRY

    entry = STRATEGY_REGISTRY[name] if name in STRATEGY_REGISTRY else None  # (.get() would build the strategy)
    if entry is None or "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return name
    return entry["strategy"](timeout=timedelta(seconds=timeout_s), **entry["init_params"])


def end_launched_ranks(fabric: Fabric, grace_s: float = 0.0) -> list[tuple[int, int]]:
    """End the ranks this process launched (rank 0 of a node, under Fabric's subprocess launcher): wait up to
    ``grace_s`` seconds for them to exit, then kill the rest. Returns (local rank, exit code) of those that failed.

    A rank that fails leaves the others waiting in their next collective: gloo notices the closed connection, NCCL
    waits for the timeout. Fabric's launcher kills the node's ranks when a launched rank dies, but leaves them running
    when the launching rank fails.
    """
    procs = getattr(fabric.strategy.launcher, "procs", None) or []
    deadline = time.monotonic() + grace_s
    failed = []
    for rank, proc in enumerate(procs, start=1):
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: a rank blocked inside a collective runs no Python signal handler
            proc.wait()
        else:
            if code != 0:
                failed.append((rank, code))
    return failed


def module_checksum(module: torch.nn.Module) -> torch.Tensor:
    """The float64 sum of each parameter and buffer of ``module``, [T]: equal on two copies of the same weights."""
    with torch.no_grad():
        return torch.stack([t.double().sum() for t in (*module.parameters(), *module.buffers())])
