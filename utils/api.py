"""The public Python surface of EOSS: curvature measurements on any ``nn.Module``, in any loop.

    from utils.api import CurvatureLogger, measure

    values = measure(model, "ce", (X, Y), ["lambdamax", "batch_sharpness", "gni"], batch_size=32, lr=0.05)
    values["batch_sharpness"].value, values["batch_sharpness"].se

- :func:`measure`: the registry's measurements (:data:`MEASUREMENTS`, the names of
  ``training.py``'s flags without ``--``) at the model's current parameters, each an
  :class:`Estimate` (value, standard error, samples, Hessian products, seconds).
- :class:`CurvatureLogger`: the same on a cadence inside a user's training loop, written to a
  run folder that ``plot_results.py`` and ``sharpness_gap.py`` read.
- :func:`as_data`, :func:`as_loss`: what data and losses are accepted. Data: ``(X, Y)``
  tensors, a map-style ``Dataset`` (dict samples through ``batch_to_inputs`` or the keys of
  :data:`INPUT_KEYS` / :data:`TARGET_KEYS`), a ``DataLoader`` (read through its dataset), or an
  iterable (full-batch quantities only). Loss: ``"mse"`` (the paper's: summed over outputs, no
  1/2), ``"ce"``, or a callable returning the mean loss of a batch.

Everything runs on the model's device and in its dtype: a float64 model measures in float64.
"""

from utils.estimators import Estimate
from utils.registry import NAMES as MEASUREMENTS
from utils.user_inputs import INPUT_KEYS, TARGET_KEYS, UserData, as_data, as_loss
from utils.user_loop import SAMPLED, CurvatureLogger, measure

__all__ = ["MEASUREMENTS", "SAMPLED", "INPUT_KEYS", "TARGET_KEYS", "CurvatureLogger", "Estimate", "UserData",
           "as_data", "as_loss", "measure"]
