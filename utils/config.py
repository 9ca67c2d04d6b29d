"""Run configuration: the command-line flags of ``training.py``, their defaults and validation.

:class:`RunConfig` holds every setting of a run with defaults resolved. It is written to the
run folder's ``config.json`` and is enough to rebuild data, model and optimiser without the
command line. All checks of user input live in :func:`validate`, so every mistake ends in one
:class:`~utils.errors.UserError` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from utils.cli import OneLineParser
from utils.data import DATASET_NAMES, is_data_file
from utils.devices import check_device_name
from utils.eigs import EIG_METHODS, EIG_TOL
from utils.errors import UserError
from utils.losses import LOSS_NAMES
from utils.models import ACTIVATIONS, MODEL_NAMES
from utils.noise import DEFAULT_REFRESH, NOISE_MODES
from utils.registry import MEASUREMENTS
from utils.spectrum import DENSITY_PROBES, DENSITY_STEPS, LAYER_GROUPINGS
from utils.trackers import check_installed
from utils.user_files import is_model_file

CONFIG_VERSION = 1
ADAM_BETAS = (0.9, 0.999)  # the (beta_1, beta_2) of every Adam run


def _with_measurement_settings(cls):
    """Add every registry measurement's switch ``<name>: bool = False`` (``int = 0`` for a flag
    that takes an argument) after ``eig_tol`` and its cadence ``<name>_every: int | None = None``
    after ``measure_every``, where config.json has always had them, so that a measurement is
    added in the registry alone."""
    annotations = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        if name == "eig_tol":
            for m in MEASUREMENTS:
                annotations[m.name] = "int" if m.argument else "bool"
                setattr(cls, m.name, 0 if m.argument else False)
        elif name == "measure_every":
            for m in MEASUREMENTS:
                annotations[f"{m.name}_every"] = "int | None"
                setattr(cls, f"{m.name}_every", None)
    cls.__annotations__ = annotations
    return cls


@dataclass
@_with_measurement_settings
class RunConfig:
    # data
    dataset: str = "digits"
    num_data: int | None = None
    classes: list[int] | None = None
    input_shape: list[int] | None = None
    num_classes: int = 10
    dataset_seed: int = 888
    download: bool = False
    dataset_sha256: str | None = None  # of a --dataset file, recorded when the run starts
    # model
    model: str = "mlp"
    width: int | None = None  # None: the model's default (utils.models.resolved_shape), resolved by build()
    depth: int | None = None
    heads: int | None = None
    patch: int | None = None
    model_args: dict | None = None
    model_sha256: str | None = None  # of a --model file, recorded when the run starts
    activation: str = "relu"
    init_scale: float = 0.2
    init_seed: int = 8888
    no_init: bool = False
    # optimisation
    loss: str = "mse"
    lr: float = 0.05
    batch: int = 64
    momentum: float = 0.0
    nesterov: bool = False
    adam: bool = False
    steps: int | None = None
    epochs: int | None = None
    data_ordering_seed: int = 1
    stop_loss: float | None = None
    # logging and checkpoints
    full_loss_every: int | None = None
    log_every: int = 1
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    wandb: bool = False
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] | None = None
    tensorboard: bool = False
    # measurements: the switch and cadence of each registry entry are added by the decorator
    num_eigenvalues: int = 1
    eig_method: str = "lanczos"
    eig_tol: float = EIG_TOL
    param_file: str | None = None
    final: bool = False
    measure_every: int | None = None
    hvp_chunk: int | None = None
    measure_seed: int = 0
    exact_measurements: bool = False
    layer_groups: str = "tensor"
    density_probes: int = DENSITY_PROBES
    density_steps: int = DENSITY_STEPS
    # noise baselines (replace the SGD step)
    gd_noise: str | None = None
    noise_mag: float | None = None
    sde: bool = False
    sde_h: float | None = None
    noise_seed: int = 0
    noise_refresh: int = DEFAULT_REFRESH
    noise_chunk: int | None = None
    # where and how
    cpu: bool = False
    device: str | None = None
    tf32: bool = False
    quiet: bool = False
    run_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        if not isinstance(values, dict):
            raise UserError(f"config is a {type(values).__name__}, not a mapping of settings; the run folder is damaged")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"config has unknown settings {', '.join(unknown)}; it was written by a newer EOSS, update the code")
        # A hand-edited config.json must fail here, in one line, rather than deep inside a run.
        for name, value in values.items():
            if not _fits(value, fields[name]):
                raise UserError(f"config setting {name} = {value!r} is not of type {fields[name]}; the run folder is damaged")
        return cls(**values)


def _fits(value, annotation: str) -> bool:
    """Whether a JSON value has the type of a RunConfig field annotated ``annotation`` (an int is a float)."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {"None": lambda v: v is None, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "int": integer, "float": lambda v: integer(v) or isinstance(v, float),
              "list[int]": lambda v: isinstance(v, list) and all(integer(item) for item in v),
              "list[str]": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
              "dict": lambda v: isinstance(v, dict)}
    return any(checks[kind](value) for kind in annotation.split(" | "))


DEFAULT_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    """The ``training.py`` command line; defaults come from :class:`RunConfig`."""
    d = RunConfig()
    p = OneLineParser(prog="training.py", description="Train a network with SGD and measure its curvature.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help=f"one of {', '.join(DATASET_NAMES)} (default digits, offline), or path/to/file.npz with arrays "
                        "x_train, y_train and optionally x_test, y_test")
    g.add_argument("--num-data", type=int, default=None, help="training subset size n (default: the whole training split)")
    g.add_argument("--classes", type=int, nargs="+", default=None, help="keep only these labels (two classes with mse: one ±1 output)")
    g.add_argument("--input-shape", default=None, help="synthetic data: input shape such as 3,32,32")
    g.add_argument("--num-classes", type=int, default=d.num_classes, help="synthetic data: number of classes")
    g.add_argument("--dataset-seed", type=int, default=d.dataset_seed, help="seed of the --num-data subset")
    g.add_argument("--download", action="store_true", help="fetch missing torchvision data sets into $DATASETS")
    g.add_argument("--allow-changed-data", action="store_true",
                   help="resume or analyse a run whose --dataset file changed since it started")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help=f"one of {', '.join(MODEL_NAMES)}, or path/to/file.py:function (function(input_shape, num_outputs) "
                        "returns the nn.Module)")
    g.add_argument("--model-args", default=None, metavar="JSON", help="keyword arguments of a model file's function, such as '{\"depth\": 6}'")
    g.add_argument("--allow-changed-model", action="store_true",
                   help="resume or analyse a run whose --model file changed since it started")
    g.add_argument("--width", type=int, default=None, help="mlp and vit width (default: mlp 512, vit 64)")
    g.add_argument("--depth", type=int, default=None, help="mlp hidden layers, vit blocks (default 2)")
    g.add_argument("--heads", type=int, default=None, help="vit attention heads (default 4)")
    g.add_argument("--patch", type=int, default=None, help="vit patch side (default 2 on images up to 16x16, else 4)")
    g.add_argument("--activation", default=d.activation, help=f"one of {', '.join(ACTIVATIONS)}")
    g.add_argument("--init-scale", type=float, default=d.init_scale, help="multiplies the Kaiming-normal initial weights (built-in models)")
    g.add_argument("--init-seed", type=int, default=d.init_seed, help="seed of the initial weights")
    g.add_argument("--no-init", action="store_true", help="keep PyTorch's default initialisation")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", default=d.loss, help="mse (sum over outputs, no 1/2, mean over samples) or ce")
    g.add_argument("--lr", type=float, default=d.lr, help="step size eta")
    g.add_argument("--batch", type=int, default=d.batch, help="mini-batch size b")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD heavy-ball momentum mu")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum)")
    g.add_argument("--adam", action="store_true", help=f"Adam with betas {ADAM_BETAS} instead of SGD")
    g.add_argument("--steps", type=int, default=None, help=f"number of steps (default {DEFAULT_STEPS})")
    g.add_argument("--epochs", type=int, default=None, help="number of epochs instead of --steps")
    g.add_argument("--data-ordering-seed", type=int, default=d.data_ordering_seed, help="seed of the per-epoch shuffles")
    g.add_argument("--stop-loss", type=float, default=None, help="stop once the full training loss is below this")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--full-loss-every", type=int, default=None, help="full training loss cadence (default: dense early)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="write every k-th step to results.txt")
    g.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint cadence in steps (default: about 20 per run)")
    g.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest K checkpoints (default: all)")
    g.add_argument("--wandb", action="store_true", help="mirror rows, config and summary to Weights & Biases (offline unless WANDB_MODE is set)")
    g.add_argument("--wandb-project", default=None, help="with --wandb: the W&B project (default: $WANDB_PROJECT, else eoss)")
    g.add_argument("--wandb-group", default=None, help="with --wandb: the W&B group of the run (sweep.py sets it to the sweep's name)")
    g.add_argument("--wandb-tags", nargs="+", default=None, metavar="TAG", help="with --wandb: W&B tags of the run")
    g.add_argument("--tensorboard", action="store_true", help="mirror rows, config and summary to TensorBoard event files in <run>/tensorboard")
    g = p.add_argument_group("measurements")
    for m in MEASUREMENTS:
        if m.argument:
            g.add_argument(m.flag, type=int, nargs="?", const=1, default=0, metavar=m.argument, help=m.help)
        else:
            g.add_argument(m.flag, action="store_true", help=m.help)
    g.add_argument("--num-eigenvalues", type=int, default=d.num_eigenvalues, help="top-k eigenvalues with --lambdamax")
    g.add_argument("--eig-method", default=d.eig_method, help=f"one of {', '.join(EIG_METHODS)}")
    g.add_argument("--eig-tol", type=float, default=d.eig_tol, help="relative residual tolerance of the eigen-solver")
    g.add_argument("--param-file", metavar="PATH", default=None,
                   help="with --param-distance: measure the distance to this saved state dict instead")
    g.add_argument("--final", action="store_true", help="measure lambda_max, batch sharpness and GNI at the end into final.json")
    g.add_argument("--measure-every", type=int, default=None, help="cadence of every measurement")
    for m in MEASUREMENTS:
        g.add_argument(f"{m.flag}-every", type=int, default=None, help=f"cadence of {m.flag} (overrides --measure-every)")
    g.add_argument("--hvp-chunk", type=int, default=None, help="samples per chunk of full-batch Hessian products (bounds memory)")
    g.add_argument("--measure-seed", type=int, default=d.measure_seed, help="seed of the Monte Carlo batches of measurements")
    g.add_argument("--exact-measurements", action="store_true",
                   help="measure by the plain double-backward path instead of the fast one (same values to round-off; for checking)")
    g.add_argument("--layer-groups", default=d.layer_groups,
                   help="with --layer-sharpness: one Hessian block per parameter tensor (default) or per module")
    g.add_argument("--density-probes", type=int, default=d.density_probes,
                   help=f"with --spectral-density: Rademacher probes (default {DENSITY_PROBES})")
    g.add_argument("--density-steps", type=int, default=d.density_steps,
                   help=f"with --spectral-density: Lanczos steps per probe (default {DENSITY_STEPS})")
    g = p.add_argument_group("noise baselines (replace the SGD step; --batch sets the noise scale)")
    g.add_argument("--gd-noise", default=None, help=f"full-batch GD plus noise: one of {', '.join(NOISE_MODES)}")
    g.add_argument("--noise-mag", type=float, default=None, help="with --gd-noise const: the noise is noise-mag/sqrt(batch) N(0, I)")
    g.add_argument("--sde", action="store_true", help="integrate the SDE of SGD over each step of time lr (needs --sde-h)")
    g.add_argument("--sde-h", type=float, default=None, help="with --sde: Euler-Maruyama sub-step, at most --lr")
    g.add_argument("--noise-seed", type=int, default=d.noise_seed, help="seed of the injected noise")
    g.add_argument("--noise-refresh", type=int, default=d.noise_refresh,
                   help=f"diag and iso: recompute the gradient covariance every k steps (default {DEFAULT_REFRESH})")
    g.add_argument("--noise-chunk", type=int, default=None,
                   help="diag and iso: samples per chunk of per-sample gradients (default: about 2^26 numbers per chunk)")
    g = p.add_argument_group("where and how")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA when available, else the CPU); "
                                                  "a device this machine lacks is an error")
    g.add_argument("--cpu", action="store_true", help="the same as --device cpu")
    g.add_argument("--tf32", action="store_true",
                   help="allow TF32 rounding in CUDA matrix products and convolutions (default: off, exact float32)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g.add_argument("--run-dir", default=None, help="write the run exactly into this folder instead of $RESULTS/...")
    g = p.add_argument_group("continuing runs")
    g.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run folder from its newest checkpoint")
    g.add_argument("--resume-step", type=int, default=None, help="with --resume: continue from the checkpoint at this step")
    g.add_argument("--cont-run", metavar="RUN_DIR", default=None, help="start a new run (a fork) from a checkpoint of this run")
    g.add_argument("--cont-step", type=int, default=None, help="with --cont-run: fork from the newest checkpoint at or before this step")
    return p


def explicit_settings(argv: list[str]) -> dict:
    """Only the flags actually given on the command line, as {dest: value}."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**settings_from_args(vars(args)))


def settings_from_args(values: dict) -> dict:
    """The RunConfig fields among parsed arguments, with --input-shape turned into a list."""
    values = dict(values)
    if values.get("input_shape") is not None:
        try:
            values["input_shape"] = [int(part) for part in str(values["input_shape"]).split(",")]
        except ValueError:
            raise UserError(f"--input-shape {values['input_shape']!r} is not a comma-separated list of integers; write it like 3,32,32")
    if isinstance(values.get("model_args"), str):
        try:
            values["model_args"] = json.loads(values["model_args"])
        except ValueError as exc:
            raise UserError(f"--model-args is not valid JSON ({exc}); write it like '{{\"depth\": 6}}'")
        if not isinstance(values["model_args"], dict):
            raise UserError("--model-args must be a JSON object of keyword arguments, such as '{\"depth\": 6}'")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in values.items() if k in known}


# What a measurement's ``needs`` asks of the run, and how its error names it.
_NEEDS = {"momentum": (lambda cfg: cfg.momentum > 0, "--momentum > 0"), "adam": (lambda cfg: cfg.adam, "--adam")}


def validate(cfg: RunConfig) -> None:
    """Check every setting a user can get wrong; raise one UserError line naming the fix."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    need(cfg.dataset in DATASET_NAMES or is_data_file(cfg.dataset),
         f"unknown data set {cfg.dataset!r}; choose one of {', '.join(DATASET_NAMES)} or pass path/to/file.npz")
    need(cfg.model in MODEL_NAMES or is_model_file(cfg.model),
         f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)} or pass path/to/file.py:function")
    need(cfg.model_args is None or is_model_file(cfg.model), "--model-args only applies to --model path/to/file.py:function")
    need(cfg.heads is None and cfg.patch is None or cfg.model == "vit", "--heads and --patch only apply to --model vit")
    need(cfg.loss in LOSS_NAMES, f"unknown loss {cfg.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
    need(cfg.activation in ACTIVATIONS, f"unknown activation {cfg.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    need(cfg.eig_method in EIG_METHODS, f"unknown --eig-method {cfg.eig_method!r}; choose one of {', '.join(EIG_METHODS)}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    need(cfg.batch >= 1, f"--batch must be at least 1, got {cfg.batch}")
    need(cfg.steps is None or cfg.epochs is None, "give either --steps or --epochs, not both")
    need(cfg.steps is None or cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}")
    need(cfg.epochs is None or cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
    need(cfg.num_data is None or cfg.num_data >= 1, f"--num-data must be at least 1, got {cfg.num_data}")
    need(math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(not (cfg.adam and cfg.momentum > 0), "--momentum and --adam cannot be combined; drop one of them")
    need(not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0")
    need(not (cfg.adam and cfg.nesterov), "--nesterov and --adam cannot be combined; drop one of them")
    need(cfg.init_scale > 0 and math.isfinite(cfg.init_scale), f"--init-scale must be positive, got {cfg.init_scale}")
    need((cfg.width is None or cfg.width >= 1) and (cfg.depth is None or cfg.depth >= 1), "--width and --depth must be at least 1")
    need(cfg.heads is None or cfg.heads >= 1, f"--heads must be at least 1, got {cfg.heads}")
    need(cfg.patch is None or cfg.patch >= 1, f"--patch must be at least 1, got {cfg.patch}")
    need(cfg.num_classes >= 2, f"--num-classes must be at least 2, got {cfg.num_classes}")
    need(cfg.input_shape is None or (len(cfg.input_shape) in (1, 2, 3) and all(s >= 1 for s in cfg.input_shape)),
         "--input-shape needs one to three positive sizes, such as 3,32,32")
    need(cfg.input_shape is None or cfg.dataset == "synthetic", "--input-shape only applies to --dataset synthetic")
    need(cfg.classes is None or len(set(cfg.classes)) == len(cfg.classes) and len(cfg.classes) >= 2,
         "--classes needs at least two different labels, such as --classes 1 9")
    need(cfg.num_eigenvalues >= 1, f"--num-eigenvalues must be at least 1, got {cfg.num_eigenvalues}")
    need(cfg.num_eigenvalues == 1 or cfg.eig_method != "power", "power iteration finds one eigenvalue; use --eig-method lobpcg for --num-eigenvalues > 1")
    need(0 < cfg.eig_tol < 1, f"--eig-tol must be in (0, 1), got {cfg.eig_tol}")
    need(cfg.stop_loss is None or cfg.stop_loss > 0, f"--stop-loss must be positive, got {cfg.stop_loss}")
    need(cfg.log_every >= 1, f"--log-every must be at least 1, got {cfg.log_every}")
    need(cfg.run_dir is None or cfg.run_dir.strip() != "", "--run-dir needs a folder path; drop it to get a new folder under $RESULTS")
    check_installed(cfg)
    for flag in ("wandb_project", "wandb_group", "wandb_tags"):
        need(getattr(cfg, flag) is None or cfg.wandb, f"--{flag.replace('_', '-')} only applies to --wandb; add --wandb")
    need(all(text.strip() for text in [cfg.wandb_project or "x", cfg.wandb_group or "x", *(cfg.wandb_tags or [])]),
         "--wandb-project, --wandb-group and --wandb-tags need non-empty names")
    check_device_name(cfg.device)
    need(not cfg.cpu or cfg.device in (None, "cpu"), f"--cpu and --device {cfg.device} contradict each other; give only one of them")
    need(not (cfg.final and cfg.device == "mps"),
         "--final solves lambda_max in float64, which mps lacks; drop --final and run compute_final_fullbs.py on the run "
         "(it measures on the CPU)")
    need(cfg.gd_noise is None or cfg.gd_noise in NOISE_MODES, f"unknown --gd-noise {cfg.gd_noise!r}; choose one of {', '.join(NOISE_MODES)}")
    need(not (cfg.sde and cfg.gd_noise), "--sde and --gd-noise are alternative baselines; give only one of them")
    need(cfg.noise_mag is None or cfg.gd_noise == "const", "--noise-mag only applies to --gd-noise const")
    need(cfg.gd_noise != "const" or cfg.noise_mag is not None, "--gd-noise const needs --noise-mag sigma")
    need(cfg.noise_mag is None or (math.isfinite(cfg.noise_mag) and cfg.noise_mag >= 0), f"--noise-mag must be a non-negative number, got {cfg.noise_mag}")
    need(cfg.sde_h is None or cfg.sde, "--sde-h only applies to --sde")
    need(not cfg.sde or cfg.sde_h is not None, "--sde needs --sde-h h, the Euler-Maruyama sub-step (at most --lr)")
    need(cfg.sde_h is None or (math.isfinite(cfg.sde_h) and 0 < cfg.sde_h <= cfg.lr),
         f"--sde-h must be in (0, --lr] = (0, {cfg.lr:g}], got {cfg.sde_h}")
    need(not cfg.sde or (cfg.momentum == 0 and not cfg.adam), "--sde models plain SGD; drop --momentum and --adam")
    for m in MEASUREMENTS:
        if m.needs and getattr(cfg, m.name):
            present, wanted = _NEEDS[m.needs]
            need(present(cfg), f"{m.flag} {m.needs_reason}; it needs {wanted}")
    need(cfg.param_file is None or cfg.param_distance, "--param-file only applies to --param-distance; add --param-distance")
    need(cfg.gradient_overlap >= 0, f"--gradient-overlap K needs K >= 1 eigenvectors, got {cfg.gradient_overlap}")
    need(cfg.layer_groups in LAYER_GROUPINGS, f"unknown --layer-groups {cfg.layer_groups!r}; choose one of {', '.join(LAYER_GROUPINGS)}")
    for flag in ("full_loss_every", "checkpoint_every", "keep_checkpoints", "measure_every", "hvp_chunk", "noise_refresh",
                 "noise_chunk", "density_probes", "density_steps", *(f"{m.name}_every" for m in MEASUREMENTS)):
        value = getattr(cfg, flag)
        need(value is None or value >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def check_cadences_have_measurements(cfg: RunConfig, given=None) -> None:
    """Refuse a per-measurement cadence (``--lambdamax-every`` ...) whose measurement is off:
    the run would silently measure nothing. ``given`` limits the check to those settings (a
    fork answers for its own flags, not its parent's). Only runs about to start are checked,
    so that stored runs with such a setting stay readable."""
    for m in MEASUREMENTS:
        cadence = f"{m.name}_every"
        if getattr(cfg, cadence) is not None and not getattr(cfg, m.name) and (given is None or cadence in given):
            raise UserError(f"{m.flag}-every paces {m.flag}, which is off; add {m.flag} or drop {m.flag}-every")


def results_root() -> str:
    return os.environ.get("RESULTS") or "./results"


def datasets_root() -> str:
    return os.environ.get("DATASETS") or "./datasets"
