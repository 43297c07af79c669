"""Time and peak memory of one callable, in a process of its own.

Peak memory on the CPU is the growth of the process's peak resident set size over its
size just before the measured calls, after one warm-up call: on Linux the peak is reset
then (``/proc/self/clear_refs``), so what a first call costs once (the code pages of the
kernels it is the first to use, thread pools, caches) is not counted, only what each call
holds at its peak. On CUDA it is ``torch.cuda.max_memory_allocated`` over the allocation
before the measured calls.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """The resident set's high-water mark (since the last :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current resident set (Linux); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(step: Callable[[], None], device: str, min_runs: int = 3, budget_s: float = 8.0):
    """``(median seconds, peak MB)`` of ``step()`` (one warm-up run excluded from both)."""
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        # garbage of earlier work (reference cycles: a Trainer, its data), freed by a
        # collection in the middle of the runs, would lower the RSS under what they hold
        gc.collect()
        base = current_rss_mb()
        step()
        if reset_peak_rss():
            base = current_rss_mb()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = peak_rss_mb() - base
    return statistics.median(times), max(peak, 0.0)


def cap_memory(gigabytes: float, poll_s: float = 0.02) -> None:
    """Exit (code 3) as soon as this process's resident memory passes ``gigabytes``.

    A watchdog thread rather than ``RLIMIT_AS``: an address-space limit slows torch's
    allocator down by an order of magnitude and would distort the timings.
    """

    def watch() -> None:
        while True:
            if current_rss_mb() > gigabytes * 1024:
                print(f"out of memory: more than {gigabytes:g} GB", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(poll_s)

    threading.Thread(target=watch, daemon=True).start()


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""Environment for a CPU memory measurement: glibc maps every block of 128 KiB or more on
its own and unmaps it when freed. By default glibc raises that threshold after each such
free (up to 32 MiB), so later tensors come from its heap, whose freed pages it may keep: the
peak resident set then depends on the order of earlier frees and moves by megabytes from
run to run. With the threshold fixed it follows the tensors alive at the peak."""


def run_isolated(
    module: str, args: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict | None:
    """Run ``python -m module args`` (with ``env`` added to the environment) and parse the
    JSON line it prints; None on failure."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0][:120]}
    return json.loads(lines[-1])


MAX_RUNS = 201
"""Runs of each step that :func:`interleaved_medians` stops at, within a quarter of its budget:
steps of a millisecond or less need that many for a steady median."""


def interleaved_medians(
    steps: dict[str, Callable[[], None]], min_runs: int = 5, budget_s: float = 20.0
) -> dict[str, float]:
    """Median seconds of each step, run in turn (a, b, a, b, ...) after one warm-up each.

    Alternating puts the machine's noise on every step alike, so their ratio is
    steadier than that of separate runs on a shared machine.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < min_runs or (
        time.perf_counter() - start < budget_s / 4 and len(times[next(iter(times))]) < MAX_RUNS
    ):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and min(len(t) for t in times.values()) >= 2:
            break
    return {name: statistics.median(t) for name, t in times.items()}
