"""Reward-vs-diversity fronts along training, and each method's diversity at matched reward.

A run that evaluates itself every ``eval.every`` epochs on fixed noise leaves a curve in its
``eval.jsonl``: the reward and the monitors (pixel Vendi, held-out digit confidence, …) at each
evaluation, the base model first. Comparing methods at one epoch compares how far each has
travelled; a front compares the trade-off each offers:

* **diversity at matched reward**: a run's metric where its reward curve first rises through a
  level, linearly interpolated between the two evaluations around the crossing; per method the mean
  ± SE over the seeds that crossed it, with how many did;
* **levels** between the base model's reward and the lowest of the methods' best seed-mean rewards
  (by default a quarter, half and three quarters of the way), so that every method reaches them on
  average;
* **verdicts** computed from those numbers: at each level, which method keeps the most of each
  metric, and by how many SE over the next;
* **the front plot**: per metric, each method's seed-mean metric against the reward on a grid of
  matched levels, ± 1 SE bands where at least two seeds crossed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .prompt_report import Run, _curve_mean, _fmt, at_crossing, best_and_runner_up, mean_se
from .report import _plt, markdown_table, save_figure

REWARD = "reward_mean"
"""The ``eval.jsonl`` field of the reward along training (the x-axis of every front)."""


def _by_method(runs: list[Run]) -> dict[str, list[Run]]:
    return {m: [r for r in runs if r.method == m] for m in dict.fromkeys(r.method for r in runs)}


def reward_levels(runs: list[Run], fractions: tuple[float, ...] = (0.25, 0.5, 0.75)) -> list[float]:
    """Reward levels ``base + f·(top − base)``, ``top`` the lowest of the methods' best seed-mean rewards.

    Empty when some method's seed mean never rises above the base model's reward.
    """
    base = float(runs[0].rows[0][REWARD])
    top = min(float(np.nanmax(_curve_mean(mine, REWARD, REWARD)[1])) for mine in _by_method(runs).values())
    return [base + f * (top - base) for f in fractions] if top > base else []


def matched(runs: list[Run], levels: list[float], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: ``{key: {level: (mean, se, n seeds crossed with a value)}}`` and ``seeds``.

    ``n`` counts the seeds whose reward crossed the level and whose metric was measured there.
    """
    out: dict[str, dict[str, Any]] = {}
    for method, mine in _by_method(runs).items():
        values: dict[str, dict[float, tuple[float, float, int]]] = {}
        for key in keys:
            values[key] = {}
            for level in levels:
                found = [at_crossing(r, level, key, x_key=REWARD) for r in mine]
                values[key][level] = mean_se([v for v in found if v is not None and not math.isnan(v)])
        out[method] = {"seeds": len(mine), "at": values}
    return out


def verdicts(summary: dict[str, dict[str, Any]], levels: list[float], titles: dict[str, str]) -> list[str]:
    """One computed line per metric and level: the method that keeps the most of it at that reward."""
    lines = []
    for key, title in titles.items():
        for level in levels:
            values = {m: s["at"][key][level] for m, s in summary.items()}
            lines.append(f"at reward {level:.4f}, most {title}: {best_and_runner_up(values)}")
    return lines


def matched_table(summary: dict[str, dict[str, Any]], levels: list[float], key: str) -> list[list[str]]:
    """Rows: method, then the metric at each level (mean ± SE, seeds crossed / seeds)."""
    rows = [["method", *[f"at reward {level:.4f}" for level in levels]]]
    for method, s in summary.items():
        cells = [s["at"][key][level] for level in levels]
        rows.append([method, *[f"{_fmt(*c[:2], digits=3)} ({c[2]}/{s['seeds']})" for c in cells]])
    return rows


def difference(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float]:
    """``a − b`` of two ``(mean, se, n)`` and its SE (the two SEs combined; NaN unless both have 2+ seeds)."""
    if a[2] < 2 or b[2] < 2:
        return math.nan, math.nan
    return a[0] - b[0], math.hypot(a[1], b[1])


def pair_lines(
    summary: dict[str, dict[str, Any]], levels: list[float], titles: dict[str, str], first: str, second: str
) -> list[str]:
    """``first`` against ``second`` at matched reward: a table of differences and a computed verdict.

    Each cell is ``first − second`` (mean over the seeds that crossed, ± the combined SE, in SE); the
    verdict counts the (metric, level) cells where either keeps more by 2 SE or more. :func:`front_lines`
    passes the pair's own levels (:func:`reward_levels` of the two methods' runs).
    """
    rows = [["metric", *[f"at reward {level:.4f}" for level in levels]]]
    ahead, behind, close = 0, 0, 0
    for key, title in titles.items():
        cells = []
        for level in levels:
            diff, se = difference(summary[first]["at"][key][level], summary[second]["at"][key][level])
            if math.isnan(diff):
                cells.append("–")
                continue
            z = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
            ahead, behind, close = ahead + (z >= 2), behind + (z <= -2), close + (abs(z) < 2)
            cells.append(f"{diff:+.3f} ± {se:.3f} ({z:+.1f} SE)")
        rows.append([title, *cells])
    compared = ahead + behind + close
    verdict = (
        f"Verdict (computed): of {compared} matched comparisons, {first} keeps more by 2 SE or more in {ahead}, "
        f"{second} in {behind}; {close} lie within 2 SE."
    )
    return [
        f"{first} − {second} at matched reward (levels: a quarter, half and three quarters of the way from the base's "
        f"reward to the lower of the two methods' best seed-mean rewards; positive: {first} keeps more):",
        "",
        markdown_table(rows),
        "",
        verdict,
    ]


def _front(mine: list[Run], key: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed-mean metric and its SE at each reward of ``grid`` (NaN where fewer than 2 seeds crossed)."""
    means, ses = [], []
    for level in grid:
        m, se, n = mean_se([v for r in mine if (v := at_crossing(r, float(level), key, x_key=REWARD)) is not None])
        ok = n >= min(2, len(mine))
        means.append(m if ok else math.nan)
        ses.append((0.0 if math.isnan(se) else se) if ok else math.nan)
    return grid, np.array(means), np.array(ses)


def plot_fronts(runs: list[Run], titles: dict[str, str], path: Path, points: int = 12) -> Path:
    """One panel per metric: each method's seed-mean metric vs reward at matched levels, ± 1 SE bands."""
    plt = _plt()
    cols = min(3, len(titles))
    rows = math.ceil(len(titles) / cols)
    fig, grid_axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    axes = list(grid_axes.flat)[: len(titles)]
    for spare in list(grid_axes.flat)[len(titles) :]:
        spare.set_visible(False)
    base = runs[0].rows[0]
    for method, mine in _by_method(runs).items():
        top = float(np.nanmax([np.nanmax(r.column(REWARD)) for r in mine]))
        grid = np.linspace(float(base[REWARD]), top, points)
        for ax, key in zip(axes, titles, strict=True):
            x, y, se = _front(mine, key, grid)
            (line,) = ax.plot(x, y, marker="o", ms=3, label=method)
            ax.fill_between(x, y - se, y + se, color=line.get_color(), alpha=0.15)
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        if base.get(key) is not None:
            ax.scatter([base[REWARD]], [base[key]], marker="*", s=250, color="gold", edgecolor="black", label="base")
        ax.set_xlabel("reward (fixed-noise evaluation)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fronts: diversity kept at matched reward (mean over seeds that crossed; ± 1 SE)")
    return save_figure(fig, path)


def front_lines(
    runs: list[Run],
    titles: dict[str, str],
    out: Path,
    heading: str = "Fronts",
    figure: str = "fronts.png",
    pairs: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The report section: computed verdicts, one matched-reward table per metric, the front plot (``out/figure``).

    Each ``(a, b)`` of ``pairs`` whose methods both ran adds :func:`pair_lines` (``a − b`` at matched reward).
    """
    levels = reward_levels(runs)
    if not levels:
        return [f"## {heading}", "", "No fronts: some method's seed-mean reward never rose above the base's.", ""]
    summary = matched(runs, levels, list(titles))
    path = plot_fronts(runs, titles, out / figure)
    seeds = max(s["seeds"] for s in summary.values())
    lines = [
        f"## {heading}",
        "",
        "Each run's metric where its reward curve first rises through the level (linear interpolation between "
        f"evaluations on fixed noise), mean ± SE over the seeds that crossed it (of {seeds}). Levels: a quarter, "
        "half and three quarters of the way from the base's reward to the lowest of the methods' best seed-mean "
        "rewards.",
        "",
        "Verdicts (computed):",
        "",
        *[f"- {line}." for line in verdicts(summary, levels, titles)],
        "",
    ]
    for key, title in titles.items():
        lines += [f"{title}:", "", markdown_table(matched_table(summary, levels, key)), ""]
    for first, second in pairs:
        if first in summary and second in summary:
            # the pair's own levels: the range both reach, not the one the study's least-travelled method sets
            mine = [r for r in runs if r.method in (first, second)]
            own = reward_levels(mine)
            lines += [*pair_lines(matched(mine, own, list(titles)), own, titles, first, second), ""]
    return [*lines, f"![Fronts]({path.name})", ""]
