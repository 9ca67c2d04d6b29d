"""Batches needed for the same standard error: independent batches against partition draws, in one run.

    python benchmarks/bench_partition.py [--threads 1] [--json partition.json]

Where the data hold few batches (G = floor(n / b) <= 8), the same-batch measurements take one
Monte Carlo sample as the mean over the G disjoint batches of one random permutation
(``partition_draws=True``; ``config.json``'s ``resolved.partition_draws`` lists the measurements
drawn this way) instead of drawing every batch independently. Both are unbiased; they differ in the variance per
batch computed. For each model and measurement, both ways spend the same fixed number of batches
(``--budget``) and the variance per batch is SE^2 x batches; its ratio is how many times fewer
batches the partitions need for the same SE. Then both run to the default 0.5 % target (cap 1000
batches): ``_n``, the batches computed (``_hvps``: vmapped routes compute ahead of the rule), SE and
seconds, before and after, each measurement's first-call costs paid untimed beforehand.

Models: ResNet-20 with train-mode BatchNorm (``resnet_bn``) on n = 48 synthetic 3 x 8 x 8 images,
b = 16 (G = 3), mse; the paper's MLP shape on n = 64 digits, b = 16 (G = 4).
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import measures  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.estimators import measurement_generator  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.models import build_model  # noqa: E402

MEASUREMENTS = {"Batch Sharpness": measures.batch_sharpness, "ratio form": measures.batch_sharpness_ratio,
                "Gauss–Newton Batch Sharpness": measures.gn_batch_sharpness}


def resnet_bn():
    data = load_dataset("synthetic", root=None, loss="mse", num_data=48, input_shape=(3, 8, 8), num_classes=10,
                        device="cpu")
    torch.manual_seed(0)
    return build_model("resnet_bn", (3, 8, 8), 10), data.X_train, data.Y_train, 16


def mlp():
    data = load_dataset("digits", root=None, loss="mse", num_data=64, device="cpu")
    torch.manual_seed(0)
    return build_model("mlp", data.input_shape, data.output_dim), data.X_train, data.Y_train, 16


CASES = {"resnet_bn (train), n = 48 of 3x8x8, b = 16": resnet_bn, "mlp, n = 64 digits, b = 16": mlp}


def run(measure, model, X, Y, b, seed, partition, **limits):
    start = time.perf_counter()
    est = measure(model, mse_loss, X, Y, b, generator=measurement_generator(seed, b), partition_draws=partition,
                  **limits)
    return est, time.perf_counter() - start


def cell(r: dict) -> str:
    return (f"{r['value']:.4f} ± {r['se']:.4f}, {r['n']}{' (cap)' if r['capped'] else ''} ({r['computed']} computed), "
            f"{r['seconds']:.2f} s")


def rows(args) -> list[dict]:
    out = []
    for case, build in CASES.items():
        model, X, Y, b = build()
        groups = measures.partition_size(X.shape[0], b, True)
        for label, measure in MEASUREMENTS.items():
            run(measure, model, X, Y, b, 1, True, min_samples=2 * groups, max_samples=2 * groups)  # first-call costs
            fixed = {"min_samples": args.budget, "max_samples": args.budget, "rel_se": 0.0}
            variances = {}
            for partition in (False, True):
                per_seed = [run(measure, model, X, Y, b, seed, partition, **fixed)[0] for seed in range(args.seeds)]
                variances[partition] = sum(e.se ** 2 * e.n for e in per_seed) / len(per_seed)
            target = {partition: run(measure, model, X, Y, b, 100, partition, rel_se=0.005, max_samples=1000)
                      for partition in (False, True)}
            row = {"case": case, "measurement": label, "G": groups,
                   "variance_per_batch_independent": variances[False], "variance_per_batch_partition": variances[True],
                   "fewer_batches": variances[False] / variances[True]}
            for partition, name in ((False, "independent"), (True, "partition")):
                est, seconds = target[partition]
                row[name] = {"value": est.value, "se": est.se, "n": est.n, "computed": est.hvps, "capped": est.capped,
                             "seconds": seconds}
            out.append(row)
            before, after = row["independent"], row["partition"]
            print(f"| {case} | {label} | {groups} | {row['fewer_batches']:.2f}x | "
                  f"{cell(before)} | {cell(after)} |", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=240, help="batches of each fixed-budget estimate")
    p.add_argument("--seeds", type=int, default=2, help="fixed-budget estimates of each kind, averaged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | measurement | G = floor(n/b) | fewer batches for the same SE | independent: value ± SE, batches used "
          "(computed), time (0.5 % target, cap 1000) | partitions: the same |\n|---|---|---|---|---|---|")
    out = {"settings": vars(args), "rows": rows(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
