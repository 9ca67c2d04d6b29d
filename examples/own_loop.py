"""Your own training loop, measured: a plain PyTorch loop on scikit-learn's 8x8 digits that logs
lambda_max and Batch Sharpness with CurvatureLogger, then plots them against 2/eta.

    python examples/own_loop.py --out results/own_loop      # about a minute on a laptop CPU
    python sharpness_gap.py results/own_loop                 # the suite's scripts read the folder
"""

import argparse
import os
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import plot_results  # noqa: E402
from utils.api import CurvatureLogger  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="results/own_loop", help="the run folder to write (new or empty)")
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--num-data", type=int, default=512)
parser.add_argument("--lr", type=float, default=0.4)
parser.add_argument("--batch", type=int, default=16)
args = parser.parse_args()

digits = load_digits()
X = torch.tensor(digits.data[:args.num_data], dtype=torch.float32)
X = (X - X.mean(0)) / (X.std(0) + 1e-8)
Y = nn.functional.one_hot(torch.tensor(digits.target[:args.num_data]), 10).float()  # mse on one-hot targets

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)


def loss_fn(outputs, targets):  # the paper's mse: summed over outputs, no 1/2, mean over samples
    return (outputs - targets).pow(2).sum(dim=1).mean()


# "mse" is loss_fn, known to the suite, which then takes its fastest exact routes (any callable works).
logger = CurvatureLogger(args.out, model, "mse", (X, Y), measurements=["lambdamax", "batch_sharpness"],
                         every=max(1, args.steps // 15), batch_size=args.batch, name="digits_mlp")
generator = torch.Generator().manual_seed(1)
for step in range(args.steps):
    batch = torch.randint(0, len(X), (args.batch,), generator=generator)
    xb, yb = X[batch], Y[batch]
    optimizer.zero_grad()
    loss = loss_fn(model(xb), yb)
    # Before the update, on the parameters it acts on; the step's loss spares the logger a forward pass.
    logger.log(step, optimizer, batch=(xb, yb), batch_loss=loss.item())
    loss.backward()
    optimizer.step()
summary = logger.close()
print(f"final train loss {summary['final_train_loss']:.4g}; 2/eta = {2 / args.lr:g}")
sys.exit(plot_results.main([args.out, "--quiet"]))
