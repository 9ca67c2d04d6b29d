"""Cost of one training step of each noise baseline against an SGD step, and peak memory.

    python benchmarks/bench_noise.py [--num-data 2048] [--steps 11] [--cpu]

Trains the MLP 3072 -> 512 -> 512 -> 10 (1,841,162 parameters) on n CIFAR-shaped synthetic
samples with ``training.py`` in a fresh process per mode and reads the step times from the
``wall_time`` column of results.txt (no measurements; the full loss and a checkpoint only at
step 0). A step's time is the median over steps 1.. of consecutive ``wall_time`` differences;
for diag and iso the statistics are refreshed every 5 steps here, and ``refresh`` is the extra
time of a refresh step. ``per step at refresh 30`` adds a thirtieth of it (the default
``--noise-refresh``). Peak memory is the process's maximum resident set size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFRESH = 5
MODES = {
    "SGD (b = 64)": [],
    "gd-noise sgd": ["--gd-noise", "sgd"],
    "gd-noise diag": ["--gd-noise", "diag"],
    "gd-noise iso": ["--gd-noise", "iso"],
    "gd-noise const": ["--gd-noise", "const", "--noise-mag", "0.01"],
    "sde, h = lr / 2": ["--sde", "--sde-h", "0.005"],
}


def worker(argv: list[str]) -> None:
    """Run training.py in this process and print step times and peak RSS as one JSON line."""
    sys.path.insert(0, ROOT)
    import training
    from utils.results import read_results

    with tempfile.TemporaryDirectory() as folder:
        run_dir = os.path.join(folder, "run")
        code = training.main([*argv, "--run-dir", run_dir, "--quiet"])
        if code != 0:
            raise SystemExit(code)
        times = read_results(os.path.join(run_dir, "results.txt"))["wall_time"].to_numpy()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"durations": np.diff(times).tolist(), "peak_bytes": peak}))  # durations[i]: step i + 1


def step_costs(durations: list[float], refreshes: bool) -> tuple[float, float]:
    """(median step time, extra time of a refresh step) from the durations of steps 1, 2, ..."""
    durations = np.asarray(durations)
    at_refresh = [i for i in range(len(durations)) if refreshes and (i + 1) % REFRESH == 0]
    step = float(np.median(np.delete(durations, at_refresh)))
    return step, float(np.median(durations[at_refresh]) - step) if at_refresh else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")
    args = parser.parse_args()
    common = ["--dataset", "synthetic", "--input-shape", "3,32,32", "--num-data", str(args.num_data), "--model", "mlp",
              "--width", "512", "--depth", "2", "--batch", "64", "--lr", "0.01", "--steps", str(args.steps),
              "--full-loss-every", "1000000", "--checkpoint-every", "1000000", "--noise-refresh", str(REFRESH)]
    if args.cpu:
        common.append("--cpu")
    import torch

    print(f"MLP 3072-512-512-10 on n = {args.num_data} synthetic CIFAR-shaped samples, batch 64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() and not args.cpu else 'cpu'}")
    rows = {}
    for name, flags in MODES.items():
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *common, *flags],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        step, refresh = step_costs(record["durations"], refreshes=name in ("gd-noise diag", "gd-noise iso"))
        rows[name] = {"step": step, "refresh": refresh, "peak_bytes": record["peak_bytes"]}
    sgd = rows["SGD (b = 64)"]["step"]
    print("| mode | step (s) | x SGD step | refresh (s) | per step at refresh 30 (x SGD) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        amortised = (r["step"] + r["refresh"] / 30) / sgd
        refresh = f"{r['refresh']:.2f}" if r["refresh"] else "-"
        print(f"| {name} | {r['step']:.4f} | {r['step'] / sgd:.1f} | {refresh} | {amortised:.1f} | {r['peak_bytes'] / 1e9:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
