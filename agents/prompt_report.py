"""The prompt-following study's report: accuracy along training, first reach of a target, diversity at matched accuracy.

A prompt-following study (``make paper-t2i``) needs no separate evaluation stage: every run evaluates
itself on fixed noise and held-out phrasings every ``eval.every`` epochs and appends a line to
``<run>/eval.jsonl`` (epoch, episodes, training seconds, reward and ``eval/prompt_*`` metrics). This
module reads those curves and writes ``report.md``, its figures and ``summary.json``:

* **accuracy vs episodes and vs training seconds** (mean over seeds, ± 1 SE bands);
* **first reach of the target with the guards held**: the first evaluation at which a run's held-out
  accuracy is at least the target *and* its hacking guards hold (mean |bold/thin ink margin| at most
  ``margin_factor`` × the data's 90th percentile, within-prompt Vendi at least ``diversity_floor`` of
  the base's, digit-only accuracy not below the base's), in episodes and in training seconds;
* **diversity at matched accuracy**: each run's Vendi (classifier embeddings) where its accuracy curve
  first crosses a level, linearly interpolated between the two evaluations around the crossing;
* a **reward-vs-diversity** plot (the accuracy-vs-Vendi path of each method's seed mean).

Every verdict line is computed from these numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report import _plt, markdown_table, save_figure


def _num(row: dict[str, Any], key: str) -> float:
    """A metric of an ``eval.jsonl`` line; ``null`` (nothing of that kind was evaluated) is NaN."""
    return math.nan if row.get(key) is None else float(row[key])


@dataclass(frozen=True)
class Guards:
    """The hacking guards a point on a curve must hold to count as a success."""

    data_ink_margin_p90: float
    """90th percentile of the bold/thin ink margin of the training data (grey levels)."""
    margin_factor: float = 2.0
    """Mean |ink margin| may be at most this multiple of ``data_ink_margin_p90``."""
    diversity_floor: float = 0.7
    """Within-prompt Vendi (embeddings) must keep at least this fraction of the base's."""

    def failed(self, row: dict[str, Any], base: dict[str, Any]) -> list[str]:
        """The guards ``row`` breaks, relative to the base evaluation ``base`` (empty: all held).

        A guard whose metric the evaluation could not measure (``null``: no weighted or no digit-only
        prompt among the evaluation prompts) holds.
        """
        broken = []
        if _num(row, "abs_margin_mean") > self.margin_factor * self.data_ink_margin_p90:
            broken.append("ink margin")
        if _num(row, "vendi_embedding") < self.diversity_floor * _num(base, "vendi_embedding"):
            broken.append("diversity")
        if _num(row, "digit_only") < _num(base, "digit_only") - 1e-9:
            broken.append("digit-only")
        return broken


@dataclass
class Run:
    """One trained run's evaluation curve."""

    method: str
    seed: int
    rows: list[dict[str, Any]]
    """``eval.jsonl``'s lines, by epoch (the first is the base model, epoch 0)."""

    def column(self, key: str) -> np.ndarray:
        """One field along the curve (``null`` as NaN)."""
        return np.array([_num(r, key) for r in self.rows])


def read_run(path: Path, method: str, seed: int) -> Run:
    """A run's curve from its ``eval.jsonl``.

    Raises:
        FileNotFoundError: when the run has no ``eval.jsonl`` (it was not trained, or not evaluated).
    """
    file = path / "eval.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: train the run first (the study's train stage)")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    by_epoch = {row["epoch"]: row for row in rows}  # a resumed run may repeat an evaluation: keep the last
    return Run(method, seed, [by_epoch[e] for e in sorted(by_epoch)])


def first_reach(run: Run, target: float, guards: Guards) -> dict[str, float] | None:
    """Episodes and training seconds of the run's first evaluation at ``target`` accuracy with the guards held."""
    base = run.rows[0]
    for row in run.rows[1:]:
        if row["accuracy"] >= target and not guards.failed(row, base):
            return {"episodes": float(row["episodes"]), "seconds": float(row["train_seconds"])}
    return None


def at_crossing(
    run: Run, level: float, key: str, guards: Guards | None = None, x_key: str = "accuracy"
) -> float | None:
    """``key`` where the ``x_key`` curve first rises through ``level`` (linear interpolation); ``None`` if never.

    A curve that starts at or above ``level`` crosses it at its first point. With ``guards``, a
    crossing whose evaluation at or just after it breaks a guard does not count (``None``): a hacked
    model's diversity is not the diversity at that accuracy.
    """
    acc, values = run.column(x_key), run.column(key)
    crossing = next((i for i in range(len(acc)) if acc[i] >= level), None)
    if crossing is None or (guards is not None and guards.failed(run.rows[crossing], run.rows[0])):
        return None
    if crossing == 0:
        return float(values[0])
    w = (level - acc[crossing - 1]) / (acc[crossing] - acc[crossing - 1])
    return float(values[crossing - 1] + w * (values[crossing] - values[crossing - 1]))


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error (NaN for one value) and count of ``values`` (NaN mean for none)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan, 0
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
    return float(a.mean()), se, int(a.size)


def _fmt(mean: float, se: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {se * scale:.{digits}f}" if not math.isnan(se) else "")


def summarize(runs: list[Run], target: float, levels: list[float], guards: Guards) -> dict[str, Any]:
    """Per method: the final point, the first reach of the target and the diversity at each level (over seeds)."""
    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        finals = [r.rows[-1] for r in mine]
        reached = [first_reach(r, target, guards) for r in mine]
        hits = [h for h in reached if h is not None]
        methods[method] = {
            "seeds": [r.seed for r in mine],
            "episodes": finals[0]["episodes"],
            "final": {
                key: mean_se([_num(f, key) for f in finals])
                for key in ("accuracy", "weight_accuracy", "digit_only", "abs_margin_mean", "vendi_embedding")
            }
            | {"train_seconds": mean_se([_num(f, "train_seconds") for f in finals])},
            "final_guards_held": sum(not guards.failed(f, r.rows[0]) for f, r in zip(finals, mine, strict=True)),
            "reached": len(hits),
            "reach_episodes": mean_se([h["episodes"] for h in hits]),
            "reach_seconds": mean_se([h["seconds"] for h in hits]),
            "vendi_at": {
                str(level): mean_se(
                    [v for r in mine if (v := at_crossing(r, level, "vendi_embedding", guards)) is not None]
                )
                for level in levels
            },
            "crossed": {str(level): sum(bool((r.column("accuracy") >= level).any()) for r in mine) for level in levels},
        }
    return methods


def best_and_runner_up(values: dict[str, tuple[float, float, int]], higher: bool = True, label: str = "") -> str:
    """``"<best> (<label><mean ± se>, n seeds), ahead of <second> by <diff> (<z> SE: …)"`` over methods with a value.

    ``values``: per method ``(mean, se, n)`` as :func:`mean_se` gives; methods with ``n = 0`` are left out.
    """
    have = {m: v for m, v in values.items() if v[2]}
    if not have:
        return "no method has a value"
    order = sorted(have, key=lambda m: -have[m][0] if higher else have[m][0])
    best = order[0]
    text = f"{best} ({label}{_fmt(*have[best][:2], digits=3)}, {have[best][2]} seeds)"
    if len(order) > 1:
        second = order[1]
        diff = abs(have[best][0] - have[second][0])
        if min(have[best][2], have[second][2]) < 2:
            return text + f", ahead of {second} by {diff:.3f} (no SE: a method has one seed)"
        se = math.sqrt(have[best][1] ** 2 + have[second][1] ** 2)
        z = diff / se if se > 0 else math.inf
        text += f", ahead of {second} by {diff:.3f} ({z:.1f} SE: {'a difference' if z >= 2 else 'within noise'})"
    return text


def _first_verdict(summary: dict[str, Any], key: str, unit: str, target: float, n_seeds: int) -> str:
    """Which method reaches the target first (most seeds reaching, then the fewest ``key`` on average)."""
    reaching = {m: s for m, s in summary.items() if s["reached"]}
    if not reaching:
        best = max(summary, key=lambda m: summary[m]["final"]["accuracy"][0])
        acc = summary[best]["final"]["accuracy"]
        return (
            f"no method reached {target:.0%} held-out accuracy with its guards held in the budget; the highest "
            f"final accuracy is {best}'s ({_fmt(acc[0], acc[1], 100)}%)"
        )
    order = sorted(reaching, key=lambda m: (-reaching[m]["reached"], reaching[m][key][0]))
    parts = [
        f"{m} ({reaching[m]['reached']}/{n_seeds} seeds, mean {_fmt(*reaching[m][key][:2], digits=0)} {unit})"
        for m in order
    ]
    never = [m for m in summary if m not in reaching]
    return (
        f"first to {target:.0%} with guards held: {parts[0]}"
        + (f"; then {', '.join(parts[1:])}" if parts[1:] else "")
        + (f"; never: {', '.join(never)}" if never else "")
    )


def _diversity_verdict(summary: dict[str, Any], level: float) -> str:
    """Which method keeps the most within-prompt diversity where its accuracy crosses ``level``."""
    crossed = {m: s["vendi_at"][str(level)] for m, s in summary.items() if s["vendi_at"][str(level)][2]}
    hacked = [m for m, s in summary.items() if s["crossed"][str(level)] > s["vendi_at"][str(level)][2]]
    if not crossed:
        return f"at {level:.0%} accuracy: no run crossed the level with its guards held"
    text = f"at {level:.0%} accuracy: most diversity {best_and_runner_up(crossed, label='Vendi ')}"
    if hacked:
        text += f"; crossed it with a guard broken: {', '.join(hacked)} (not counted)"
    return text


def _curve_mean(runs: list[Run], key: str, x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean of ``key`` and of ``x_key`` at each evaluation, and the SE of ``key`` (curves of equal length)."""
    n = min(len(r.rows) for r in runs)
    ys = np.stack([r.column(key)[:n] for r in runs])
    xs = np.stack([r.column(x_key)[:n] for r in runs])
    se = ys.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros(n)
    return xs.mean(axis=0), ys.mean(axis=0), se


def plot_curves(runs: list[Run], target: float, path: Path) -> Path:
    """Accuracy vs episodes, vs training seconds, and accuracy vs within-prompt Vendi (the reward-diversity path)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        for ax, x_key in zip(axes[:2], ("episodes", "train_seconds"), strict=True):
            x, y, se = _curve_mean(mine, "accuracy", x_key)
            (line,) = ax.plot(x, 100 * y, marker="o", ms=3, label=method)
            ax.fill_between(x, 100 * (y - se), 100 * (y + se), color=line.get_color(), alpha=0.15)
        _, vendi, _ = _curve_mean(mine, "vendi_embedding", "episodes")
        _, acc, _ = _curve_mean(mine, "accuracy", "episodes")
        axes[2].plot(vendi, 100 * acc, marker="o", ms=3, label=method)
        axes[2].scatter([vendi[-1]], [100 * acc[-1]], s=40, edgecolor="black", zorder=3)
    base = runs[0].rows[0]
    axes[2].scatter([base["vendi_embedding"]], [100 * base["accuracy"]], marker="*", s=250, color="gold",
                    edgecolor="black", zorder=4, label="base")  # fmt: skip
    xlabels = ("episodes", "training seconds", "within-prompt Vendi (classifier embeddings)")
    for ax, xlabel in zip(axes, xlabels, strict=True):
        ax.axhline(100 * target, color="grey", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out prompt accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].set_title("accuracy vs diversity (seed means; dot: the end)")
    axes[0].set_title("at equal episodes (mean ± SE over seeds)")
    axes[1].set_title("at equal training time")
    return save_figure(fig, path)


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN as ``None`` (strict JSON has no NaN); tuples become lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _end_table(summary: dict[str, Any], base: dict[str, Any], target: float) -> list[list[str]]:
    """The end-of-training table: one row for the base model, one per method (mean ± SE over seeds)."""
    head = ["method", "episodes", "train s", "accuracy %", "weight right %", "digit-only %", "|margin|", "Vendi emb",
            "guards held (end)", f"reached {target:.0%}", "episodes to target", "train s to target"]  # fmt: skip
    none = math.nan
    percents = [_fmt(_num(base, k), none, 100) for k in ("accuracy", "weight_accuracy", "digit_only")]
    rows = [head, ["base", "0", "0", *percents,
                   _fmt(_num(base, "abs_margin_mean"), none, digits=2),
                   _fmt(_num(base, "vendi_embedding"), none, digits=3), "–", "–", "–", "–"]]  # fmt: skip
    for method, s in summary.items():
        f, n = s["final"], len(s["seeds"])
        rows.append([
            method, str(s["episodes"]), _fmt(*f["train_seconds"][:2], digits=0), _fmt(*f["accuracy"][:2], 100),
            _fmt(*f["weight_accuracy"][:2], 100), _fmt(*f["digit_only"][:2], 100),
            _fmt(*f["abs_margin_mean"][:2], digits=2), _fmt(*f["vendi_embedding"][:2], digits=3),
            f"{s['final_guards_held']}/{n}", f"{s['reached']}/{n}", _fmt(*s["reach_episodes"][:2], digits=0),
            _fmt(*s["reach_seconds"][:2], digits=0),
        ])  # fmt: skip
    return rows


def _matched_table(summary: dict[str, Any], levels: list[float]) -> list[list[str]]:
    """Vendi at each matched accuracy level, per method, with the number of seeds that crossed it."""
    rows = [["method", *[f"Vendi at {level:.0%} (seeds: guards held / crossed)" for level in levels]]]
    for method, s in summary.items():
        cells = [(s["vendi_at"][str(level)], s["crossed"][str(level)]) for level in levels]
        rows.append([method, *[f"{_fmt(*a[:2], digits=3)} ({a[2]} / {n})" for a, n in cells]])
    return rows


def write_prompt_report(
    runs: list[Run],
    report_dir: Path,
    *,
    title: str,
    header: list[str],
    target: float,
    levels: list[float],
    guards: Guards,
    timings: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``report.md``, ``curves.png`` and ``summary.json`` to ``report_dir``; returns the report's path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, target, levels, guards)
    n_seeds = max(len(s["seeds"]) for s in summary.values())
    base = runs[0].rows[0]
    plot_curves(runs, target, report_dir / "curves.png")
    limit = guards.margin_factor * guards.data_ink_margin_p90
    vendi_floor = _fmt(guards.diversity_floor * _num(base, "vendi_embedding"), math.nan, digits=3)
    digit_only = _fmt(_num(base, "digit_only"), math.nan, 100)
    lines = [
        f"# {title}",
        "",
        *header,
        "",
        "## Verdicts (computed from the table below)",
        "",
        f"- **Equal episodes**: {_first_verdict(summary, 'reach_episodes', 'episodes', target, n_seeds)}.",
        f"- **Equal training time**: {_first_verdict(summary, 'reach_seconds', 's', target, n_seeds)}.",
        *[f"- **Diversity** {_diversity_verdict(summary, level)}." for level in levels],
        "",
        f"## End of training (mean ± SE over {n_seeds} seeds)",
        "",
        f"Held-out phrasings, fixed evaluation noise, {int(base['n_images'])} images per evaluation. Guards: "
        f"mean |ink margin| ≤ {guards.margin_factor:g} × {guards.data_ink_margin_p90:g} = {limit:.2f}; Vendi ≥ "
        f"{guards.diversity_floor:.0%} of the base's ({vendi_floor}); digit-only accuracy ≥ the base's "
        f"({digit_only}%). *Reached*: seeds whose accuracy reached the "
        "target at an evaluation with every guard held; episodes and seconds to target average over those seeds.",
        "",
        markdown_table(_end_table(summary, base, target)),
        "",
        "## Diversity at matched accuracy",
        "",
        "Within-prompt Vendi (classifier embeddings) where each seed's accuracy curve first crosses the level "
        "(linear interpolation between evaluations); mean ± SE over the seeds that crossed it with every guard "
        "held at the evaluation of the crossing (a hacked model's diversity is not counted).",
        "",
        markdown_table(_matched_table(summary, levels)),
        "",
        "## Curves",
        "",
        "![accuracy vs episodes, training time and diversity](curves.png)",
    ]
    trained = [t for t in timings or [] if t["stage"] == "train"]
    if trained:
        minutes = sum(t["seconds"] for t in trained) / 60
        lines += ["", f"Training stage: {len(trained)} runs, {minutes:.1f} min in all (evaluations included)."]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (report_dir / "summary.json").write_text(json.dumps(_json_safe({"target": target, "methods": summary}), indent=1))
    return path
