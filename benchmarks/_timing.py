"""Timing helpers the benchmark scripts share: one timed call, and several calls taking turns."""

import time

import torch


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so that a time covers it (nothing to wait for on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    """(wall seconds, result) of ``fn()``."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def in_turns(calls: dict, device="cpu", warm_up: bool = False) -> dict:
    """{name: (list of seconds, last result)} for {name: (fn, repeats)}, the calls taking turns.

    Taking turns spreads the load of a shared machine over every method alike, so their ratios
    hold even when absolute times drift; ``warm_up`` makes one untimed call of each.
    """
    if warm_up:
        for fn, _ in calls.values():
            timed(fn, device)
    results = {name: ([], None) for name in calls}
    for turn in range(max(repeats for _, repeats in calls.values())):
        for name, (fn, repeats) in calls.items():
            if turn < repeats:
                seconds, out = timed(fn, device)
                results[name] = (results[name][0] + [seconds], out)
    return results
