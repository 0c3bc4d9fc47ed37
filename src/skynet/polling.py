"""Waiting for a ZeroMQ socket: optionally spin (yielding the core) before blocking.

On a VM, waking a process blocked in poll() costs tens to hundreds of microseconds, paid twice
per layer per node. Spinning for a short while catches a reply that is about to arrive; each
spin iteration yields the core, so a process that has real work on it keeps running.
"""
from __future__ import annotations

import os
import time


def wait_readable(sock, timeout_s: float, spin_s: float = 0.0) -> bool:
    """True once sock has a message; False after timeout_s (negative timeout: forever)."""
    if spin_s > 0:
        end = time.perf_counter() + spin_s
        while time.perf_counter() < end:
            if sock.poll(0):
                return True
            os.sched_yield()
        if timeout_s >= 0:
            timeout_s = max(0.0, timeout_s - spin_s)
    return bool(sock.poll(-1 if timeout_s < 0 else max(1, int(timeout_s * 1000))))
