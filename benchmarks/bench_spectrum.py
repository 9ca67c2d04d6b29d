"""Cost of the measurements of the spectrum beyond its top (utils/spectrum.py) on the paper MLP,
against one full-batch gradient, in one run; and the accuracy of the density at those settings
against the exact spectrum of a small network.

    python benchmarks/bench_spectrum.py [--device cuda] [--density-probes 8] [--density-steps 64] [--json out.json]
    python benchmarks/bench_spectrum.py --only accuracy

The MLP 3072 -> 512 -> 512 -> 10 (1,841,162 parameters) on n = 2048 synthetic CIFAR-shaped
samples (mse), as in bench_measurements.py. Each row gives the wall time, the Hessian-vector
products, and the time as a multiple of one full-batch gradient and of one full-batch product,
all from this run on this machine: lambda_max (Lanczos, the reference), lambda_min with
lambda_max known and alone, the gradient overlap (k = 1) with the eigenvectors of lambda_max
reused and solved itself, the per-layer lambda_max and traces, and the spectral density, whose
products are checked to be exactly p * m. ``--layer-probes`` caps the layer trace probes (the
default stopping rule on a slow machine can take hundreds); ``--repeats`` keeps the fastest of
several timings of each row, the least disturbed by other work on the machine.

The accuracy part trains the MLP 64 -> 32 -> 32 -> 10 (3,466 parameters, float64, mse) by GD with
step size eta on 256 digits images, takes its dense Hessian by ``torch.func`` (independently of
the products the measurements use) and, for ``--accuracy-seeds`` seeds of the probes, reports the
Wasserstein-1 distance between the SLQ measure and the exact eigenvalue measure (also relative
to the spectrum's width), tr(H) from the nodes against the exact trace in units of its SE and
against Hutchinson on the same probes, the fraction of eigenvalues above 1/eta, and lambda_min.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch.func import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _timing import in_turns  # noqa: E402

from utils import measures, spectrum  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.estimators import MAX_SAMPLES, measurement_generator  # noqa: E402
from utils.hvp import HessianOperator, flat_grad  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.models import build_model  # noqa: E402

REPEATS = 1  # set from --repeats: each time is the fastest of that many runs, the least disturbed by other work


def fastest(fn, device):
    """(seconds of the fastest of ``REPEATS`` calls, last result)."""
    seconds, out = in_turns({"": (fn, REPEATS)}, device)[""]
    return min(seconds), out


def dense_hessian(model, loss, X, Y) -> torch.Tensor:
    """The full-batch Hessian of the flat trainable parameters, by reverse over reverse."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(vector):
        params, offset = {}, 0
        for name, p in named:
            params[name] = vector[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return loss(functional_call(model, params, (X,)), Y)

    return torch.func.jacrev(torch.func.grad(loss_of))(flat)


def accuracy(args) -> dict:
    data = load_dataset("digits", root=None, loss="mse", num_data=256)
    X, Y = data.X_train.double(), data.Y_train.double()
    model = build_model("mlp", tuple(X.shape[1:]), 10, width=32).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.accuracy_lr)
    for _ in range(args.accuracy_train_steps):
        optimizer.zero_grad()
        mse_loss(model(X), Y).backward()
        optimizer.step()
    H = dense_hessian(model, mse_loss, X, Y)
    values = torch.linalg.eigvalsh(H)
    P, width, threshold = values.numel(), (values[-1] - values[0]).item(), 1 / args.accuracy_lr
    exact_mass = (values > threshold).double().mean().item()
    rows = []
    for seed in range(args.accuracy_seeds):
        density = spectrum.spectral_density(model, mse_loss, X, Y, probes=args.density_probes,
                                            steps=args.density_steps, generator=torch.Generator().manual_seed(seed))
        assert density.hvps == args.density_probes * min(args.density_steps, P)
        generator = torch.Generator().manual_seed(seed)  # the probes spectral_density drew
        Z = (2 * torch.randint(0, 2, (P, args.density_probes), generator=generator) - 1).double()
        hutchinson = torch.einsum("pi,pq,qi->i", Z, H, Z).mean().item()
        trace = density.trace()
        rows.append({"seed": seed,
                     "wasserstein_1": spectrum.wasserstein_1(density.nodes, density.weights, values, torch.ones(P)),
                     "trace": trace.value, "trace_se": trace.se,
                     "trace_z": (trace.value - values.sum().item()) / trace.se,
                     "trace_minus_hutchinson": trace.value - hutchinson,
                     "mass_above": density.mass_above(threshold)})
    _, low = spectrum.lambda_min(model, mse_loss, X, Y, tol=1e-10, generator=torch.Generator().manual_seed(0))
    w1 = [r["wasserstein_1"] for r in rows]
    z = [r["trace_z"] for r in rows]
    print(f"\nAccuracy: MLP 64-32-32-10 ({P:,} parameters, float64), 256 digits images, mse, "
          f"{args.accuracy_train_steps} GD steps at eta = {args.accuracy_lr}; SLQ p = {args.density_probes}, "
          f"m = {args.density_steps}, {len(rows)} seeds of the probes")
    print(f"exact spectrum: lambda_min {values[0].item():.6g}, lambda_max {values[-1].item():.6g}, "
          f"width {width:.4g}, tr(H) {values.sum().item():.6g}, fraction above 1/eta {exact_mass:.4g}")
    print(f"Wasserstein-1 to the exact measure: mean {np.mean(w1):.4g}, max {max(w1):.4g} "
          f"({np.mean(w1) / width:.2e} and {max(w1) / width:.2e} of the width)")
    relative_se = np.mean([r["trace_se"] / r["trace"] for r in rows])
    print(f"tr(H) from the nodes - exact, in SEs: {', '.join(f'{v:+.2f}' for v in z)} "
          f"(within 2 SE: {sum(abs(v) <= 2 for v in z)} of {len(z)}); mean relative SE {relative_se:.3g}")
    print(f"tr(H) from the nodes - Hutchinson on the same probes: at most "
          f"{max(abs(r['trace_minus_hutchinson']) for r in rows):.2e} (tr(H) {values.sum().item():.4g})")
    masses = ", ".join(f"{r['mass_above']:.4g}" for r in rows)
    print(f"fraction above 1/eta: SLQ {masses}; exact {exact_mass:.4g}")
    print(f"lambda_min (tol 1e-10): {low.value:.10g}, exact {values[0].item():.10g}, "
          f"{low.hvps} products")
    return {"parameters": P, "lambda_min": values[0].item(), "lambda_max": values[-1].item(), "width": width,
            "trace": values.sum().item(), "mass_above": exact_mass, "lambda_min_solved": low.value, "seeds": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-data", type=int, default=2048)
    p.add_argument("--density-probes", type=int, default=spectrum.DENSITY_PROBES)
    p.add_argument("--density-steps", type=int, default=spectrum.DENSITY_STEPS)
    p.add_argument("--layer-probes", type=int, default=None, help="cap on the layer trace probes (default: the rule's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="time each measurement this many times, keep the fastest")
    p.add_argument("--only", nargs="+", choices=("cost", "accuracy"), default=("cost", "accuracy"))
    p.add_argument("--accuracy-lr", type=float, default=0.4, help="GD step size of the small network (2/eta = 5)")
    p.add_argument("--accuracy-train-steps", type=int, default=500)
    p.add_argument("--accuracy-seeds", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    global REPEATS
    REPEATS = args.repeats
    report = {"threads": torch.get_num_threads()}
    if "cost" in args.only:
        report.update(cost(args))
    if "accuracy" in args.only:
        report["accuracy"] = accuracy(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def cost(args) -> dict:
    device = args.device
    data = load_dataset("synthetic", root=None, loss="mse", num_data=args.num_data, input_shape=(3, 32, 32),
                        num_classes=10, device=device)
    model = build_model("mlp", (3, 32, 32), 10).to(device)
    X, Y = data.X_train, data.Y_train
    loss = mse_loss

    def generator():
        return measurement_generator(0, 0, device=device)

    flat_grad(model, loss, X, Y)  # warm-up
    gradient_seconds, _ = fastest(lambda: flat_grad(model, loss, X, Y), device)
    op = HessianOperator(model, loss, X, Y)
    v = torch.randn(op.dim, 1, generator=torch.Generator().manual_seed(0)).to(device)
    op.matvec(v)  # warm-up (builds the graph)
    product_seconds, _ = fastest(lambda: HessianOperator(model, loss, X, Y).matvec(v), device)
    rows = []

    def row(name, seconds, hvps, value):
        rows.append({"measurement": name, "seconds": seconds, "hvps": hvps, "x gradient": seconds / gradient_seconds,
                     "x product": seconds / product_seconds, "value": value})

    row("full-batch gradient", gradient_seconds, 0, None)
    row("one full-batch product H v (its graph built)", product_seconds, 1, None)
    seconds, (eig, top) = fastest(lambda: measures.lambda_max(model, loss, X, Y, generator=generator()), device)
    row("lambda_max (Lanczos)", seconds, top.hvps, top.value)
    seconds, (_, low) = fastest(lambda: spectrum.lambda_min(model, loss, X, Y, lambda_max=top.value,
                                                          generator=generator()), device)
    row("lambda_min, lambda_max known", seconds, low.hvps, low.value)
    seconds, (_, alone) = fastest(lambda: spectrum.lambda_min(model, loss, X, Y, generator=generator()), device)
    row("lambda_min alone", seconds, alone.hvps, alone.value)
    for name, vectors in (("gradient overlap k=1, vectors reused", eig.vectors), ("gradient overlap k=1, solved", None)):
        seconds, (full, batch) = fastest(lambda vectors=vectors: spectrum.gradient_overlap(
            model, loss, X, Y, args.batch, k=1, vectors=vectors, generator=generator()), device)
        row(name, seconds, full.hvps, f"full {full.value:.4g}, batch {batch.value:.4g} ({batch.n} batches)")
    cap = args.layer_probes or MAX_SAMPLES
    seconds, layers = fastest(lambda: spectrum.layer_sharpness(model, loss, X, Y, generator=generator(),
                                                             min_samples=min(10, cap), max_samples=cap), device)
    row(f"layer sharpness ({len(layers.names)} blocks, {layers.probes} probes)", seconds, layers.hvps,
        f"max block lambda_max {max(layers.lambda_max):.4g}")
    seconds, density = fastest(lambda: spectrum.spectral_density(model, loss, X, Y, generator=generator(),
                                                               probes=args.density_probes,
                                                               steps=args.density_steps), device)
    expected = args.density_probes * args.density_steps
    assert density.hvps == expected, f"SLQ took {density.hvps} products, not p * m = {expected}"
    trace = density.trace()
    row(f"spectral density (p = {args.density_probes}, m = {args.density_steps})", seconds, density.hvps,
        f"tr(H) {trace.value:.4g} ± {trace.se:.2g}")
    print(f"MLP 3072-512-512-10 ({op.dim:,} parameters), n = {args.num_data}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'measurement':48} {'seconds':>9} {'HVPs':>6} {'x gradient':>11} {'x product':>10}  value")
    for r in rows:
        print(f"{r['measurement']:48} {r['seconds']:9.2f} {r['hvps']:6d} {r['x gradient']:11.1f} {r['x product']:10.2f}  "
              f"{'' if r['value'] is None else r['value']}")
    print(f"SLQ products: {density.hvps} = p * m = {args.density_probes} * {args.density_steps}")
    return {"device": device, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
