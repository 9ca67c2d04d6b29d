"""Timing helpers the benchmark scripts share: one timed call, and several calls taking turns."""

import time

import torch


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so that a time covers it (nothing to wait for on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device="cpu", clock=time.perf_counter):
    """(seconds, result) of ``fn()``: wall seconds, or those of another ``clock`` such as
    ``time.process_time`` (the CPU seconds of this process, all its threads, which other jobs
    on a shared machine do not move)."""
    synchronize(device)
    start = clock()
    out = fn()
    synchronize(device)
    return clock() - start, out


def in_turns(calls: dict, device="cpu", warm_up: bool = False, clock=time.perf_counter) -> dict:
    """{name: (list of seconds, last result)} for {name: (fn, repeats)}, the calls taking turns.

    Taking turns spreads the load of a shared machine over every method alike, so their ratios
    hold even when absolute times drift; ``warm_up`` makes one untimed call of each. ``clock``
    as in :func:`timed`.
    """
    if warm_up:
        for fn, _ in calls.values():
            timed(fn, device, clock)
    results = {name: ([], None) for name in calls}
    for turn in range(max(repeats for _, repeats in calls.values())):
        for name, (fn, repeats) in calls.items():
            if turn < repeats:
                seconds, out = timed(fn, device, clock)
                results[name] = (results[name][0] + [seconds], out)
    return results
