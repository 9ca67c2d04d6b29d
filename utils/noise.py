"""Baselines that replace the SGD step: full-batch GD with synthetic noise, and the SGD SDE.

With L = (1/n) sum_i l_i the mean training loss, g = grad L, g_i = grad l_i the per-sample
gradients, b the batch size and

    Sigma = (1/n) sum_i (g_i - g)(g_i - g)^T

the per-sample gradient covariance, one training step at parameters theta uses the gradient

    sgd     grad sum_i w_i l_i,  w = 1/n + (xi - mean(xi)) / sqrt(n b),  xi ~ N(0, I_n):
            since sum_i (xi_i - mean xi) g_i = sum_i xi_i (g_i - g), it is Gaussian with mean g
            and covariance Sigma / b, the covariance of the mean gradient of b samples drawn
            WITH replacement. A batch of b distinct samples (what the training loop draws) has
            the smaller covariance (n - b) / (n - 1) * Sigma / b; the two agree for b << n.
    diag    g + sqrt(diag(Sigma) / b) * z,         z ~ N(0, I_P)
    iso     g + sqrt(tr(Sigma) / (P b)) * z        (P the number of parameters)
    const   g + (sigma / sqrt(b)) * z              (sigma = --noise-mag)

and hands it to the run's optimiser in place of the mini-batch gradient. ``--sde`` instead
integrates, over the time eta of one step,

    d theta = -grad L dt + sqrt(eta / b) Sigma^(1/2) dW

with m = ceil(eta / h) Euler-Maruyama sub-steps of length dt = eta / m. A sub-step
theta -= dt * (g + sqrt(eta / (b dt)) Sigma^(1/2) z) is a step of length dt along the ``sgd``
gradient with the batch b replaced by b dt / eta = b / m, so with h = eta it is the ``sgd``
step and with b = inf (no noise) and h = eta it is exactly the GD step theta -= eta g.

Only n-vectors of weights and P-vectors of statistics are ever formed: weighted losses are
differentiated in chunks of data, and diag(Sigma) (and tr Sigma) come from per-sample gradients
computed with ``torch.func.vmap`` a chunk at a time and merged with the parallel-variance
formula, so memory is bounded by the chunk, never n x P or n x n. These statistics are
recomputed at steps that are multiples of ``refresh`` (and at the first step when none are
held) and saved in checkpoints, so a resumed run continues exactly.

All noise comes from :func:`noise_generator`, a pure function of (noise_seed, step, sub-step)
that shares no state with the training or measurement generators.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from utils.errors import UserError
from utils.models import has_batchnorm

NOISE_MODES = ("sgd", "diag", "iso", "const")
DEFAULT_REFRESH = 30
# Numbers of per-sample gradient entries held at once by default (256 MB in float32).
STATISTICS_BUDGET = 2 ** 26


def noise_generator(noise_seed: int, step: int, substep: int = 0, device="cpu") -> torch.Generator:
    """A generator seeded by a 63-bit hash of (noise_seed, step, substep), independent of any other RNG."""
    digest = hashlib.blake2b(f"eoss-noise:{int(noise_seed)}:{int(step)}:{int(substep)}".encode(),
                             digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)
    return generator


def sde_substeps(lr: float, h: float) -> int:
    """m = ceil(eta / h), with a ratio within 1e-9 of an integer counted as that integer."""
    ratio = lr / h
    return max(1, math.ceil(ratio - 1e-9 * ratio))


def sgd_weights(xi: torch.Tensor, batch: float) -> torch.Tensor:
    """w = 1/n + (xi - mean xi) / sqrt(n b): grad sum_i w_i l_i has mean g and covariance Sigma / b.

    ``batch`` may be fractional (the SDE's b / m) or inf (no noise: every w_i = 1/n exactly).
    """
    n = xi.shape[0]
    return 1.0 / n + (xi - xi.mean()) / math.sqrt(n * batch)


@dataclass
class GradientMoments:
    """The mean g and the diagonal of Sigma = (1/n) sum_i (g_i - g)(g_i - g)^T, as flat P-vectors."""

    mean: torch.Tensor
    variance: torch.Tensor

    @property
    def trace(self) -> float:
        """tr Sigma = sum_j Sigma_jj."""
        return float(self.variance.sum())


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def default_statistics_chunk(num_params: int, n: int) -> int:
    """Samples per vmap chunk so that one chunk of per-sample gradients holds about STATISTICS_BUDGET numbers."""
    return max(1, min(n, STATISTICS_BUDGET // max(1, num_params)))


def gradient_moments(model, loss_fn, X, Y, chunk_size: int) -> GradientMoments:
    """g and diag(Sigma) from per-sample gradients, ``chunk_size`` samples at a time.

    Each chunk c gives its mean m_c and sum of squared deviations S_c; chunks are merged with
    S = S_a + S_b + (m_b - m_a)^2 n_a n_b / (n_a + n_b), which avoids the cancellation of
    (1/n) sum g_i^2 - g^2. diag(Sigma) = S / n.
    """
    params = {name: p.detach() for name, p in _trainable(model).items()}

    def sample_loss(theta, x, y):
        return loss_fn(functional_call(model, theta, (x.unsqueeze(0),)), y.unsqueeze(0), reduction="sum")

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    count, mean, squares = 0, None, None
    for start in range(0, X.shape[0], chunk_size):
        grads = per_sample_grads(params, X[start:start + chunk_size], Y[start:start + chunk_size])
        k = X[start:start + chunk_size].shape[0]
        chunk_mean = {name: G.mean(dim=0) for name, G in grads.items()}
        # In place on vmap's own output: no second chunk-sized tensor.
        chunk_squares = {name: G.sub_(chunk_mean[name]).pow_(2).sum(dim=0) for name, G in grads.items()}
        del grads
        if mean is None:
            count, mean, squares = k, chunk_mean, chunk_squares
            continue
        total = count + k
        for name in mean:
            delta = chunk_mean[name] - mean[name]
            mean[name] += delta * (k / total)
            squares[name] += chunk_squares[name] + delta.pow_(2) * (count * k / total)
        count = total
    flat = lambda tensors: torch.cat([tensors[name].reshape(-1) for name in params])
    return GradientMoments(flat(mean), flat(squares) / count)


def accumulate_gradient(model, loss_fn, X, Y, weights: torch.Tensor | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Add grad sum_i w_i l_i (or grad L when ``weights`` is None) to the parameters' ``.grad``.

    Data are processed ``chunk_size`` samples at a time (all at once when None). Returns the
    mean loss L = (1/n) sum_i l_i at the current parameters, detached.
    """
    n = X.shape[0]
    size = n if chunk_size is None else chunk_size
    loss = 0.0
    for start in range(0, n, size):
        xb, yb = X[start:start + size], Y[start:start + size]
        if weights is None:
            chunk_loss = loss_fn(model(xb), yb) * (xb.shape[0] / n)
            chunk_loss.backward()
            loss = loss + chunk_loss.detach()
        else:
            per_sample = loss_fn(model(xb), yb, reduction="none")
            (weights[start:start + size] * per_sample).sum().backward()
            loss = loss + per_sample.detach().sum() / n
    return loss


def _add_to_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        piece = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)


class NoisyStep:
    """One training step of a noise baseline on the full training set (X, Y).

    ``mode`` is one of NOISE_MODES or ``"sde"``. The training loop calls
    :meth:`loss_and_gradient` (the mean loss L at the current parameters; the step's first
    noisy gradient is left in ``.grad``) and, unless it stops there, :meth:`update`. In the
    ``gd-noise`` modes the update is ``optimizer.step()``, so momentum or Adam see the noisy
    gradient; the SDE moves the parameters itself (plain SGD only).
    """

    def __init__(self, mode: str, model, loss_fn, X, Y, optimizer, *, lr: float, batch: float,
                 noise_seed: int = 0, noise_mag: float | None = None, refresh: int = DEFAULT_REFRESH,
                 sde_h: float | None = None, chunk_size: int | None = None,
                 statistics_chunk: int | None = None):
        if mode not in NOISE_MODES + ("sde",):
            raise ValueError(f"unknown noise mode {mode!r}")
        if has_batchnorm(model):
            raise UserError("--gd-noise and --sde need per-sample losses, which BatchNorm's batch statistics do not "
                            "give; use a model without BatchNorm")
        self.mode, self.model, self.loss_fn, self.X, self.Y, self.optimizer = mode, model, loss_fn, X, Y, optimizer
        self.lr, self.batch, self.noise_seed, self.noise_mag = lr, batch, noise_seed, noise_mag
        self.refresh, self.chunk_size = refresh, chunk_size
        self.params = list(_trainable(model).values())
        self.num_params = sum(p.numel() for p in self.params)
        self.substeps = sde_substeps(lr, sde_h) if mode == "sde" else 1
        self.statistics_chunk = statistics_chunk or default_statistics_chunk(self.num_params, X.shape[0])
        self.statistics = None  # {"step", "sigma"}: diag Sigma (diag) or tr Sigma (iso) of the last refresh

    def _generator(self, step: int, substep: int) -> torch.Generator:
        return noise_generator(self.noise_seed, step, substep, device=self.X.device)

    def _standard_normal(self, size: int, step: int, substep: int) -> torch.Tensor:
        p = self.params[0]
        return torch.randn(size, generator=self._generator(step, substep), dtype=p.dtype, device=p.device)

    def _noise_scale(self, step: int) -> torch.Tensor | float:
        """sqrt(diag Sigma / b) (diag), sqrt(tr Sigma / (P b)) (iso) or sigma / sqrt(b) (const)."""
        if self.mode == "const":
            return self.noise_mag / math.sqrt(self.batch)
        if self.statistics is None or step % self.refresh == 0:
            moments = gradient_moments(self.model, self.loss_fn, self.X, self.Y, self.statistics_chunk)
            self.statistics = {"step": step, "sigma": moments.variance if self.mode == "diag" else moments.trace}
        sigma = self.statistics["sigma"]
        if self.mode == "diag":
            return (sigma / self.batch).sqrt()
        return math.sqrt(sigma / (self.num_params * self.batch))

    def _gradient(self, step: int, substep: int) -> torch.Tensor:
        if self.mode in ("sgd", "sde"):
            xi = self._standard_normal(self.X.shape[0], step, substep)
            weights = sgd_weights(xi, self.batch / self.substeps)
            return accumulate_gradient(self.model, self.loss_fn, self.X, self.Y, weights, self.chunk_size)
        scale = self._noise_scale(step)
        loss = accumulate_gradient(self.model, self.loss_fn, self.X, self.Y, None, self.chunk_size)
        _add_to_grads(self.params, scale * self._standard_normal(self.num_params, step, substep))
        return loss

    def loss_and_gradient(self, step: int) -> torch.Tensor:
        """L at the current parameters; ``.grad`` (zeroed by the caller) then holds the first noisy gradient."""
        return self._gradient(step, 0)

    @torch.no_grad()
    def _move(self, dt: float) -> None:
        for p in self.params:
            p.add_(p.grad, alpha=-dt)

    def update(self, step: int) -> None:
        """Apply step ``step`` after :meth:`loss_and_gradient`."""
        if self.mode != "sde":
            self.optimizer.step()
            return
        dt = self.lr / self.substeps
        self._move(dt)
        for substep in range(1, self.substeps):
            for p in self.params:
                p.grad = None
            self._gradient(step, substep)
            self._move(dt)

    def __call__(self, step: int) -> torch.Tensor:
        """The whole step: returns L before it."""
        for p in self.params:
            p.grad = None
        loss = self.loss_and_gradient(step)
        self.update(step)
        return loss

    def state_dict(self) -> dict | None:
        """What a resumed run needs: the diag / iso statistics of the last refresh (None otherwise)."""
        if self.statistics is None:
            return None
        return {"mode": self.mode, **self.statistics}

    def load_state_dict(self, state: dict | None) -> None:
        """Adopt saved statistics of the same mode; others (a fork that changed mode) are ignored."""
        if state is not None and state.get("mode") == self.mode:
            sigma = state["sigma"]
            self.statistics = {"step": state["step"], "sigma": sigma.to(self.X.device) if torch.is_tensor(sigma) else sigma}


def noisy_step_from_config(cfg, model, loss_fn, X, Y, optimizer) -> NoisyStep | None:
    """The :class:`NoisyStep` a run's settings ask for, or None for plain SGD."""
    if not cfg.gd_noise and not cfg.sde:
        return None
    return NoisyStep("sde" if cfg.sde else cfg.gd_noise, model, loss_fn, X, Y, optimizer, lr=cfg.lr,
                     batch=cfg.batch, noise_seed=cfg.noise_seed, noise_mag=cfg.noise_mag,
                     refresh=cfg.noise_refresh, sde_h=cfg.sde_h, chunk_size=cfg.hvp_chunk,
                     statistics_chunk=cfg.noise_chunk)
