"""How much TF32 rounding moves the curvature measurements on a GPU.

    python benchmarks/bench_tf32.py [--models cnn mlp resnet] [--num-data 512]

On Ampere and later NVIDIA GPUs, TF32 rounds the inputs of float32 matrix products and
convolutions to 10 mantissa bits. PyTorch allows it in cuDNN convolutions by default (and not in
other matrix products), so a convolutional network's Hessian products change with it; runs keep
it off unless training.py gets --tf32. For each model on synthetic CIFAR-shaped data (mse), this
script computes, with TF32 off, with PyTorch's default (convolutions only) and with TF32 on
everywhere: Hessian-vector products with --vectors fixed random vectors, lambda_max (Lanczos to
a relative residual of 1e-4, near where float32 rounding stalls it) and Batch Sharpness at
b = --batch over --batches fixed batches, and prints each one's relative difference from the
TF32-off value. On a CPU, or a GPU without TF32, every difference is 0.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.data import load_dataset  # noqa: E402
from utils.devices import set_tf32  # noqa: E402
from utils.estimators import measurement_generator  # noqa: E402
from utils.hvp import HessianOperator  # noqa: E402
from utils.losses import mse_loss  # noqa: E402
from utils.measures import batch_sharpness, lambda_max  # noqa: E402
from utils.models import build_model  # noqa: E402

# (matrix products, cuDNN convolutions) allowed to use TF32.
SETTINGS = {"off": (False, False), "PyTorch default": (False, True), "on": (True, True)}


def measure(model, X, Y, vectors, args) -> dict:
    """Hessian products with ``vectors``, lambda_max and Batch Sharpness on fixed batches."""
    operator = HessianOperator(model, mse_loss, X, Y)
    products = operator.matvec(vectors)
    top = lambda_max(model, mse_loss, X, Y, tol=1e-4, max_iter=200)[1].value
    sharpness = batch_sharpness(model, mse_loss, X, Y, args.batch, generator=measurement_generator(0, 0),
                                min_samples=args.batches, max_samples=args.batches, rel_se=0.0).value
    return {"products": products, "lambda_max": top, "batch_sharpness": sharpness}


def relative(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return ((a - b).norm(dim=0) / b.norm(dim=0)).max().item()
    return abs(a - b) / abs(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp", "resnet"], help="models to measure")
    parser.add_argument("--num-data", type=int, default=512, help="synthetic CIFAR-shaped samples")
    parser.add_argument("--vectors", type=int, default=8, help="random vectors for the Hessian products")
    parser.add_argument("--batch", type=int, default=8, help="Batch Sharpness batch size")
    parser.add_argument("--batches", type=int, default=50, help="Batch Sharpness batches (fixed, no stopping rule)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; largest relative difference from TF32 off")
    print(f"{'model':8s} {'TF32':16s} {'Hv (max over vectors)':>22s} {'lambda_max':>11s} {'Batch Sharpness':>16s}")
    for model_name in args.models:
        data = load_dataset("synthetic", root=None, loss="mse", num_data=args.num_data, input_shape=(3, 32, 32),
                            num_classes=10, device=device)
        model = build_model(model_name, (3, 32, 32), 10).to(device)
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        vectors = torch.randn(dim, args.vectors, generator=torch.Generator().manual_seed(0)).to(device)
        results = {}
        for setting, (matmul, convolutions) in SETTINGS.items():
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = convolutions
            results[setting] = measure(model, data.X_train, data.Y_train, vectors, args)
        reference = results["off"]
        for setting, result in results.items():
            if setting == "off":
                continue
            print(f"{model_name:8s} {setting:16s} {relative(result['products'], reference['products']):22.2e} "
                  f"{relative(result['lambda_max'], reference['lambda_max']):11.2e} "
                  f"{relative(result['batch_sharpness'], reference['batch_sharpness']):16.2e}")
        print(f"{model_name:8s} {'(off: values)':16s} {'':22s} {reference['lambda_max']:11.5g} "
              f"{reference['batch_sharpness']:16.5g}")
    set_tf32(False)


if __name__ == "__main__":
    main()
