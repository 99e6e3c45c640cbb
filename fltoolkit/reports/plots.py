"""PNG plots of one run and of several runs, drawn from a RunRecord (the run's files alone).

Figures are plain `matplotlib.figure.Figure` objects rendered by the Agg canvas, never pyplot:
there is no global figure registry to leak into or to close, no display is needed, and a figure is
garbage once the function drawing it returns. A plot whose data is absent (a centralized run
has no rounds, an interrupted run no summary) is skipped rather than drawn empty or failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fltoolkit.reports.record import RunRecord

FIGSIZE = (8.0, 4.5)
TWO_PANEL_FIGSIZE = (8.0, 5.5)  # two stacked panels need a little more height to stay legible
DPI = 100
MB = 1e6
MINUTES_ABOVE_S = 600.0  # past ten minutes, seconds on an axis are harder to read than minutes
# Horizontal references on AUC panels: summary key -> (line style, legend label).
AUC_REFERENCES = {
    "centralized_auc": ("-", "centralized"),
    "oracle_auc": ("--", "oracle (planted model)"),
    "baseline_auc": (":", "popularity baseline"),
}


@dataclass(frozen=True)
class Plot:
    """A written figure; the title doubles as its caption in reports."""

    title: str
    path: Path


@dataclass(frozen=True)
class _Line:
    """One curve of a single-panel plot: a traffic direction, or a run in a comparison."""

    label: str
    x: np.ndarray
    y: np.ndarray
    style: str = "-"


def write_run_plots(record: RunRecord, out_dir: Path) -> list[Plot]:
    """Write every plot of one run that has data; return them in reading order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    step = _step_name([record])
    plots = [_quality_plot(record, "round", 1.0, step, out_dir / "quality_vs_round.png",
                           f"AUC and logloss vs {step}")]
    last = _last_time(record)
    if last is not None:
        scale, unit = _time_unit(last)
        plots.append(_quality_plot(record, "sim_time_s", scale, f"simulated time ({unit})",
                                   out_dir / "quality_vs_time.png",
                                   "AUC and logloss vs simulated time"))
    plots += [_epsilon_plot([record], out_dir / "auc_vs_epsilon.png"),
              _client_auc_plot(record, out_dir), _participation_plot(record, out_dir),
              _bytes_plot(record, out_dir), _round_duration_plot(record, out_dir),
              _staleness_plot(record, out_dir), _budget_plot(record, out_dir)]
    return [plot for plot in plots if plot is not None]


def write_comparison_plots(records: list[RunRecord], out_dir: Path) -> list[Plot]:
    """Overlay the runs' quality curves, one line per run, so they can be told apart at a
    glance."""
    out_dir.mkdir(parents=True, exist_ok=True)
    step = _step_name(records)
    plots = [
        _lines_plot([_run_line(r, "round", "auc") for r in records], step,
                    f"{_split(records)} AUC",
                    out_dir / "compare_auc_vs_round.png", f"AUC vs {step}", integer_x=True),
        _lines_plot([_run_line(r, "round", "logloss") for r in records], step,
                    f"{_split(records)} logloss",
                    out_dir / "compare_logloss_vs_round.png", f"Logloss vs {step}",
                    integer_x=True),
    ]
    lasts = [last for r in records if (last := _last_time(r)) is not None]
    if lasts:
        scale, unit = _time_unit(max(lasts))
        plots.append(_lines_plot([_run_line(r, "sim_time_s", "auc", scale) for r in records],
                                 f"simulated time ({unit})", f"{_split(records)} AUC",
                                 out_dir / "compare_auc_vs_time.png", "AUC vs simulated time"))
    plots.append(_epsilon_plot(records, out_dir / "compare_auc_vs_epsilon.png"))
    return [plot for plot in plots if plot is not None]


def _quality_plot(record: RunRecord, x: str, scale: float, xlabel: str, path: Path,
                  title: str) -> Plot | None:
    """AUC over logloss against one x column: the two numbers that say whether a run learns."""
    data = _finite(record.evaluations, x, "auc", "logloss")
    if not data.height:
        return None
    fig = Figure(figsize=TWO_PANEL_FIGSIZE, dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = data[x].to_numpy() / scale
    top.plot(xs, data["auc"].to_numpy(), marker=".", label=record.name)
    for key, (style, label) in AUC_REFERENCES.items():
        if isinstance(record.summary.get(key), int | float):
            top.axhline(record.summary[key], color="grey", linestyle=style, label=label)
    bottom.plot(xs, data["logloss"].to_numpy(), marker=".", color="tab:orange")
    _finish_axes(top, None, f"{_split([record])} AUC")
    _finish_axes(bottom, xlabel, f"{_split([record])} logloss", integer_x=x == "round")
    return _save(fig, title, path)


def _epsilon_plot(records: list[RunRecord], path: Path) -> Plot | None:
    """AUC against the privacy spent, a line per run with a finite epsilon: the trade-off
    differential privacy makes; None when no run has one (DP off, or no noise)."""
    return _lines_plot([_run_line(r, "epsilon", "auc") for r in records],
                       "epsilon (privacy spent)", f"{_split(records)} AUC", path,
                       "AUC vs epsilon")


def _client_auc_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """How evenly the model serves clients, which a single pooled AUC hides."""
    aucs = _finite(record.clients, "test_auc")["test_auc"].to_numpy()
    if not aucs.size:
        return None
    pooled = _pooled_auc(record)
    title = (f"Per-client test AUC at the last evaluation "
             f"({aucs.size} of {record.clients.height} clients have an AUC)")
    return _histogram(aucs, np.linspace(0.0, 1.0, 21), "client test AUC", "clients",
                      out_dir / "client_auc.png", title,
                      None if pooled is None else (pooled, f"pooled AUC {pooled:.3f}"))


def _participation_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """How often each client was aggregated: selection fairness and coverage in one picture."""
    values = _finite(record.clients, "participation")["participation"].to_numpy()
    if not values.size:
        return None
    never = int((values == 0).sum())
    title = f"Participation per client ({never} of {values.size} clients never took part)"
    bins = np.arange(-0.5, values.max() + 1.5)
    return _histogram(values, bins, "rounds aggregated (count)", "clients",
                      out_dir / "participation.png", title, integer_x=True)


def _bytes_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """Traffic per round in each direction, the cost a deployment pays for every round."""
    data = _finite(record.rounds, "round", "bytes_up", "bytes_down")
    rounds = data["round"].to_numpy()
    lines = [_Line("upload", rounds, data["bytes_up"].to_numpy() / MB),
             _Line("download", rounds, data["bytes_down"].to_numpy() / MB, "--")]
    return _lines_plot(lines, "round", "traffic per round (MB)",
                       out_dir / "bytes_per_round.png", "Bytes per round", integer_x=True)


def _round_duration_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """The spread of round durations shows how much stragglers cost."""
    for column, kind in (("round_duration_s", "simulated"), ("round_wall_s", "wall-clock")):
        data = _finite(record.rounds, column)
        if data.height:
            return _histogram(data[column].to_numpy(), "auto", f"{kind} round duration (s)",
                              "rounds", out_dir / "round_duration.png",
                              f"Round duration ({kind} time)")
    return None


def _staleness_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """How stale the updates an async server aggregated were, update by update (rounds.csv's
    `staleness_counts`, summed over the aggregations): the price of not waiting for slow
    clients. None for sync runs, which have no staleness."""
    counts = record.staleness_counts()
    if not counts:
        return None
    staleness = np.repeat(list(counts), list(counts.values()))
    dropped = int(_finite(record.rounds, "dropped_stale")["dropped_stale"].sum())
    title = (f"Update staleness ({staleness.size:,} buffered updates, "
             f"mean {staleness.mean():.2f} aggregations; {dropped:,} dropped as too stale)")
    bins = np.arange(-0.5, staleness.max() + 1.5)
    return _histogram(staleness, bins, "staleness (aggregations)", "updates",
                      out_dir / "staleness.png", title, integer_x=True)


def _budget_plot(record: RunRecord, out_dir: Path) -> Plot | None:
    """Budgeted tables (the `embeddings` section): their rows, and how many ids lost and won
    a row so far, over the rounds (rounds.csv's table_rows, rows_evicted, rows_admitted);
    None for runs with whole tables."""
    data = _finite(record.rounds, "round", "table_rows", "rows_evicted", "rows_admitted")
    if data.is_empty():
        return None
    rounds = data["round"].to_numpy()
    lines = [_Line("rows held", rounds, data["table_rows"].to_numpy()),
             _Line("ids evicted so far", rounds, data["rows_evicted"].cum_sum().to_numpy(), "--"),
             _Line("ids admitted so far", rounds, data["rows_admitted"].cum_sum().to_numpy(),
                   ":")]
    return _lines_plot(lines, "round", "embedding rows", out_dir / "embedding_rows.png",
                       "Embedding rows under the budget", integer_x=True)


def _run_line(record: RunRecord, x: str, y: str, scale: float = 1.0) -> _Line:
    """A run's evaluations as one comparison curve, named after the run (and "async" for an
    async one, whose rounds are aggregations) so the legend tells runs apart."""
    data = _finite(record.evaluations, x, y)
    label = f"{record.name} (async)" if record.federated_mode == "async" else record.name
    return _Line(label, data[x].to_numpy() / scale, data[y].to_numpy())


def _pooled_auc(record: RunRecord) -> float | None:
    """The AUC over all test rows (the summary's, else the last evaluated one): the value the
    per-client AUCs are read against."""
    if isinstance(record.summary.get("auc"), int | float):
        return record.summary["auc"]
    aucs = _finite(record.evaluations, "auc")["auc"]
    return aucs[-1] if aucs.len() else None


def _split(records: list[RunRecord]) -> str:
    """Which split the runs' evaluations scored (metrics.csv): validation, or test for data
    without one; "evaluation" when the runs differ or do not say (interrupted runs)."""
    splits = {r.summary.get("evaluated_on") for r in records}
    return splits.pop() if len(splits) == 1 and None not in splits else "evaluation"


def _step_name(records: list[RunRecord]) -> str:
    """What one x step is: an epoch for centralized runs, a round for federated ones."""
    names = {"epoch" if r.summary.get("mode") == "centralized" else "round" for r in records}
    return " / ".join(sorted(names, reverse=True))


def _last_time(record: RunRecord) -> float | None:
    """The simulated time of the last evaluation; None for a run without a simulated clock."""
    times = _finite(record.evaluations, "sim_time_s")["sim_time_s"]
    return times.max() if times.len() else None


def _lines_plot(lines: list[_Line], xlabel: str, ylabel: str, path: Path, title: str,
                integer_x: bool = False) -> Plot | None:
    """One panel of curves; None when no curve has a point."""
    lines = [line for line in lines if line.x.size]
    if not lines:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for line in lines:
        ax.plot(line.x, line.y, linestyle=line.style, linewidth=1.2, label=line.label)
    _finish_axes(ax, xlabel, ylabel, integer_x)
    return _save(fig, title, path)


def _histogram(values: np.ndarray, bins: np.ndarray | str, xlabel: str, ylabel: str, path: Path,
               title: str, marker: tuple[float, str] | None = None,
               integer_x: bool = False) -> Plot:
    """A histogram, with an optional labelled vertical line (e.g. the pooled value)."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no "0.4 clients"
    if marker is not None:
        ax.axvline(marker[0], color="tab:red", linestyle="--", label=marker[1])
    _finish_axes(ax, xlabel, ylabel, integer_x)
    return _save(fig, title, path)


def _finish_axes(ax: Axes, xlabel: str | None, ylabel: str, integer_x: bool = False) -> None:
    """Labels, a light grid behind the data, and whole-number ticks on counted axes (a run of two
    epochs must not show epoch 1.5)."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylabel(ylabel)
    ax.set_axisbelow(True)
    ax.grid(alpha=0.3)


def _save(fig: Figure, title: str, path: Path) -> Plot:
    """Title the figure, gather its labelled lines into one legend below the axes (where it can
    never hide a curve or a reference line), and write the PNG."""
    fig.suptitle(title)
    labelled = sum(len(ax.get_legend_handles_labels()[1]) for ax in fig.axes)
    if labelled:
        fig.legend(loc="outside lower center", ncols=min(labelled, 4), frameon=False)
    fig.savefig(path)
    return Plot(title, path)


def _finite(df: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """The columns as floats, keeping only rows where all are finite: a half-written CSV row or a
    NaN AUC is left out instead of breaking a line or a histogram. No rows if a column is absent.
    """
    if not set(columns) <= set(df.columns):
        return pl.DataFrame(schema=dict.fromkeys(columns, pl.Float64))
    data = df.select(pl.col(c).cast(pl.Float64, strict=False) for c in columns).drop_nulls()
    return data.filter(pl.all_horizontal(pl.col(c).is_finite() for c in columns))


def _time_unit(last_s: float) -> tuple[float, str]:
    """(seconds per unit, unit name) for a time axis ending at `last_s`."""
    return (60.0, "min") if last_s > MINUTES_ABOVE_S else (1.0, "s")
