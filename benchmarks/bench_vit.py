"""Cost of every registry measurement on the vit, against one SGD step, in one run.

    python benchmarks/bench_vit.py [--num-data 512] [--batch 16] [--device cuda] [--json out.json]

The default vit (width 64, depth 2, 4 heads, patch 2: 69,066 parameters) on ``--num-data``
digits images with mse, measured at its initialisation through :func:`utils.api.measure`, one
measurement at a time (each from the same state, on the random batches of step 0). A vit is
neither a layer chain nor a Linear network, so its products take the generic exact routes.
Each row: the measurement's time (median over ``--repeats``; CPU or wall seconds, below), its Hessian-vector products
(or per-batch quadratic forms), Monte Carlo samples, and the time in SGD steps of batch
``--batch`` (forward, backward and update of a copy of the model; the median of 20, timed
taking turns with the measurement). On the CPU the times are the process's CPU seconds (all its
threads), which other jobs on a shared machine do not move, as they move wall time tenfold
over a measurement; on a GPU, wall seconds.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _timing import in_turns  # noqa: E402

from utils.api import MEASUREMENTS, measure  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.devices import resolve_device  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.models import build_model, count_parameters  # noqa: E402

SGD_STEPS = 20


def sgd_step(model, X, Y, batch, lr):
    """A call that takes one SGD step of a copy of ``model`` on a random batch of ``batch``
    points: the cost of a step, while the model the measurements read stays as it is."""
    stepped = copy.deepcopy(model)
    optimizer = torch.optim.SGD(stepped.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, X.shape[0], (batch,), generator=generator).to(X.device)
        optimizer.zero_grad()
        mse_loss(stepped(X[idx]), Y[idx]).backward()
        optimizer.step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-data", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these measurements")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    data = load_dataset("digits", root=None, loss="mse", num_data=args.num_data, device=device)
    X, Y = data.X_train, data.Y_train
    model = build_model("vit", data.input_shape, data.output_dim, width=64, depth=2, heads=4, patch=2).to(device)
    step = statistics.median(in_turns({"sgd": (sgd_step(model, X, Y, args.batch, args.lr), SGD_STEPS)}, device,
                                      warm_up=True, clock=clock)["sgd"][0])
    print(f"vit on {args.num_data} digits images ({count_parameters(model):,} parameters), {device}, "
          f"{torch.get_num_threads()} threads, {'CPU' if device.type == 'cpu' else 'wall'} seconds; SGD step (b = {args.batch}): {step * 1e3:.1f} ms")
    print(f"{'measurement':<26}{'seconds':>10}{'products':>10}{'samples':>9}{'x SGD step':>12}")
    rows = []
    # The first Hessian product picks its mode and builds its functions; no measurement pays for that.
    measure(model, "mse", (X, Y), ["lambdamax"], batch_size=args.batch, lr=args.lr, eig_tol=0.5)
    # The momentum and Adam measurements read an optimiser that has stepped; the others do not.
    optimizers = {"momentum_sharpness": torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                  "preconditioned_sharpness": torch.optim.Adam(model.parameters(), lr=1e-3)}
    for name in args.only or MEASUREMENTS:
        optimizer = optimizers.get(name, torch.optim.SGD(model.parameters(), lr=args.lr))
        if name in optimizers:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            optimizer.zero_grad()
            mse_loss(model(X[:args.batch]), Y[:args.batch]).backward()
            optimizer.step()
            model.load_state_dict(state)
        timings = in_turns({
            "sgd": (sgd_step(model, X, Y, args.batch, args.lr), SGD_STEPS),
            name: (partial(measure, model, "mse", (X, Y), [name], batch_size=args.batch, optimizer=optimizer,
                           batch=(X[:args.batch], Y[:args.batch])), args.repeats)}, device, clock=clock)
        step, (times, values) = statistics.median(timings["sgd"][0]), timings[name]
        seconds = statistics.median(times)
        estimates = [v for v in values.values() if hasattr(v, "hvps")]
        products = sum(e.hvps for e in estimates)
        samples = max(e.n for e in estimates)
        rows.append({"measurement": name, "seconds": seconds, "products": products, "samples": samples,
                     "sgd_step_seconds": step, "sgd_steps": seconds / step})
        print(f"{name:<26}{seconds:>10.2f}{products:>10}{samples:>9}{seconds / step:>12.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
