"""One measurement over K processes against one process: speed-up and per-rank peak memory.

    python benchmarks/bench_distributed.py [--n 8192] [--processes 1 2] [--device cpu|cuda] [--json out.json]

The paper's MLP (3072 -> 512 -> 512 -> 10, 1,841,162 parameters, mse) on n synthetic
CIFAR-shaped samples. For each K of ``--processes`` the measurements run in K fresh processes
(one thread each on the CPU, one GPU each on CUDA) joined by torch.distributed as ``torchrun``
joins them (Gloo on the CPU, NCCL on CUDA); K = 1 is the plain single-process code. Timed:

    hvp              one full-batch Hessian-vector product (median of ``--hvp-repeats``)
    lambda_max       Lanczos to the suite's tolerance from a random start
    batch_sharpness  Batch Sharpness at batch ``--batch``, at most ``--max-samples`` batches

Per rank: the peak resident memory (or peak CUDA memory) after each phase, and the parts: data
(this rank's rows), model (parameters and gradients) and solver (Lanczos basis and its
products) by size, and graph (the activations a full-batch product keeps, which scale with the
rows held) as the rise of the peak over the HVP phase. The table prints the speed-up t(1) / t(K) from this one run, in wall
time and in the CPU time of the busiest rank (which other jobs on a shared machine do not inflate); on a GPU machine
``--processes`` defaults to every GPU it has, and the per-sample cost of a product gives an
estimate of one product on full CIFAR-10 (50,000) and ImageNet-32 (1,281,167 samples).
"""

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import distributed  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.estimators import measurement_generator  # noqa: E402
from utils.hvp import HessianOperator, num_params  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.measures import batch_sharpness, lambda_max  # noqa: E402
from utils.models import build_model  # noqa: E402
from utils.sharded import Rows, operator  # noqa: E402

SHAPE = (3, 32, 32)
FULL_SIZES = {"CIFAR-10": 50_000, "ImageNet-32": 1_281_167}


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, call):
    """(wall seconds, CPU seconds of this process, value) of ``call()``."""
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    value = call()
    _synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, value


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(args, world: distributed.World, device: torch.device) -> dict:
    """Every timing and memory figure of one rank."""
    peaks = {"start": _peak_bytes(device)}
    data = load_dataset("synthetic", root=None, loss="mse", num_data=args.n, input_shape=SHAPE, num_classes=10,
                        device="cpu" if world.distributed else device)
    X, Y = data.X_train, data.Y_train
    if world.distributed:
        X, Y = Rows.shard(X, world, device), Rows.shard(Y, world, device)
    del data
    local_x, local_y = (X.local, Y.local) if world.distributed else (X, Y)
    peaks["data"] = _peak_bytes(device)
    model = build_model("mlp", SHAPE, 10).to(device)
    P = num_params(model)
    peaks["model"] = _peak_bytes(device)

    op = operator(HessianOperator, model, mse_loss, X, Y)
    v = torch.randn(P, generator=torch.Generator().manual_seed(1)).to(device)
    op.matvec(v)  # builds the graph once; the products after it reuse it
    hvp_times = [_timed(device, lambda: op.matvec(v))[:2] for _ in range(args.hvp_repeats)]
    del op
    peaks["hvp"] = _peak_bytes(device)

    seconds, cpu, (eig, estimate) = _timed(device, lambda: lambda_max(
        model, mse_loss, X, Y, generator=measurement_generator(0, 0, device=device)))
    peaks["lambda_max"] = _peak_bytes(device)
    lambda_record = {"seconds": seconds, "cpu_seconds": cpu, "value": estimate.value, "hvps": estimate.hvps}
    basis_rows = max(16, 1 << max(0, (estimate.hvps - 1)).bit_length())

    seconds, cpu, sharpness = _timed(device, lambda: batch_sharpness(
        model, mse_loss, X, Y, args.batch, generator=measurement_generator(0, 1, device=device),
        min_samples=min(20, args.max_samples), max_samples=args.max_samples, rel_se=args.rel_se))
    peaks["batch_sharpness"] = _peak_bytes(device)
    element = torch.tensor([], dtype=torch.float32).element_size()
    return {
        "rank": world.rank,
        "hvp_seconds": statistics.median(wall for wall, _ in hvp_times),
        "hvp_cpu_seconds": statistics.median(cpu for _, cpu in hvp_times),
        "lambda_max": lambda_record,
        "batch_sharpness": {"seconds": seconds, "cpu_seconds": cpu, "value": sharpness.value, "se": sharpness.se, "n": sharpness.n,
                            "hvps": sharpness.hvps},
        "parts_bytes": {"data": _tensor_bytes(local_x, local_y), "model": 2 * P * element,
                        "solver": 2 * min(basis_rows, 64) * P * element},
        "peak_bytes": peaks,
        "rows": int(local_x.shape[0]),
        "num_params": P,
    }


def _worker(rank, size, port, args, queue):
    if size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = distributed.init(device)
    try:
        queue.put(measure(args, world, device))
    finally:
        distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(size: int, args) -> list[dict]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, size, port, args, queue)) for rank in range(size)]
    for p in processes:
        p.start()
    records = [queue.get() for _ in processes]
    for p in processes:
        p.join()
    return sorted(records, key=lambda r: r["rank"])


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def report(results: dict, args) -> str:
    base = results[min(results)][0]
    lines = [f"paper MLP ({base['num_params']:,} parameters), n = {args.n}, device {args.device}, "
             f"{args.threads} thread(s) per process; batch sharpness at b = {args.batch}",
             "",
             "processes | HVP s (x) | lambda_max s (x) [hvps] | batch sharpness s (x) [batches] | per rank MiB: "
             "rows, data, model, solver, graph, peak"]
    for size, ranks in sorted(results.items()):
        r = ranks[0]
        hvp = max(x["hvp_seconds"] for x in ranks)
        lam = max(x["lambda_max"]["seconds"] for x in ranks)
        bs = max(x["batch_sharpness"]["seconds"] for x in ranks)
        peak = max(x["peak_bytes"]["batch_sharpness"] for x in ranks)
        lines.append(
            f"{size:>9} | {hvp:.3f} ({base['hvp_seconds'] / hvp:.2f}x) | {lam:.2f} ({base['lambda_max']['seconds'] / lam:.2f}x) "
            f"[{r['lambda_max']['hvps']}] | {bs:.2f} ({base['batch_sharpness']['seconds'] / bs:.2f}x) "
            f"[{r['batch_sharpness']['n']}] | {max(x['rows'] for x in ranks)}, {_mib(r['parts_bytes']['data'])}, "
            f"{_mib(r['parts_bytes']['model'])}, {_mib(r['parts_bytes']['solver'])}, "
            f"{_mib(r['peak_bytes']['hvp'] - r['peak_bytes']['model'])}, {_mib(peak)}")
        cpu = [max(x["hvp_cpu_seconds"] for x in ranks), max(x["lambda_max"]["cpu_seconds"] for x in ranks),
               max(x["batch_sharpness"]["cpu_seconds"] for x in ranks)]
        base_cpu = [base["hvp_cpu_seconds"], base["lambda_max"]["cpu_seconds"], base["batch_sharpness"]["cpu_seconds"]]
        lines.append(f"{'':>9}   CPU s of the busiest rank (x): " + ", ".join(
            f"{name} {c:.3f} ({b / c:.2f}x)" for name, c, b in zip(("HVP", "lambda_max", "batch sharpness"), cpu, base_cpu)))
        lines.append(f"{'':>9}   peak MiB after each phase (rank 0): "
                     + ", ".join(f"{k} {_mib(v)}" for k, v in r["peak_bytes"].items()))
        lines.append(f"{'':>9}   lambda_max {r['lambda_max']['value']:.6g}, batch sharpness "
                     f"{r['batch_sharpness']['value']:.6g} +- {r['batch_sharpness']['se']:.2g}")
    widest = max(results)
    per_sample = max(x["hvp_seconds"] for x in results[widest]) * widest / args.n
    lines.append("")
    lines.append(f"one full-batch HVP from the measured per-sample cost on {widest} process(es) "
                 f"({per_sample * 1e6:.1f} us per sample and process): "
                 + ", ".join(f"{name} {per_sample * size / widest:.1f} s" for name, size in FULL_SIZES.items()))
    if args.device == "cpu":  # a shared machine's load inflates wall time, not the CPU time of the work
        per_sample = max(x["hvp_cpu_seconds"] for x in results[widest]) * widest / args.n
        lines.append(f"the same from CPU time ({per_sample * 1e6:.1f} us per sample on one core): "
                     + ", ".join(f"{name} {per_sample * size / widest:.1f} s" for name, size in FULL_SIZES.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="training samples")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--processes", type=int, nargs="+", default=None,
                   help="world sizes to compare (default: 1 2 on the CPU, 1 and every GPU on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--batch", type=int, default=64, help="Batch Sharpness batch size")
    p.add_argument("--max-samples", type=int, default=200, help="at most this many Batch Sharpness batches")
    p.add_argument("--rel-se", type=float, default=0.0,
                   help="Batch Sharpness standard-error target (default 0: always --max-samples batches)")
    p.add_argument("--hvp-repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args()
    if args.processes is None:
        args.processes = [1, torch.cuda.device_count()] if args.device == "cuda" else [1, 2]
    results = {size: run_processes(size, args) for size in sorted(set(args.processes))}
    print(report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
