"""The measurement registry: one entry per quantity that ``training.py`` can log.

Everything the rest of the suite knows about a measurement comes from its entry:

- :mod:`utils.config`: the ``RunConfig`` switch ``<name>`` and cadence ``<name>_every``, the
  flags ``--<name>`` and ``--<name>-every`` with the entry's help, and what it needs
  (``--momentum``, ``--adam``);
- :mod:`utils.monitor`: the ``results.txt`` columns (each value, ``_se`` and ``_n`` where it
  has a standard error, ``_seconds`` and ``_hvps``), the default cadence, the random stream
  (the entry's name), the dispatch at every step and for ``final.json``;
- :mod:`utils.plotting`: the panel and the label of every column.

Adding a measurement: one :class:`Measurement` here, one function in :mod:`utils.measures`
with its formula in its docstring, one test against an exact value, and a row in the README's
measurement table (``tests/test_registry.py`` fails without it). The order of the entries is
the order of the columns, of the dispatch and of the plot panels; stored runs rely on the
names (switches, cadence keys of ``config.json``, stream names, columns), so they never change.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from utils import measures, spectrum
from utils.eigs import EigResult
from utils.estimators import Estimate, exact_estimate
from utils.results import atomic_write_text


@dataclass(frozen=True)
class Curve:
    """How a column is drawn: ``faint`` thin and light, ``smooth`` as a rolling mean, ``dashed``.
    ``column`` is the results.txt column; in a registry entry it is the :class:`Column` that
    holds the curve."""

    label: str
    faint: bool = False
    smooth: bool = False
    dashed: bool = False
    column: str | None = None


@dataclass(frozen=True)
class Column:
    """One quantity in ``results.txt``: its value, ``<name>_se`` and ``<name>_n`` when
    ``with_se``, then ``<name>_seconds`` and ``<name>_hvps`` (its cost). ``extra`` names bare
    value columns that follow the value, from the run's settings and model (``lambda_2`` ...
    ``lambda_k``; one per layer; none without a model); a column that is not ``valued`` writes
    only its extra columns and its cost. ``panel`` is the title of the plot panel its ``curves``
    are drawn in (none: the column is not drawn), ``ylabel`` that panel's y-axis label in
    matplotlib math text (the first column of a panel that has one sets it; none: the panel's
    title)."""

    name: str
    panel: str | None = None
    curves: tuple[Curve, ...] = ()
    with_se: bool = False
    ylabel: str | None = None
    extra: Callable[[object, object], list[str]] = field(default=lambda cfg, model: [])
    valued: bool = True


@dataclass
class Context:
    """What a measurement may use at one step: the model before the update, the training data,
    the step's own batch, the optimiser's state, and a generator of the measurement's own
    random stream. ``eigenvectors`` is the eigen-solver's warm start, carried from step to step
    (and in checkpoints); ``eig_model`` is the model its top-eigenvalue solve runs on (a float64
    copy for ``final.json``). ``top_eigen`` is the top-eigenvalue solve of this step, once it
    has run; ``threshold`` the run's stability threshold (nan for Adam, whose threshold bounds
    the preconditioned Hessian); ``folder`` the run folder for measurements that write files
    (none: they write nothing); ``closed_forms`` the measurements that may be computed exactly
    where that is cheaper (the run's ``config.json``: ``resolved.closed_forms``);
    ``partition_draws`` those that draw their batches as partitions of random permutations where
    the data hold few (``resolved.partition_draws``)."""

    cfg: object
    step: int
    model: torch.nn.Module
    loss_fn: object
    X: torch.Tensor
    Y: torch.Tensor
    xb: torch.Tensor | None
    yb: torch.Tensor | None
    optimizer: torch.optim.Optimizer | None
    reference: torch.Tensor | None
    tol: float
    generator: Callable[[], torch.Generator]
    eigenvectors: torch.Tensor | None = None
    eig_model: torch.nn.Module | None = None
    top_eigen: EigResult | None = None
    threshold: float = math.nan
    folder: str | None = None
    closed_forms: tuple[str, ...] = ()
    partition_draws: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """One measurement. ``name`` is its RunConfig switch, its flag (``--`` + dashes), its
    ``resolved.schedule`` key in config.json and its random stream. ``cadence`` is the default
    (about that many measurements in the first tenth of a run, and in the rest). ``compute``
    maps a :class:`Context` to {column: Estimate or bare value}; an empty dict skips the step.
    ``needs`` is the setting it measures (``momentum`` or ``adam``), ``needs_reason`` why.
    ``final`` says when final.json carries it (``always``, ``enabled`` or ``never``) and
    ``final_stream`` the random stream it draws there; ``final_float64`` solves it there on a
    float64 copy of the model, to a tighter tolerance than float32 products reach. ``line`` is the threshold its panels
    draw: the optimiser's stability line (``stability``), Adam's line for the preconditioned
    Hessian (``preconditioned``) or none; ``log_scale`` draws its panels on a log axis (a panel
    takes both from the first measurement drawn in it). ``argument`` makes the flag take an
    optional positive integer, named so in the help (the switch holds it; 0 is off, the bare flag 1). ``closed_form``: its Monte Carlo
    estimate is computed exactly from per-sample gradients where that is cheaper
    (:mod:`utils.noise_decomposition`). ``partition_draws``: its same-batch samples may be means over
    the disjoint batches of one random permutation (:func:`utils.measures.partition_size`).
    ``draws_batches``: it draws random mini-batches by index (which data given as a pure
    iterable cannot serve)."""

    name: str
    help: str
    columns: tuple[Column, ...]
    compute: Callable[[Context], dict]
    cadence: tuple[int, int] = (6, 20)
    needs: str | None = None
    needs_reason: str = ""
    final: str = "enabled"
    final_stream: str | None = None
    final_float64: bool = False
    line: str | None = "stability"
    log_scale: bool = False
    argument: str | None = None
    closed_form: bool = False
    partition_draws: bool = False
    draws_batches: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def warn_unconverged(step: int, name: str, eig, tol: float) -> None:
    if not eig.converged:
        warnings.warn(f"step {step}: {name} solver stopped at relative residual {float(eig.residuals.max()):.2e} "
                      f"above --eig-tol {tol:g} after {eig.matvecs} products")


def _data(c: Context) -> tuple:
    return c.model, c.loss_fn, c.X, c.Y


def _lambda_max(c: Context) -> dict:
    cfg = c.cfg
    eig, est = measures.lambda_max(c.eig_model or c.model, c.loss_fn, c.X, c.Y, k=cfg.num_eigenvalues, tol=c.tol,
                                   chunk_size=cfg.hvp_chunk, warm_start=c.eigenvectors, generator=c.generator(),
                                   method=cfg.eig_method, exact=cfg.exact_measurements)
    warn_unconverged(c.step, "lambda_max", eig, c.tol)
    c.eigenvectors = eig.vectors.detach().to(next(c.model.parameters()).dtype)
    c.top_eigen = eig
    values = {"lambda_max": Estimate(float(eig.values[0]), math.nan, 1, est.hvps, est.seconds)}
    values.update({f"lambda_{i}": float(eig.values[i - 1]) for i in range(2, cfg.num_eigenvalues + 1)})
    return values


def _batch_sharpness(c: Context) -> dict:
    return {"batch_sharpness": measures.batch_sharpness(*_data(c), c.cfg.batch, generator=c.generator(),
                                                        exact=c.cfg.exact_measurements,
                                                        partition_draws="batch_sharpness" in c.partition_draws)}


def _step_sharpness(c: Context) -> dict:
    return {"step_sharpness": measures.step_sharpness(c.model, c.loss_fn, c.xb, c.yb, exact=c.cfg.exact_measurements)}


def _gni(c: Context) -> dict:
    return {"gni": measures.gni(*_data(c), c.cfg.batch, generator=c.generator(), chunk_size=c.cfg.hvp_chunk,
                                exact=c.cfg.exact_measurements, closed_form="gni" in c.closed_forms)}


def _batch_sharpness_ratio(c: Context) -> dict:
    return {"batch_sharpness_ratio": measures.batch_sharpness_ratio(*_data(c), c.cfg.batch, generator=c.generator(),
                                                                    exact=c.cfg.exact_measurements,
                                                                    partition_draws="batch_sharpness_ratio" in c.partition_draws)}


def _batch_lambdamax(c: Context) -> dict:
    return {"batch_lambda_max": measures.batch_lambda_max(*_data(c), c.cfg.batch, generator=c.generator(), tol=c.tol,
                                                          exact=c.cfg.exact_measurements)}


def _hessian_trace(c: Context) -> dict:
    return {"hessian_trace": measures.hessian_trace(*_data(c), generator=c.generator(), chunk_size=c.cfg.hvp_chunk,
                                                    exact=c.cfg.exact_measurements)}


def _gauss_newton(c: Context) -> dict:
    generator = c.generator()  # both quantities draw from one stream, the solve first
    eig, top = measures.gn_lambda_max(*_data(c), tol=c.tol, chunk_size=c.cfg.hvp_chunk, generator=generator)
    warn_unconverged(c.step, "gn_lambda_max", eig, c.tol)
    return {"gn_lambda_max": top, "gn_batch_sharpness": measures.gn_batch_sharpness(
        *_data(c), c.cfg.batch, generator=generator, exact=c.cfg.exact_measurements,
        partition_draws="gauss_newton" in c.partition_draws)}


def _gradient_norm(c: Context) -> dict:
    batch, full = measures.gradient_norms(*_data(c), c.cfg.batch, generator=c.generator(), chunk_size=c.cfg.hvp_chunk,
                                          exact=c.cfg.exact_measurements,
                                          closed_form="gradient_norm" in c.closed_forms)
    return {"grad_norm_sq_batch": batch, "grad_norm_sq_full": full}


def _momentum_sharpness(c: Context) -> dict:
    return {"momentum_sharpness": measures.momentum_sharpness(*_data(c), c.cfg.batch, optimizer=c.optimizer,
                                                              generator=c.generator())}


def _preconditioned_sharpness(c: Context) -> dict:
    if not c.optimizer.state:  # Adam has no second moments before its first step
        return {}
    generator = c.generator()  # both quantities draw from one stream, the solve first
    eig, est = measures.preconditioned_sharpness(*_data(c), optimizer=c.optimizer, tol=c.tol,
                                                 chunk_size=c.cfg.hvp_chunk, generator=generator,
                                                 exact=c.cfg.exact_measurements)
    warn_unconverged(c.step, "preconditioned_sharpness", eig, c.tol)
    unseen = measures.unseen_with_curvature(*_data(c), optimizer=c.optimizer, generator=generator,
                                            chunk_size=c.cfg.hvp_chunk, exact=c.cfg.exact_measurements)
    return {"preconditioned_sharpness": est, "preconditioned_unseen": unseen}


def _param_distance(c: Context) -> dict:
    return {"param_distance": measures.param_distance(c.model, c.reference)}


def _lambda_min(c: Context) -> dict:
    top = c.top_eigen.values[0].item() if c.top_eigen is not None else None
    eig, est = spectrum.lambda_min(c.eig_model or c.model, c.loss_fn, c.X, c.Y, tol=c.tol, lambda_max=top,
                                   chunk_size=c.cfg.hvp_chunk, generator=c.generator(),
                                   exact=c.cfg.exact_measurements)
    warn_unconverged(c.step, "lambda_min", eig, c.tol)
    return {"lambda_min": est}


def _gradient_overlap(c: Context) -> dict:
    k = int(c.cfg.gradient_overlap)
    reusable = c.top_eigen is not None and c.top_eigen.vectors.shape[1] >= k
    full, batch = spectrum.gradient_overlap(*_data(c), c.cfg.batch, k=k, generator=c.generator(),
                                            vectors=c.top_eigen.vectors if reusable else None, tol=c.tol,
                                            chunk_size=c.cfg.hvp_chunk, exact=c.cfg.exact_measurements)
    return {"grad_overlap_full": full, "grad_overlap_batch": batch}


def _layer_sharpness(c: Context) -> dict:
    layers = spectrum.layer_sharpness(*_data(c), groups=spectrum.parameter_groups(c.model, c.cfg.layer_groups),
                                      generator=c.generator(), tol=c.tol, chunk_size=c.cfg.hvp_chunk,
                                      exact=c.cfg.exact_measurements)
    missed = [name for name, ok in zip(layers.names, layers.converged) if not ok]
    if missed:
        warnings.warn(f"step {c.step}: layer_lambda_max solves of {', '.join(missed)} stopped above --eig-tol {c.tol:g}")
    values = {"layer_sharpness": Estimate(math.nan, math.nan, layers.probes, layers.hvps, layers.seconds)}
    for i, name in enumerate(layers.names):
        values.update({f"layer_lambda_max/{name}": layers.lambda_max[i], f"layer_trace/{name}": layers.trace[i],
                       f"layer_trace_se/{name}": layers.trace_se[i]})
    return values


def _layer_columns(cfg, model) -> list[str]:
    if model is None:
        return []
    names = [name for name, _ in spectrum.parameter_groups(model, cfg.layer_groups)]
    return [f"{kind}/{name}" for kind in ("layer_lambda_max", "layer_trace", "layer_trace_se") for name in names]


def _spectral_density(c: Context) -> dict:
    cfg = c.cfg
    density = spectrum.spectral_density(*_data(c), generator=c.generator(), probes=cfg.density_probes,
                                        steps=cfg.density_steps, chunk_size=cfg.hvp_chunk,
                                        exact=cfg.exact_measurements)
    if c.folder is not None:
        folder = os.path.join(c.folder, "density")
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, f"step_{c.step}.csv"), density.grid_csv())
        atomic_write_text(os.path.join(folder, f"step_{c.step}_nodes.csv"), density.nodes_csv())
    # Half the stability threshold: where a step of size eta moves the loss along an eigenvector
    # at half the rate that would make it diverge.
    mass = exact_estimate(density.mass_above(c.threshold / 2), 0, 0.0)
    return {"density_trace": density.trace(), "density_mass_above": mass}


def _eigenvalues(cfg, model=None) -> list[str]:
    return [f"lambda_{i}" for i in range(2, cfg.num_eigenvalues + 1)]


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("lambdamax", "full-batch top Hessian eigenvalue lambda_max",
                (Column("lambda_max", "λ_max", (Curve(r"$\lambda_{\max}$"),), extra=_eigenvalues, ylabel=r"$\lambda_{\max}(H)$"),),
                _lambda_max, final="always", final_float64=True),
    Measurement("batch_sharpness", "E_B[g_B^T H_B g_B / |g_B|^2] over random batches",
                (Column("batch_sharpness", "Batch Sharpness", (Curve(r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$"),), with_se=True,
                        ylabel=r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$"),),
                _batch_sharpness, final="always", final_stream="final", partition_draws=True, draws_batches=True),
    Measurement("step_sharpness", "the same Rayleigh quotient on the step's own batch",
                (Column("step_sharpness", "step sharpness", (Curve("raw", faint=True), Curve("smoothed", smooth=True)),
                        ylabel=r"$g_B^\top H_B g_B/\|g_B\|^2$, step's $B$"),),
                _step_sharpness, cadence=(20, 180), final="never"),
    Measurement("gni", "gradient-noise interaction E_B[g_B^T H g_B] / |g|^2",
                (Column("gni", "GNI", (Curve(r"$\mathbb{E}_B[g_B^\top H g_B]/\|g\|^2$"),), with_se=True,
                        ylabel=r"$\mathbb{E}_B[g_B^\top H g_B]/\|g\|^2$"),),
                _gni, cadence=(5, 20), final="always", final_stream="final_gni", closed_form=True, draws_batches=True),
    Measurement("batch_sharpness_ratio", "E_B[g_B^T H_B g_B] / E_B[|g_B|^2] (ratio of means)",
                (Column("batch_sharpness_ratio", "Batch Sharpness", (Curve(r"$\mathbb{E}_B[g_B^\top H_B g_B]/\mathbb{E}_B[\|g_B\|^2]$", dashed=True),),
                        with_se=True),),
                _batch_sharpness_ratio, partition_draws=True, draws_batches=True),
    Measurement("batch_lambdamax", "mean top eigenvalue of mini-batch Hessians E_B[lambda_max(H_B)]",
                (Column("batch_lambda_max", "λ_max", (Curve(r"$\mathbb{E}_B[\lambda_{\max}(H_B)]$", dashed=True),), with_se=True),),
                _batch_lambdamax, cadence=(5, 20), draws_batches=True),
    Measurement("hessian_trace", "tr(H) by Hutchinson's estimator with Rademacher probes",
                (Column("hessian_trace", "Hessian trace", (Curve(r"$\mathrm{tr}\,H$"),), with_se=True, ylabel=r"$\mathrm{tr}\,H$"),),
                _hessian_trace, cadence=(5, 20), line=None),
    Measurement("gauss_newton", "lambda_max and Batch Sharpness of the Gauss-Newton matrix",
                (Column("gn_lambda_max", "Gauss–Newton", (Curve(r"$\lambda_{\max}(G)$"),), ylabel="curvature of $G$"),
                 Column("gn_batch_sharpness", "Gauss–Newton", (Curve(r"$\mathbb{E}_B[g_B^\top G_B g_B/\|g_B\|^2]$", dashed=True),), with_se=True)),
                _gauss_newton, partition_draws=True, draws_batches=True),
    Measurement("gradient_norm", "E_B[|g_B|^2] and |g|^2",
                (Column("grad_norm_sq_batch", "gradient norm²", (Curve(r"$\mathbb{E}_B\|g_B\|^2$"),), with_se=True,
                        ylabel="squared gradient norm"),
                 Column("grad_norm_sq_full", "gradient norm²", (Curve(r"$\|g\|^2$", dashed=True),))),
                _gradient_norm, cadence=(20, 180), line=None, log_scale=True, closed_form=True,
                draws_batches=True),
    Measurement("momentum_sharpness", "E_B[s^T H_B s] / E_B[s^T g_B] along the momentum update s (needs --momentum)",
                (Column("momentum_sharpness", "momentum sharpness", (Curve(r"$\mathbb{E}_B[s^\top H_B s]/\mathbb{E}_B[s^\top g_B]$"),), with_se=True,
                        ylabel=r"$\mathbb{E}_B[s^\top H_B s]/\mathbb{E}_B[s^\top g_B]$"),),
                _momentum_sharpness, needs="momentum", needs_reason="measures the momentum update", draws_batches=True),
    Measurement("preconditioned_sharpness",
                "lambda_max of Adam's preconditioned Hessian P^-1/2 H P^-1/2 over the coordinates Adam has seen (needs --adam)",
                (Column("preconditioned_sharpness", "preconditioned sharpness", (Curve(r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$"),),
                        ylabel=r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$"),
                 Column("preconditioned_unseen")),
                _preconditioned_sharpness, needs="adam", needs_reason="measures Adam's preconditioner", line="preconditioned"),
    Measurement("param_distance", "|theta - theta_0| to the initialisation (or --param-file)",
                (Column("param_distance", "distance to θ₀", (Curve(r"$\|\theta - \theta_0\|$"),), ylabel=r"$\|\theta - \theta_0\|_2$"),),
                _param_distance, cadence=(50, 100), line=None),
    Measurement("lambda_min", "smallest (most negative) full-batch Hessian eigenvalue lambda_min by shifted Lanczos",
                (Column("lambda_min", "λ_max", (Curve(r"$\lambda_{\min}$", dashed=True),)),),
                _lambda_min, final_float64=True),
    Measurement("gradient_overlap", "share |P_k g|^2/|g|^2 of the full-batch and of mini-batch gradients in the "
                "top-k Hessian eigenspace (--gradient-overlap K, default 1)",
                (Column("grad_overlap_full", "gradient in top-k eigenspace", (Curve(r"$\|P_k g\|^2/\|g\|^2$"),),
                        ylabel=r"share of $\|g\|^2$ in span$(u_1 \ldots u_k)$"),
                 Column("grad_overlap_batch", "gradient in top-k eigenspace", (Curve(r"$\mathbb{E}_B[\|P_k g_B\|^2/\|g_B\|^2]$", dashed=True),),
                        with_se=True)),
                _gradient_overlap, line=None, argument="K", draws_batches=True),
    Measurement("layer_sharpness", "lambda_max and Hutchinson trace of each diagonal Hessian block "
                "(per parameter tensor, or per module with --layer-groups module)",
                (Column("layer_sharpness", extra=_layer_columns, valued=False),),
                _layer_sharpness, cadence=(5, 20), final="never"),
    Measurement("spectral_density", "Hessian eigenvalue density by stochastic Lanczos quadrature "
                "(--density-probes, --density-steps) into density/step_<N>.csv",
                (Column("density_trace", "Hessian trace", (Curve(r"$\mathrm{tr}\,H$ by SLQ", dashed=True),), with_se=True),
                 Column("density_mass_above")),
                _spectral_density, cadence=(2, 5), final="never", line=None),
)
BY_NAME = {m.name: m for m in MEASUREMENTS}
NAMES = tuple(BY_NAME)
