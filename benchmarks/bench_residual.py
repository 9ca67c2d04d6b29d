"""Per-batch measurements of residual and BatchNorm networks, and the closed forms, against the plain path, in one run.

    python benchmarks/bench_residual.py [--threads 1] [--json residual.json]

ResNet-20 with BatchNorm (``resnet_bn``, train- and eval-mode BatchNorm) and without it
(``resnet``) on n = 48 synthetic 3 x 8 x 8 images, b = 16, mse: Batch Sharpness, its ratio form
and Gauss–Newton Batch Sharpness to their 0.5 % target (or the 1000-batch cap), by the default
route and by the plain one (``exact=True``, ``--exact-measurements``: one double backward, or one
Gauss–Newton operator, per batch). Both draw the same batches from the same generator and stop
on the same rule, so their values agree to round-off and only the time differs; they run in
turns, so the ratios hold when the load drifts, and both under the allocator setting that the
per-batch routes make (:func:`utils.resources.keep_freed_memory`, set here before the first
turn). Speed-ups are of the medians over ``--repeats`` turns (in brackets: of the fastest turns).

On 3 x 32 x 32 inputs, b = 8: the cost per batch of each route in gradient-equivalents (the
time of one plain forward and backward pass on the same b rows), fastest of
``--per-batch-repeats`` turns of each. The floor is 2: the exact
per-batch term needs g_B (one gradient) and one second-order pass, whose tangents repeat every
product of the forward and backward passes once (a second gradient's arithmetic).

The ``cnn`` on n = 48 of 3 x 12 x 12, cross-entropy: GNI at b = 16 and E_B|g_B|^2, sampled
(``closed_form=False``, the path before the closed forms) and by default (exact from per-sample
gradients where that is cheaper).
"""

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _timing import in_turns, timed  # noqa: E402

from utils import measures  # noqa: E402
from utils.batch_forms import batch_route, gauss_newton_route, same_batch_route  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.estimators import draw_batches, measurement_generator  # noqa: E402
from utils.hvp import model_mode, trainable_params  # noqa: E402
from utils.losses import ce_loss, mse_loss  # noqa: E402
from utils.models import build_model  # noqa: E402
from utils.resources import keep_freed_memory  # noqa: E402

LIMITS = {"rel_se": 0.005, "max_samples": 1000}
MEASUREMENTS = {"Batch Sharpness": measures.batch_sharpness, "ratio form": measures.batch_sharpness_ratio,
                "Gauss–Newton Batch Sharpness": measures.gn_batch_sharpness}
CASES = {"resnet_bn, train-mode BatchNorm": ("resnet_bn", True), "resnet_bn, eval-mode BatchNorm": ("resnet_bn", False),
         "resnet": ("resnet", True)}


def problem(name, n, side, loss):
    data = load_dataset("synthetic", root=None, loss=loss, num_data=n, input_shape=(3, side, side), num_classes=10,
                        device="cpu")
    torch.manual_seed(0)
    return build_model(name, (3, side, side), 10), data.X_train, data.Y_train


def estimate_rows(args) -> list[dict]:
    rows = []
    for case, (name, train_mode) in CASES.items():
        model, X, Y = problem(name, args.n, 8, "mse")
        route = batch_route(model, mse_loss, X, Y, batch_size=args.batch)
        for label, measure in MEASUREMENTS.items():
            def run(exact, measure=measure):
                return measure(model, mse_loss, X, Y, args.batch, generator=measurement_generator(0, args.batch),
                               train_mode=train_mode, exact=exact, **LIMITS)
            measure(model, mse_loss, X, Y, args.batch, generator=measurement_generator(1, 1), min_samples=2,
                    max_samples=2, train_mode=train_mode)  # one-off costs of a first call, untimed
            results = in_turns({"ours": (lambda: run(False), args.repeats), "plain": (lambda: run(True), args.repeats)})
            (ours_s, ours), (plain_s, plain) = results["ours"], results["plain"]
            rows.append({"case": case, "measurement": label, "route": route, "ours_seconds": ours_s,
                         "plain_seconds": plain_s, "speedup": statistics.median(plain_s) / statistics.median(ours_s),
                         "fastest_speedup": min(plain_s) / min(ours_s),
                         "value": ours.value, "se": ours.se, "n": ours.n, "capped": ours.capped,
                         "plain_value": plain.value, "plain_se": plain.se, "plain_n": plain.n})
            print(row_text(rows[-1]), flush=True)
    return rows


def row_text(r: dict) -> str:
    return (f"| {r['case']} | {r['measurement']} | {r['route']} | {statistics.median(r['ours_seconds']):.2f} s | "
            f"{statistics.median(r['plain_seconds']):.2f} s | {r['speedup']:.1f}x ({r['fastest_speedup']:.1f}x) | {r['value']:.4f} ± {r['se']:.4f}, "
            f"{r['n']} batches{' (cap)' if r['capped'] else ''} | {r['plain_value']:.4f} ± {r['plain_se']:.4f} |")


def plain_gradient_seconds(model, X, Y, rows, train_mode) -> float:
    """Median time of one forward and backward pass on each batch of ``rows``."""
    params = trainable_params(model)
    times = []
    with model_mode(model, train_mode):
        for idx in rows:
            seconds, _ = timed(lambda idx=idx: torch.autograd.grad(mse_loss(model(X[idx]), Y[idx]), params))
            times.append(seconds)
    return statistics.median(times)


def per_batch_rows(args) -> list[dict]:
    rows = []
    b = args.large_batch
    for case, (name, train_mode) in CASES.items():
        model, X, Y = problem(name, args.n, 32, "mse")
        idx = draw_batches(args.n, b, args.large_batches, measurement_generator(2, b))
        routes = {"same-batch, " + batch_route(model, mse_loss, X, Y, batch_size=b):
                      same_batch_route(model, mse_loss, X, Y, b, train_mode=train_mode),
                  "same-batch, plain": same_batch_route(model, mse_loss, X, Y, b, train_mode=train_mode, exact=True),
                  "Gauss–Newton": gauss_newton_route(model, mse_loss, X, Y, b, train_mode=train_mode)}
        gradient = plain_gradient_seconds(model, X, Y, idx[:2], train_mode)  # warm-up
        for route in routes.values():
            route.forms(idx[:2])
        per_batch = {label: [] for label in routes}
        gradients = []
        for _ in range(args.per_batch_repeats):
            gradients.append(plain_gradient_seconds(model, X, Y, idx, train_mode))
            for label, route in routes.items():
                seconds, _ = timed(lambda route=route: [route.forms(idx[i:i + route.per_call])
                                                        for i in range(0, len(idx), route.per_call)])
                per_batch[label].append(seconds / len(idx))
        gradient = min(gradients)
        for label, seconds in per_batch.items():
            cost = min(seconds) / gradient
            rows.append({"case": case, "route": label, "batch_seconds": min(seconds),
                         "gradient_seconds": gradient, "gradients": cost, "over_floor": cost / 2})
            r = rows[-1]
            print(f"| {case} | {label} | {r['batch_seconds'] * 1e3:.1f} ms | {gradient * 1e3:.1f} ms | "
                  f"{cost:.2f} | {cost / 2:.2f} |", flush=True)
    return rows


def closed_form_rows(args) -> list[dict]:
    model, X, Y = problem("cnn", args.n, 12, "ce")
    rows = []
    calls = {
        "GNI": lambda closed: measures.gni(model, ce_loss, X, Y, args.batch, closed_form=closed,
                                           generator=measurement_generator(0, 3), max_samples=1000),
        "E_B|g_B|^2": lambda closed: measures.gradient_norms(model, ce_loss, X, Y, args.batch,
                                                             closed_form=closed, generator=measurement_generator(0, 4),
                                                             max_samples=1000)[0]}
    for label, call in calls.items():
        results = in_turns({"ours": (lambda: call(True), args.repeats), "sampled": (lambda: call(False), args.repeats)})
        (ours_s, ours), (sampled_s, sampled) = results["ours"], results["sampled"]
        rows.append({"measurement": label, "ours_seconds": ours_s, "sampled_seconds": sampled_s,
                     "speedup": statistics.median(sampled_s) / statistics.median(ours_s), "value": ours.value,
                     "exact": ours.exact, "hvps": ours.hvps, "sampled_value": sampled.value,
                     "sampled_se": sampled.se, "sampled_n": sampled.n, "sampled_hvps": sampled.hvps})
        r = rows[-1]
        print(f"| cnn, {label} | {statistics.median(ours_s):.2f} s ({'exact' if ours.exact else 'sampled'}, "
              f"{ours.hvps} products) | {statistics.median(sampled_s):.2f} s ({sampled.n} batches, "
              f"{sampled.hvps} products) | {r['speedup']:.1f}x | {ours.value:.4f} | "
              f"{sampled.value:.4f} ± {sampled.se:.4f} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--batch", type=int, default=16, help="batch size of the 8 x 8 cases")
    p.add_argument("--large-batch", type=int, default=8, help="batch size of the 32 x 32 cases")
    p.add_argument("--large-batches", type=int, default=32, help="batches timed per route on 32 x 32")
    p.add_argument("--repeats", type=int, default=1, help="turns of each estimate")
    p.add_argument("--per-batch-repeats", type=int, default=3, help="turns of each route on 32 x 32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=("estimates", "per_batch", "closed_forms"),
                   default=["estimates", "per_batch", "closed_forms"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, freed memory kept for reuse: {kept}")
    out = {"settings": vars(args)}
    if "estimates" in args.only:
        print("| model, n = 48 of 3x8x8, b = 16 | measurement | route | ours | plain | speed-up | ours: value ± SE "
              "| plain: value ± SE |\n|---|---|---|---|---|---|---|---|")
        out["estimates"] = estimate_rows(args)
    if "per_batch" in args.only:
        print(f"\n| model, 3x32x32, b = {args.large_batch} | route | per batch | one gradient | gradient-equivalents "
              "| / floor 2 |\n|---|---|---|---|---|---|")
        out["per_batch"] = per_batch_rows(args)
    if "closed_forms" in args.only:
        print("\n| cnn, n = 48 of 3x12x12, b = 16, ce | ours | sampled | speed-up | ours: value | sampled: value ± SE |"
              "\n|---|---|---|---|---|---|")
        out["closed_forms"] = closed_form_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
