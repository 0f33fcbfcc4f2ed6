"""Normal priority (nice 0) for what every request passes through: HAProxy and a replica's serving thread.

Ray starts its workers at nice 15. HAProxy, spawned by the ingress actor, is put back at 0; a replica left
at 15 behind it loses every contest for the CPU with HAProxy and the clients, and its requests wait
(on 2 cores at 128 connections: p99 10-16 ms instead of 5-6, bench/README.md). Both or neither: raising
priority needs CAP_SYS_NICE (root outside a container; the chart's pods drop it), and without it both stay
at 15, equal again. Linux's nice is per thread, so the replica calls this from the thread that serves; the
threads it starts later (a sync handler's pool) inherit it.
"""
from __future__ import annotations

import os


def normal_priority(thread_id: int = 0) -> bool:
    """Nice 0 for ``thread_id`` (0: the calling thread); False where not allowed. Safe in a preexec_fn."""
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, 0)
    except OSError:
        return False
    return True
