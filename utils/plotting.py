"""Figures of runs: training curves of one or several runs, and sharpness plateaus against batch size.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no display, no
global backend switch), sized for a two-column paper (7 inches wide, 8-point text), and saved
as PNG and PDF through temporary files, so a reader never sees half a figure.

Both kinds of figure share the labels, panel layout, thresholds and saving, which keeps them in
one module of about 500 lines.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, replace

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatterSciNotation, NullLocator

from utils.analysis import stability_label, stability_threshold
from utils.errors import UserError
from utils.registry import MEASUREMENTS, Curve
from utils.results import atomic_write_bytes
from utils.runs import make_output_folder, unwritable

PAPER_WIDTH = 7.0  # inches, the text width of a two-column paper
PANEL_HEIGHT = 2.0
# Agg draws at most 2^16 - 1 pixels a side; the total keeps its RGBA buffer (4 bytes a pixel) at
# 512 MiB, which a 7-inch figure reaches near 1500 dpi, above any print resolution.
MAX_PNG_SIDE = 2 ** 16 - 1
MAX_PNG_PIXELS = 2 ** 27
# matplotlib's tick locators overflow on axis ranges near the float64 maximum (1.8e308); values
# that large come only from diverged runs and are left out of the figure, as inf is.
MAX_DRAWN = 1e300
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.0}
# Settings that say how a run was executed, logged or measured, not what it trained: never used
# to tell runs apart in a legend (nor are the cadences, the settings ending in _every).
_NOT_DISTINGUISHING = {"run_dir", "quiet", "cpu", "device", "tf32", "download", "wandb", "wandb_project", "wandb_group",
                       "wandb_tags", "tensorboard", "checkpoint_every",
                       "keep_checkpoints", "num_eigenvalues", "eig_method", "eig_tol", "final", "hvp_chunk",
                       "measure_seed", "param_file", "exact_measurements", "noise_chunk", "layer_groups",
                       "density_probes", "density_steps",
                       *(m.name for m in MEASUREMENTS)}


@dataclass(frozen=True)
class Panel:
    """A panel is drawn when the results hold any of its columns.

    ``stability``: the optimiser's stability line applies (SGD and momentum runs);
    ``preconditioned``: Adam's 38/η line applies (it bounds the preconditioned Hessian only).
    ``ylabel``: the y-axis label in math text (none: the title).
    """

    title: str
    curves: tuple[Curve, ...]
    log: bool = False
    stability: bool = False
    preconditioned: bool = False
    ylabel: str | None = None

    @property
    def curvature(self) -> bool:
        """Whether the panel draws a curvature compared with a stability line (what --normalize divides)."""
        return self.stability or self.preconditioned


def _measurement_panels() -> tuple[Panel, ...]:
    """The registry's panels in the order they first appear, each with the curves of every
    column drawn in it; a panel takes its axis and threshold line from its first measurement."""
    panels: dict[str, Panel] = {}
    for m in MEASUREMENTS:
        for column in (column for column in m.columns if column.panel):
            curves = tuple(replace(curve, column=column.name) for curve in column.curves)
            if column.panel in panels:
                panel = panels[column.panel]
                panels[column.panel] = replace(panel, curves=panel.curves + curves, ylabel=panel.ylabel or column.ylabel)
            else:
                panels[column.panel] = Panel(column.panel, curves, log=m.log_scale, stability=m.line == "stability",
                                             preconditioned=m.line == "preconditioned", ylabel=column.ylabel)
    return tuple(panels.values())


PANELS = (
    Panel("loss", (Curve("step's batch", faint=True, column="batch_loss"), Curve("full training set", column="full_loss")),
          log=True, ylabel="training loss"),
    *_measurement_panels(),
    Panel("accuracy", (Curve("train", column="full_accuracy"),), ylabel="accuracy"),
)
# A curve with at most this many points is drawn with a marker at each: a line alone hides
# where the measurements are, and between them it is an interpolation.
SPARSE_POINTS = 60
# The band around an estimate with a standard error spans this many of them each side.
SE_BAND = 2


LAMBDA_MAX = r"$\lambda_{\max}$"
BATCH_SHARPNESS = r"$\mathbb{E}_B[g_B^\top H_B g_B/\|g_B\|^2]$"
# The minus in math text, as λ_max beside it: a bare U+2212 falls back to another font's glyph.
GAP = r"Batch Sharpness $-$ " + LAMBDA_MAX


def math_title(title: str) -> str:
    """A panel title with λ_max written in math text (registry panels are named in plain text)."""
    return title.replace("λ_max", LAMBDA_MAX)


class _PlainLogFormatter(LogFormatterSciNotation):
    """Log-axis labels as plain numbers (0.3, 0.6, 1) on axes spanning less than two decades,
    where matplotlib labels minor ticks too and 6×10⁻¹-style text crowds a narrow panel; past
    one decade only the 1, 2, 5 steps keep their labels."""

    def __call__(self, x, pos=None):
        text = super().__call__(x, pos)
        low, high = sorted(self.axis.get_view_interval())
        if not text or low <= 0 or high / low >= 100:
            return text
        leading = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
        return f"{x:.3g}" if high / low < 10 or leading in (1, 2, 5) else ""


def use_plain_log_labels(ax) -> None:
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def new_figure(nrows: int, ncols: int, height: float | None = None) -> tuple[Figure, list]:
    fig = Figure(figsize=(PAPER_WIDTH, height or PANEL_HEIGHT * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def check_png_size(fig: Figure, dpi: int) -> None:
    """A PNG of ``fig`` at ``dpi`` larger than Agg can draw or than :data:`MAX_PNG_PIXELS` is a
    UserError naming its size and the largest --dpi that fits."""
    width, height = fig.get_size_inches()
    pixels = int(width * dpi), int(height * dpi)
    if max(pixels) <= MAX_PNG_SIDE and pixels[0] * pixels[1] <= MAX_PNG_PIXELS:
        return
    largest = math.floor(min(MAX_PNG_SIDE / max(width, height), math.sqrt(MAX_PNG_PIXELS / (width * height))))
    raise UserError(f"--dpi {dpi} makes the PNG {pixels[0]} x {pixels[1]} pixels, but figures are drawn up to "
                    f"{MAX_PNG_SIDE} pixels a side and {MAX_PNG_PIXELS} in all; the largest --dpi that fits this "
                    f"figure is {largest}")


def render_figure(fig: Figure, dpi: int = 150) -> dict[str, bytes]:
    """``fig`` as PNG and PDF files in memory, keyed by format; a PNG too large to draw is a
    UserError (:func:`check_png_size`). Drawing everything before writing anything means a figure
    that fails to draw leaves no file, nor an output folder, behind."""
    check_png_size(fig, dpi)
    images = {}
    for fmt in ("png", "pdf"):
        buffer = io.BytesIO()
        # Dates and software names in the metadata would make identical figures differ.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
        images[fmt] = buffer.getvalue()
    return images


def write_figure(images: dict[str, bytes], folder: str, stem: str) -> list[str]:
    """Write :func:`render_figure`'s files as ``stem``.<format> into ``folder`` (created if
    needed) atomically; return their paths. An unwritable place is a UserError."""
    make_output_folder(folder)
    written = []
    for fmt, data in images.items():
        path = os.path.join(folder, f"{stem}.{fmt}")
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise unwritable(path, exc)
        written.append(path)
    return written


def save_figure(fig: Figure, folder: str, stem: str, dpi: int = 150) -> list[str]:
    """Write ``stem``.png and ``stem``.pdf of ``fig`` into ``folder``; return their paths."""
    return write_figure(render_figure(fig, dpi), folder, stem)


def dynamics_label(cfg) -> str:
    """What replaced (or not) the SGD step: ``SGD``, ``GD + diagonal noise``, ``SGD SDE (h=0.01)``, ..."""
    if cfg.sde:
        return f"SGD SDE (h={cfg.sde_h:g})"
    if cfg.gd_noise == "sgd":
        return "GD + SGD noise (Σ/b)"
    if cfg.gd_noise == "diag":
        return "GD + diagonal noise"
    if cfg.gd_noise == "iso":
        return "GD + isotropic noise"
    if cfg.gd_noise == "const":
        return f"GD + constant noise σ={cfg.noise_mag:g}"
    return "SGD"


def run_title(cfg) -> str:
    """A one-line description of a run's settings, such as ``digits · mlp · mse · SGD · η=0.05 · b=64``."""
    parts = [cfg.dataset, cfg.model, cfg.loss, dynamics_label(cfg), f"η={cfg.lr:g}", f"b={cfg.batch}"]
    if cfg.adam:
        parts.append("Adam")
    elif cfg.momentum:
        parts.append(f"{'Nesterov ' if cfg.nesterov else ''}μ={cfg.momentum:g}")
    return " · ".join(parts)


def _differing_settings(configs: list[dict]) -> list[str]:
    return [key for key in configs[0]
            if key not in _NOT_DISTINGUISHING and not key.endswith("_every") and any(c[key] != configs[0][key] for c in configs)]


def legend_order(runs) -> list[int]:
    """Indices of ``runs`` sorted by the settings in which they differ, in config order and
    numerically where numbers (batch=16, 32, 64, 1497), so colours follow the settings; runs
    that differ in nothing keep their order."""
    configs = [run.cfg.to_dict() for run in runs]
    differing = _differing_settings(configs)

    def rank(value):
        if value is None:
            return (0, 0, "")
        if isinstance(value, (int, float)):  # bools included: off before on
            return (1, value, "")
        return (2, 0, str(value))

    return sorted(range(len(runs)), key=lambda i: tuple(rank(configs[i][key]) for key in differing))


# How a setting is named in a legend; the others by their flag name.
SETTING_SYMBOLS = {"lr": "η", "batch": "b", "momentum": "μ", "init_scale": "init scale", "init_seed": "init seed",
                   "data_ordering_seed": "order seed", "num_data": "n"}


def full_batch(run) -> bool:
    """Whether every step of ``run`` used the whole training set (plain GD)."""
    n = ((getattr(run, "record", None) or {}).get("resolved") or {}).get("num_train")
    return n is not None and run.cfg.batch >= n and not run.cfg.gd_noise and not run.cfg.sde


def run_labels(runs) -> list[str]:
    """Legend labels for overlaid runs: the settings in which their configs differ, named by
    their symbols (η=0.05, b=8); a batch of the whole training set is ``GD``, the others ``SGD``."""
    configs = [run.cfg.to_dict() for run in runs]
    differing = _differing_settings(configs)
    if not differing:
        return [run.name for run in runs]
    dynamics_keys = ("gd_noise", "sde", "sde_h", "noise_mag")
    any_gd = "batch" in differing and any(full_batch(run) for run in runs)
    labels = []
    for run, c in zip(runs, configs):
        parts = [dynamics_label(run.cfg)] if any(key in differing for key in dynamics_keys) else []
        for key in differing:
            if key in dynamics_keys:
                continue
            if key == "batch" and any_gd:
                parts.append("GD" if full_batch(run) else f"SGD, b={c[key]}")
            else:
                parts.append(f"{SETTING_SYMBOLS.get(key, key.replace('_', ' '))}={_short(c[key])}")
        labels.append(", ".join(parts))
    return labels


def _short(value) -> str:
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _drawable(values):
    return values.where(values.abs() <= MAX_DRAWN)


def _series(frame, column: str, smooth_window: int | None, smooth: bool):
    data = _drawable(frame[["step", column]]).dropna()
    values = data[column]
    if smooth and len(values) > 1:
        window = smooth_window or max(1, len(values) // 20)
        values = values.rolling(window, center=True, min_periods=1).mean()
    return data["step"].to_numpy(), values.to_numpy(), data


def _stability_applies(panel: Panel, cfg) -> bool:
    return panel.preconditioned if cfg.adam else panel.stability


def thresholds_differ(runs) -> bool:
    """Whether overlaid runs have different stability thresholds on a panel both are compared
    with (2/η at two step sizes; SGD against momentum): one axis then suits neither run."""
    for wants in (lambda cfg: not cfg.adam, lambda cfg: cfg.adam):
        thresholds = [stability_threshold(run.cfg) for run in runs if wants(run.cfg)]
        if thresholds and max(thresholds) > min(thresholds) * (1 + 1e-9):
            return True
    return False


def plot_runs(runs, frames, *, smooth: int | None = None, normalize: bool = False,
              final_test_accuracy=None) -> Figure:
    """Training curves of one or several runs; ``frames`` are their results tables.

    Panels (those with data): losses on a log scale, λ_max, Batch Sharpness with its
    standard-error band (±:data:`SE_BAND` SE), step sharpness smoothed over ``smooth``
    measurements, GNI, Gauss–Newton, momentum and preconditioned sharpness, Hessian trace,
    gradient norms, distance to the initialisation, accuracy; the dashed stability line of each
    run's optimiser where it applies. Curves of at most :data:`SPARSE_POINTS` measurements get a
    marker at each. Several runs are overlaid, one colour each, labelled by their settings and
    ordered by them (:func:`legend_order`). ``normalize`` divides every curvature curve by its
    run's stability threshold, so that every run's line is 1 (η·λ/2 for SGD).
    ``final_test_accuracy``: per run, None or (step, accuracy on the test set) at the end,
    drawn as a star in the accuracy panel.
    """
    panels = [p for p in PANELS if any(_has(f, c.column) for c in p.curves for f in frames)] + _layer_panels(frames)
    ncols = 2 if len(panels) in (2, 4) else min(3, len(panels))  # no empty slots for 2 or 4 panels
    nrows = math.ceil(len(panels) / ncols)
    overlay = len(runs) > 1
    order = legend_order(runs)
    tests = final_test_accuracy or [None] * len(runs)
    runs, frames, tests = [runs[i] for i in order], [frames[i] for i in order], [tests[i] for i in order]
    labels = run_labels(runs) if overlay else [None]
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(nrows, ncols)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes, panels):
            scaled = normalize and panel.curvature
            one_line = _common_line(panel, runs, scaled) if overlay else None
            for i, (run, frame) in enumerate(zip(runs, frames)):
                color = f"C{i % 10}" if overlay else "C0"
                _draw_panel(ax, panel, run.cfg, frame, color, overlay, smooth, scaled, own_line=one_line is None)
                if panel.title == "accuracy" and tests[i] is not None:
                    ax.plot(*tests[i], marker="*", markersize=6, linestyle="none", color=color,
                            label=None if overlay else "test (end)")
            if one_line is not None:
                ax.axhline(one_line[0], color="0.3", linestyle="--", linewidth=0.8)
            ax.set_title(math_title(panel.title) + (" ÷ stability threshold" if scaled else ""))
            ax.set_xlabel("step")
            ylabel = panel.ylabel or math_title(panel.title)
            ax.set_ylabel(f"{ylabel} ÷ threshold" if scaled else ylabel)
            if panel.log:
                ax.set_yscale("log")
                use_plain_log_labels(ax)
            handles = ax.get_legend_handles_labels()[0] if not overlay else _style_key(
                panel, runs, frames, scaled, any(t is not None for t in tests), one_line)
            if len(handles) > 1 or panel.title == "accuracy":  # name the set even when only train is drawn
                ax.legend(handles=handles, frameon=False)
        if overlay:
            _legend_above(fig, [Line2D([], [], color=f"C{i % 10}", label=label) for i, label in enumerate(labels)])
        else:
            fig.suptitle(run_title(runs[0].cfg))
    return fig


def _legend_above(fig: Figure, handles: list) -> None:
    """The legend of the runs (or groups of runs) above the panels, in as many columns as fit
    the figure's width in 7-point text (about 110 characters)."""
    widest = max(len(handle.get_label()) for handle in handles) + 6
    fig.legend(handles=handles, loc="outside upper center", ncols=max(1, min(4, len(handles), 110 // widest)),
               frameon=False)


LAYER_LAMBDA_MAX = "layer_lambda_max/"


def _layer_panels(frames) -> list[Panel]:
    """Small multiples of --layer-sharpness: one panel per layer holding λ_max of its diagonal
    Hessian block, with the stability line, in the order of the results' columns."""
    columns = []
    for frame in frames:
        columns += [c for c in frame.columns if c.startswith(LAYER_LAMBDA_MAX) and c not in columns and _has(frame, c)]
    return [Panel(f"λ_max of {c[len(LAYER_LAMBDA_MAX):]}", (Curve(r"$\lambda_{\max}(H_{kk})$", column=c),), stability=True,
                  ylabel=r"$\lambda_{\max}(H_{kk})$") for c in columns]


def plot_density(panels) -> Figure:
    """Hessian eigenvalue densities side by side, as PyHessian draws them: the density on a log
    axis (down to 10⁻⁶ of the highest peak) against the eigenvalue, with the stability line at
    ``threshold`` (not drawn when nan). Every panel has the same axes, so that the reach of the
    outliers compares at a glance. ``panels``: (title, eigenvalues, density, threshold,
    threshold_label) per panel."""
    peak = max(max(density) for _, _, density, _, _ in panels)
    low = min(min(grid) for _, grid, _, _, _ in panels)
    high = max(max([*grid, threshold if math.isfinite(threshold) else -math.inf])
               for _, grid, _, threshold, _ in panels)
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(1, len(panels), height=2.4)
        for ax, (title, grid, density, threshold, threshold_label) in zip(axes, panels):
            ax.semilogy(grid, density, color="C0")
            ax.set_ylim(peak * 1e-6, peak * 2)
            ax.set_xlim(low, high + 0.02 * (high - low))
            if math.isfinite(threshold):
                ax.axvline(threshold, color="0.3", linestyle="--", linewidth=0.8,
                           label=f"{threshold_label} = {threshold:.4g}")
                ax.legend(frameon=False, loc="upper center")  # the same place in every panel, not "best"
            ax.set_title(title)
            ax.set_xlabel("eigenvalue of $H$")
            ax.set_ylabel("density")
    return fig


def _has(frame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


def _curve_style(curve: Curve, color) -> dict:
    style = {"color": color, "linestyle": "--" if curve.dashed else "-"}
    if curve.faint:
        style.update(alpha=0.3, linewidth=0.6)
    return style


def _band_patch(color):
    return Patch(color=color, alpha=0.25, linewidth=0, label=f"±{SE_BAND} SE")


def _common_line(panel: Panel, runs, scaled: bool) -> tuple[float, str] | None:
    """The stability line (value, text) of a panel where every run it applies to has the same
    one: drawn once in grey rather than once per run on top of each other."""
    applying = [run.cfg for run in runs if _stability_applies(panel, run.cfg)]
    if not applying:
        return None
    if scaled:
        return 1.0, "threshold = 1"
    values = {stability_threshold(cfg) for cfg in applying}
    labels = {stability_label(cfg) for cfg in applying}
    if max(values) > min(values) * (1 + 1e-9) or len(labels) > 1:
        return None
    return min(values), f"{labels.pop()} = {min(values):.4g}"


def _style_key(panel: Panel, runs, frames, scaled: bool, with_test: bool, one_line=None) -> list:
    """Legend entries of an overlay panel in grey: which line style is which curve (colours
    are runs, named in the figure legend), the standard-error band and the stability line
    (dashed when all runs share it, else dotted in each run's colour)."""
    drawn = [curve for curve in panel.curves if any(_has(frame, curve.column) for frame in frames)]
    key = [Line2D([], [], label=curve.label, **_curve_style(curve, "0.3")) for curve in drawn]
    if any(_has(frame, f"{curve.column}_se") for curve in drawn for frame in frames):
        key.append(_band_patch("0.3"))
    labels = sorted({stability_label(run.cfg) for run in runs if _stability_applies(panel, run.cfg)})
    if one_line is not None:
        key.append(Line2D([], [], color="0.3", linestyle="--", linewidth=0.8, label=one_line[1]))
    elif labels:
        text = "threshold = 1" if scaled else " / ".join(labels)
        key.append(Line2D([], [], color="0.3", linestyle=":", linewidth=0.8, label=text))
    if panel.title == "accuracy" and with_test:
        key.append(Line2D([], [], color="0.3", marker="*", linestyle="none", label="test (end)"))
    return key


def _draw_panel(ax, panel: Panel, cfg, frame, color, overlay, smooth_window, scaled, own_line=True) -> None:
    applies = _stability_applies(panel, cfg)
    if scaled and not applies:
        return  # no threshold to divide by: this run's curve would be on another scale
    divisor = stability_threshold(cfg) if scaled else 1.0
    for curve in panel.curves:
        if not _has(frame, curve.column):
            continue
        steps, values, data = _series(frame, curve.column, smooth_window, curve.smooth)
        values = values / divisor
        marker = {"marker": "o", "markersize": 2.5} if len(steps) <= SPARSE_POINTS and not curve.faint else {}
        ax.plot(steps, values, label=None if overlay else curve.label, **_curve_style(curve, color), **marker)
        se = f"{curve.column}_se"
        if se in frame.columns and not curve.faint:
            spread = SE_BAND * _drawable(frame.loc[data.index, se]).fillna(0).to_numpy() / divisor
            ax.fill_between(steps, values - spread, values + spread, color=color, alpha=0.25, linewidth=0,
                            label=None if overlay else f"±{SE_BAND} SE")
    if applies and own_line:
        line = 1.0 if scaled else stability_threshold(cfg)
        text = "threshold = 1" if scaled else f"{stability_label(cfg)} = {line:.4g}"
        ax.axhline(line, color=color if overlay else "0.3", linestyle=":" if overlay else "--", linewidth=0.8,
                   label=None if overlay else text)


def plot_sharpness_gap(table) -> Figure:
    """Plateaus against batch size, one colour per step size and kind of step (SGD, a noisy-GD
    baseline, the optimiser), the mean over runs that share them and the batch size.

    Left: Batch Sharpness (solid, standard-error bars where known) and λ_max (dashed), with
    each group's stability line (dotted). Right: the gap Batch Sharpness − λ_max. A batch size
    at which the table's ``full_batch`` column says every run took the whole training set is
    labelled GD (b = n = that size).
    """
    kinds = ["dynamics", "optimizer"]
    groups = table.groupby(["lr", *kinds, "threshold", "threshold_label"], sort=True)
    differing = [kind for kind in kinds if table[kind].nunique() > 1]
    with matplotlib.rc_context(STYLE):
        fig, (left, right) = new_figure(1, 2, height=2.6)
        named = []
        for i, ((lr, dynamics, optimizer, threshold, label), group) in enumerate(groups):
            color = f"C{i % 10}"
            name = ", ".join([f"η={lr:g}", *(str({"dynamics": dynamics, "optimizer": optimizer}[k]) for k in differing)])
            by_batch = group.groupby("batch", sort=True)
            mean = by_batch[["lambda_max", "batch_sharpness", "gap"]].mean()
            se = by_batch["batch_sharpness_se"].apply(lambda s: math.sqrt((s ** 2).sum()) / len(s))
            batches = mean.index.to_numpy()
            left.errorbar(batches, mean["batch_sharpness"], yerr=se.fillna(0).to_numpy(), color=color,
                          marker="o", markersize=3, capsize=2)
            left.plot(batches, mean["lambda_max"], color=color, marker="s", markersize=3, linestyle="--")
            left.axhline(threshold, color=color, linestyle=":", linewidth=0.8)
            right.plot(batches, mean["gap"], color=color, marker="o", markersize=3)
            named.append(Line2D([], [], color=color, marker="o", markersize=3, label=name))
        left.plot([], [], color="0.3", marker="o", markersize=3, label=BATCH_SHARPNESS)
        left.plot([], [], color="0.3", marker="s", markersize=3, linestyle="--", label=LAMBDA_MAX)
        left.plot([], [], color="0.3", linestyle=":", label=" / ".join(sorted(set(table["threshold_label"]))))
        left.set_title("sharpness plateaus")
        left.set_ylabel("curvature")
        right.set_title(f"gap: {GAP}")
        right.set_ylabel(GAP)
        right.axhline(0, color="0.6", linewidth=0.6)
        batches = sorted(set(table["batch"]))
        gd = ({b for b, rows in table.groupby("batch") if rows["full_batch"].astype(bool).all()}
              if "full_batch" in table else set())
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [f"GD\n(b = n = {b})" if b in gd else str(b) for b in batches])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("batch size $b$ (log$_2$ scale)")
        left.legend(frameon=False)
        _legend_above(fig, named)
    return fig
