"""Fixed short command lines with every measurement on, whose outputs are stored in this folder.

``tests/test_golden_outputs.py`` reruns them and compares ``results.txt`` (without the
elapsed-time columns), ``final.json``, ``final_fullbs.json`` and ``final_ghg.json`` with the
stored values to round-off, so a change of structure cannot change a result unnoticed.
``python tests/golden/cases.py`` rewrites the stored values: only for a change that is meant
to alter results, and say so in its commit.
"""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EVERY_SGD_MEASUREMENT = ["--lambdamax", "--num-eigenvalues", "2", "--batch-sharpness", "--step-sharpness", "--gni",
                         "--batch-sharpness-ratio", "--batch-lambdamax", "--hessian-trace", "--gauss-newton",
                         "--gradient-norm", "--param-distance", "--final"]
# The whole-spectrum measurements, on the MLP cases (small quadrature: its cost grows with probes x steps).
SPECTRUM_MEASUREMENTS = ["--lambda-min", "--gradient-overlap", "2", "--layer-sharpness", "--spectral-density",
                         "--density-probes", "2", "--density-steps", "8"]
# The convolutional nets train on the whole set (b = n), where every batch estimate is exact and
# stops at its fewest samples, and skip the trace, whose 1000 Rademacher probes would take minutes:
# the MLP cases sample for real and cover the trace.
CONV_MEASUREMENTS = [flag for flag in EVERY_SGD_MEASUREMENT if flag != "--hessian-trace"]
CASES = {
    "mlp_mse_momentum": ["--dataset", "digits", "--num-data", "64", "--width", "16", "--batch", "16", "--lr", "0.05",
                         "--momentum", "0.9", "--steps", "6", "--measure-every", "3", *EVERY_SGD_MEASUREMENT,
                         "--momentum-sharpness", *SPECTRUM_MEASUREMENTS],
    "mlp_ce_adam": ["--dataset", "digits", "--num-data", "32", "--width", "16", "--depth", "1", "--batch", "32",
                    "--loss", "ce", "--adam", "--lr", "0.003", "--steps", "4", "--measure-every", "2",
                    *EVERY_SGD_MEASUREMENT, "--preconditioned-sharpness", *SPECTRUM_MEASUREMENTS],
    "cnn_ce": ["--model", "cnn", "--dataset", "synthetic", "--input-shape", "1,12,12", "--num-classes", "3",
               "--num-data", "16", "--batch", "16", "--loss", "ce", "--lr", "0.02", "--steps", "2",
               "--measure-every", "2", *CONV_MEASUREMENTS],
    "resnet_bn_mse": ["--model", "resnet_bn", "--dataset", "synthetic", "--input-shape", "3,8,8", "--num-classes", "2",
                      "--num-data", "16", "--batch", "16", "--lr", "0.01", "--steps", "2", "--measure-every", "2",
                      *CONV_MEASUREMENTS],
}
FULLBS = ["--num-eigenvalues", "2", "--quiet", "--cpu"]
GHG = ["--batch-sizes", "4", "--max-samples", "20", "--quiet", "--cpu"]
FINAL_FILES = ("final.json", "final_fullbs.json", "final_ghg.json")


def run_case(name: str, folder: str) -> str:
    """Train case ``name`` into ``folder``/``name`` and run the two end-of-run scripts on it."""
    import compute_final_fullbs
    import compute_final_gHg
    import training

    run_dir = os.path.join(folder, name)
    assert training.main([*CASES[name], "--quiet", "--cpu", "--run-dir", run_dir]) == 0
    assert compute_final_fullbs.main([run_dir, *FULLBS]) == 0
    assert compute_final_gHg.main([run_dir, *GHG]) == 0
    return run_dir


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        for name in CASES:
            run_dir = run_case(name, scratch)
            stored = os.path.join(HERE, name)
            os.makedirs(stored, exist_ok=True)
            for file in ("results.txt", *FINAL_FILES):
                shutil.copy(os.path.join(run_dir, file), os.path.join(stored, file))
            print(f"stored {stored}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
