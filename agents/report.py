"""Turn evaluation JSON files into the paper's tables and plots (``diffusion-gym report``).

Reads the files written by ``diffusion-gym evaluate`` (one per model; fields ``method``, ``task``
and ``seed`` say which run a file belongs to) and writes ``report.md`` with:

* Table 1: reward mean ± SE per task for Base / DDPO / HRF (average over HRF window presets) / HRF-D;
* Table 2: Inception Score; Table 3: Vendi score on pixels and on embeddings;
* the per-preset ablation (HRF baseline / early / later), and a check of the paper's claims;
* Fig. 5 (reward vs Vendi, one point per run), a Fig. 1-style 2-D projection of embeddings (base vs
  DDPO, same noise), the Appendix A.1 injection plot when its JSON is given, and stage runtimes.

Methods outside DDPO / HRF / HRF-D (e.g. ``vard``, ``drift``) get their own column, named after the
method. Evaluations of earlier studies can join as ``extra`` results (metrics only, no arrays).

Across runs of one method, the table entry is the mean over runs ± the standard error over runs
(3 seeds in the paper); a single model (Base) shows its own sample standard error.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_gym.windows import PRESETS

BASE = "base"
FAMILY_ORDER = ("base", "ddpo", "hrf", "hrf-authors", "hrf-d")
FAMILY_TITLES = {"base": "Base", "ddpo": "DDPO", "hrf": "HRF", "hrf-authors": "HRF (authors)", "hrf-d": "HRF-D"}
CLAIMED = ("hrf", "hrf-authors", "hrf-d")
"""The families whose reward and diversity the paper's claims compare with DDPO's."""
COLORS = {
    "base": "black",
    "ddpo": "tab:red",
    "hrf": "tab:blue",
    "hrf-baseline": "tab:blue",
    "hrf-early": "tab:orange",
    "hrf-later": "tab:green",
    "hrf-d": "tab:purple",
    "hrf-authors": "tab:cyan",
    "vard": "tab:brown",
    "drift": "tab:olive",
}
HIGHER_IS_BETTER_NOTE = "Higher is better for every reward here (compressibility is minus the JPEG size)"


def family(method: str) -> str:
    """The table column of a method: the HRF window presets (``diffusion_gym.windows.PRESETS``) form ``hrf``.

    Every other method keeps its own column: HRF-D, ``hrf-authors`` (HRF under its authors' conventions) and
    any variant named ``hrf-<something>`` that is not a preset (an ablation of one option).
    """
    return "hrf" if method in PRESETS else method


def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read evaluation JSON files (directories are searched for ``*.json`` with a ``rewards`` field)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    results = []
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "rewards" in data and "vendi_pixel" in data:
            data["_path"] = str(f)
            data.setdefault("method", data.get("label", f.stem))
            results.append(data)
    if not results:
        raise ValueError(f"no evaluation JSON files (from `diffusion-gym evaluate`) found in {list(map(str, paths))}")
    return results


def merge_results(own: list[dict[str, Any]], extra: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``own`` followed by the ``extra`` results whose label is not among ``own``'s (own results win)."""
    labels = {r.get("label") for r in own}
    return [*own, *(r for r in extra if r.get("label") not in labels)]


def _metric(result: dict[str, Any], name: str, task: str) -> tuple[float, float]:
    """``(value, its own uncertainty)`` of one metric of one evaluated model."""
    if name == "reward":
        r = result["rewards"][task]
        return r["mean"], r["se"]
    if name == "is":
        return result["inception_score"]["mean"], result["inception_score"]["std"]
    if name == "vendi_pixel":
        return result["vendi_pixel"], float("nan")
    if name == "vendi_embedding":
        return result["vendi_embedding"]["value"], float("nan")
    raise ValueError(f"unknown metric {name!r}")


def aggregate(runs: list[dict[str, Any]], name: str, task: str) -> tuple[float, float, int]:
    """Mean over runs ± standard error over runs (a single run: its own uncertainty)."""
    values = [_metric(r, name, task) for r in runs]
    if len(values) == 1:
        return values[0][0], values[0][1], 1
    v = np.array([x for x, _ in values], dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))), len(v)


def _fmt(mean: float, se: float, n: int, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    text = f"{mean:.{digits}f}"
    if not math.isnan(se):
        text += f" ± {se:.{digits}f}"
    return text + (f" (n={n})" if n > 1 else "")


class Study:
    """Evaluation results grouped by task (trained reward) and method."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results = results
        self.base = [r for r in results if r["method"] == BASE]
        tasks = [r.get("task") for r in results if r["method"] != BASE and r.get("task")]
        self.tasks = list(dict.fromkeys(tasks)) or list(results[0]["rewards"])
        self.methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != BASE))

    def runs(self, task: str, method: str | None = None, fam: str | None = None) -> list[dict[str, Any]]:
        """Evaluated runs fine-tuned on ``task`` (all tasks for files without one), by method or family."""
        if (method or fam) == BASE:
            return self.base
        out = []
        for r in self.results:
            if r["method"] == BASE or r.get("task") not in (task, None):
                continue
            if (method is not None and r["method"] == method) or (fam is not None and family(r["method"]) == fam):
                out.append(r)
        return out

    def families(self) -> list[str]:
        """Table columns present: Base, DDPO, HRF, HRF-D, then any other method."""
        present = {family(m) for m in self.methods} | ({BASE} if self.base else set())
        return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))

    def table(self, name: str, digits: int, by: str = "family") -> list[list[str]]:
        """Rows ``[task, cell per column]`` of one metric."""
        columns = self.families() if by == "family" else [BASE, *self.methods] if self.base else self.methods
        rows = []
        for task in self.tasks:
            cells = [task]
            for col in columns:
                runs = self.runs(task, fam=col) if by == "family" else self.runs(task, method=col)
                cells.append(_fmt(*aggregate(runs, name, task), digits) if runs else "—")
            rows.append(cells)
        return [["task", *[FAMILY_TITLES.get(c, c) for c in columns]], *rows]

    def claims(self) -> list[list[str]]:
        """The paper's qualitative claims, checked on these numbers."""
        rows = [["task", "claim", "holds?", "numbers"]]
        if not self.base:
            return rows
        for task in self.tasks:
            base, _, _ = aggregate(self.base, "reward", task)
            fam = {f: self.runs(task, fam=f) for f in ("ddpo", *CLAIMED)}
            stat = {f: aggregate(r, "reward", task) for f, r in fam.items() if r}
            if "ddpo" in stat:
                m, se, _ = stat["ddpo"]
                z = (m - base) / se if se > 0 else float("inf")
                rows.append(
                    [task, "DDPO raises the reward over Base", _yes(m > base), f"{base:.4f} → {m:.4f} ({z:+.1f} SE)"]
                )
                for f in CLAIMED:
                    if f in stat:
                        mf, sef, _ = stat[f]
                        tol = 2 * math.hypot(se, sef)
                        rows.append(
                            [
                                task,
                                f"{FAMILY_TITLES[f]} reward on par with or above DDPO (within 2 SE)",
                                _yes(mf >= m - tol),
                                f"{mf:.4f} vs {m:.4f} (2 SE = {tol:.4f})",
                            ]
                        )
                for metric, title in (
                    ("is", "IS"),
                    ("vendi_pixel", "Vendi (pixels)"),
                    ("vendi_embedding", "Vendi (emb.)"),
                ):
                    b, _, _ = aggregate(self.base, metric, task)
                    d, _, _ = aggregate(fam["ddpo"], metric, task)
                    for f in CLAIMED:
                        if fam[f]:
                            v, _, _ = aggregate(fam[f], metric, task)
                            rows.append(
                                [
                                    task,
                                    f"{FAMILY_TITLES[f]} {title} closer to Base than DDPO's",
                                    _yes(abs(v - b) < abs(d - b)),
                                    f"Base {b:.3f}, DDPO {d:.3f}, {FAMILY_TITLES[f]} {v:.3f}",
                                ]
                            )
        return rows

    def kept(self, task: str, runs: list[dict[str, Any]]) -> dict[str, float]:
        """Reward gain over Base (mean ± SE over runs, and in SE) and what of Base's IS and classes is kept.

        A single run's gain SE is the two models' sample SEs combined (same noise, not paired).
        """
        base_reward, base_se, _ = aggregate(self.base, "reward", task)
        reward, se, n = aggregate(runs, "reward", task)
        if n == 1:
            se = math.hypot(se, base_se)
        base_is = aggregate(self.base, "is", task)[0]
        ratios = np.array([_metric(r, "is", task)[0] / base_is for r in runs])
        agreement = np.array([r.get("class_agreement", float("nan")) for r in runs], dtype=np.float64)
        gain = reward - base_reward
        return {
            "gain": gain,
            "gain_se": se,
            "z": gain / se if se > 0 else float("inf"),
            "is_kept": float(ratios.mean()),
            "is_kept_se": float(ratios.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "class_agreement": float(agreement.mean()),
            "n": n,
        }

    def kept_table(self) -> list[list[str]]:
        """Per task and method: reward gain over Base (in SE), IS kept (% of Base's), class agreement."""
        rows = [list(_KEPT_HEAD)]
        if not self.base:
            return rows
        for task in self.tasks:
            for method in self.methods:
                runs = self.runs(task, method=method)
                if runs:
                    k = self.kept(task, runs)
                    rows.append(_kept_cells(task, method, k))
        return rows


def _kept_cells(task: str, label: str, k: dict[str, float]) -> list[str]:
    """One row of a gain / diversity-kept table."""
    is_se = "" if math.isnan(k["is_kept_se"]) else f" ± {100 * k['is_kept_se']:.0f}"
    return [
        task,
        label,
        f"{k['gain']:+.4f} ± {k['gain_se']:.4f} (n={k['n']})",
        f"{k['z']:+.1f}",
        f"{100 * k['is_kept']:.0f}%{is_se}",
        f"{100 * k['class_agreement']:.1f}%",
    ]


def sweep_points(study: Study, sweep: list[dict[str, Any]]) -> list[tuple[float, dict[str, float]]]:
    """``(value, Study.kept of its runs)`` per swept value, sorted by value (runs carry a ``sweep`` field)."""
    task = sweep[0]["task"]
    values = sorted({r["sweep"]["value"] for r in sweep})
    return [(v, study.kept(task, [r for r in sweep if r["sweep"]["value"] == v])) for v in values]


def plot_sweep(points: list[tuple[float, dict[str, float]]], key: str, task: str, path: Path) -> Path:
    """Reward gain (x, ± SE) vs IS kept (y, ± SE), one point per swept value, labelled with the value."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([k["gain"] for _, k in points], [100 * k["is_kept"] for _, k in points], color="grey", lw=1, zorder=1)
    for i, (value, k) in enumerate(points):  # labels alternate above and below: neighbours may sit close
        yerr = None if math.isnan(k["is_kept_se"]) else 100 * k["is_kept_se"]
        ax.errorbar(k["gain"], 100 * k["is_kept"], xerr=k["gain_se"], yerr=yerr, fmt="o", capsize=3)
        ax.annotate(f"{key.rsplit('.', 1)[-1]}={value:g}", (k["gain"], 100 * k["is_kept"]), fontsize=8,
                    xytext=(4, 6 if i % 2 else -12), textcoords="offset points")  # fmt: skip
    ax.axhline(70, color="grey", ls="--", lw=1, label="70% of Base's IS")
    ax.legend(fontsize=8, loc="center right")
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel(f"reward gain over Base ({task})")
    ax.set_ylabel("IS kept (% of Base's)")
    ax.set_title(f"Sweep of {key}: reward gained vs diversity kept")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _sweep_lines(study: Study, sweep: list[dict[str, Any]], out: Path) -> list[str]:
    """The sweep section: its plot and table (empty without sweep runs or a Base evaluation)."""
    if not sweep or not study.base:
        return []
    info, task = sweep[0]["sweep"], sweep[0]["task"]
    points = sweep_points(study, sweep)
    fig = plot_sweep(points, info["key"], task, out / "sweep.png")
    rows = [_kept_cells(task, f"{info['key']} = {v:g}", k) for v, k in points]
    seeds = sorted({r.get("seed") for r in sweep})
    return [
        f"## Sweep: {info['method']}'s `{info['key']}` on {task}",
        "",
        f"Seeds {seeds} (the tuning seeds, kept out of the tables above); reward gain over Base with its SE over "
        "seeds (one seed: the two models' sample SEs combined), the share of Base's Inception Score kept and the "
        "class agreement with Base.",
        "",
        markdown_table([["task", "value", *_KEPT_HEAD[2:]], *rows]),
        "",
        f"![Sweep]({fig.name})",
        "",
    ]


_KEPT_HEAD = ["task", "method", "reward gain (mean ± SE over runs)", "gain / SE", "IS kept", "class agreement"]


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def markdown_table(rows: list[list[str]]) -> str:
    """GitHub Markdown of a header row and body rows."""
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a Matplotlib figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_reward_vs_vendi(study: Study, path: Path) -> Path:
    """Fig. 5: reward (y) vs Vendi (x), one point per run, method means as large markers, Base as a star."""
    plt = _plt()
    metrics_ = (("vendi_pixel", "Vendi (pixels)"), ("vendi_embedding", "Vendi (embeddings)"))
    fig, axes = plt.subplots(len(metrics_), len(study.tasks), figsize=(5 * len(study.tasks), 8), squeeze=False)
    for j, task in enumerate(study.tasks):
        for i, (metric, title) in enumerate(metrics_):
            ax = axes[i][j]
            for method in study.methods:
                runs = study.runs(task, method=method)
                if not runs:
                    continue
                xs = [_metric(r, metric, task)[0] for r in runs]
                ys = [_metric(r, "reward", task)[0] for r in runs]
                color = COLORS.get(method, None)
                ax.scatter(xs, ys, s=18, alpha=0.5, color=color)
                ax.scatter([np.mean(xs)], [np.mean(ys)], s=90, color=color, edgecolor="black", label=method)
            if study.base:
                ax.scatter(
                    [_metric(study.base[0], metric, task)[0]],
                    [_metric(study.base[0], "reward", task)[0]],
                    marker="*",
                    s=250,
                    color="gold",
                    edgecolor="black",
                    label="base",
                )
            ax.set_xlabel(title)
            ax.set_ylabel(f"reward: {task}")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(task)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Reward vs diversity (small dots: seeds; large: mean over seeds)")
    return save_figure(fig, path)


def _arrays(result: dict[str, Any]) -> dict[str, np.ndarray] | None:
    name = result.get("arrays")
    if not name or "_path" not in result:  # an evaluation loaded from elsewhere: metrics only
        return None
    path = Path(result["_path"]).with_name(name)
    return dict(np.load(path)) if path.is_file() else None


def plot_projection(study: Study, path: Path, method: str = "ddpo") -> Path | None:
    """Fig. 1-style: a 2-D PCA projection of embeddings of Base and one fine-tuned run (same noise) per task."""
    plt = _plt()
    base = _arrays(study.base[0]) if study.base else None
    panels = []
    for task in study.tasks:
        runs = sorted(study.runs(task, method=method), key=lambda r: r.get("seed", 0))
        tuned = _arrays(runs[0]) if runs else None
        if base is not None and tuned is not None:
            panels.append((task, runs[0], base["embeddings"], tuned["embeddings"]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (task, run, eb, et) in zip(axes[0], panels, strict=True):
        both = np.concatenate([eb, et]).astype(np.float64)
        center = both.mean(0)
        _, _, vt = np.linalg.svd(both - center, full_matrices=False)
        pb, pt = (eb - center) @ vt[:2].T, (et - center) @ vt[:2].T
        for pts, color, name in (
            (pb, "black", "base"),
            (pt, COLORS.get(method, "tab:red"), f"{method} seed {run.get('seed')}"),
        ):
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.4, color=color, label=name)
            _ellipse(ax, pts, color)
        ax.set_title(f"{task}: embeddings, PCA")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def image_row(images: np.ndarray, gap: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` uint8 images side by side, ``gap`` white pixels apart: an ``(H, W', C)`` array."""
    n, c, h, w = images.shape
    row = np.full((h, n * (w + gap) - gap, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        row[:, i * (w + gap) : i * (w + gap) + w] = image.transpose(1, 2, 0)
    return row


def plot_sample_grids(study: Study, task: str, path: Path, columns: int = 20) -> Path | None:
    """Base and each method's first seed on the same evaluation noise: one row of ``columns`` samples each.

    The evaluation draws its classes in turn, so the first 20 samples show every digit twice. ``None``
    when Base or no fine-tuned run of ``task`` has per-sample arrays.
    """
    base = _arrays(study.base[0]) if study.base else None
    if base is None or "images_uint8" not in base:
        return None
    rows = [("Base", base["images_uint8"][:columns])]
    for method in study.methods:
        runs = sorted(study.runs(task, method=method), key=lambda r: r.get("seed", 0))
        arrays = _arrays(runs[0]) if runs else None
        if arrays is not None and "images_uint8" in arrays:
            rows.append((f"{method} (seed {runs[0].get('seed')})", arrays["images_uint8"][:columns]))
    if len(rows) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.5 * columns, 0.62 * len(rows) + 0.5), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows, strict=True):
        row = image_row(images)
        ax.imshow(row[..., 0] if row.shape[-1] == 1 else row, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{task}: samples on the same evaluation noise (the first {columns})")
    return save_figure(fig, path)


def _ellipse(ax: Any, pts: np.ndarray, color: str) -> None:
    """Draw the 2-standard-deviation ellipse of 2-D points."""
    from matplotlib.patches import Ellipse

    cov = np.cov(pts.T)
    vals, vecs = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(vecs[1, -1], vecs[0, -1]))
    w, h = 4 * np.sqrt(np.maximum(vals[::-1], 0))
    ax.add_patch(Ellipse(pts.mean(0), w, h, angle=angle, fill=False, color=color, lw=2))


def plot_injection(injections: dict[str, dict[str, Any]], path: Path) -> Path:
    """Appendix A.1: cosine distance of x̂0 between the injected chains and the fine-tuned chain."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(injections), figsize=(5 * len(injections), 4), squeeze=False)
    for ax, (task, inj) in zip(axes[0], injections.items(), strict=True):
        for s, curve in inj["curves"].items():
            ax.plot(inj["axis"], curve, label=f"switch at {s}")
        ax.invert_xaxis()
        ax.set_xlabel("step (paper axis: 40 = noisiest)")
        ax.set_ylabel("cosine distance of x̂0 to the fine-tuned chain")
        ax.set_title(f"{task}: {inj.get('method', 'ddpo')} → base")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def runtime_table(timings: list[dict[str, Any]]) -> list[list[str]]:
    """Rows ``stage, items, summed item seconds, wall-clock`` from a study's ``timings.json``.

    A stage's wall-clock is that of its last call that did any work; when that call redid only some of
    the stage's items (a re-run after deleting some runs), the cell says how many, and the total is
    marked as a sum of such partial calls.
    """
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    walls = {t["name"]: t for t in timings if t["stage"] == "wall"}
    for t in timings:
        if t["stage"] != "wall":
            totals[t["stage"]] += t["seconds"]
            counts[t["stage"]] += 1
    rows = [["stage", "items", "item seconds (sum)", "wall-clock"]]
    partial = False
    for stage, seconds in totals.items():
        wall = "—"
        if stage in walls:
            secs, items = walls[stage]["seconds"], walls[stage].get("items", counts[stage])
            wall = f"{secs:.0f} s ({secs / 60:.1f} min)"
            if items < counts[stage]:
                wall += f"; the last call, which redid {items} of the {counts[stage]} items"
                partial = True
        rows.append([stage, str(counts[stage]), f"{seconds:.0f}", wall])
    if walls:
        total = sum(t["seconds"] for t in walls.values())
        note = " (of the stages' last calls, some partial)" if partial else ""
        rows.append(
            [
                "**total**",
                str(sum(counts.values())),
                f"{sum(totals.values()):.0f}",
                f"{total:.0f} s ({total / 60:.1f} min){note}",
            ]
        )
    return rows


def samples_note(results: Sequence[dict[str, Any]], inception: bool = False) -> str:
    """The line under a metric table saying on how many samples (``n``) each model was scored.

    Models scored on different numbers of samples are named, since their metrics are not comparable (the
    Inception Score in particular is biased low with few samples per split). ``inception`` adds the splits.
    """
    groups: dict[Any, list[str]] = defaultdict(list)
    for r in results:
        settings = r.get("settings", {})
        key = (settings.get("num_samples", "?"), settings.get("is_splits") if inception else None)
        groups[key].append(str(r.get("label", r.get("method", "?"))))

    def describe(n: Any, splits: Any) -> str:
        if splits and isinstance(n, int):
            return f"{n}, in {splits} IS splits of {n // splits}"
        return str(n)

    if len(groups) == 1:
        ((n, splits),) = groups
        return f"Samples per model: {describe(n, splits)}."
    parts = []
    for (n, splits), labels in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        named = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        parts.append(f"{describe(n, splits)} ({named})")
    return f"Samples per model: {'; '.join(parts)} — **metrics from different numbers of samples are not comparable**."


def _table_lines(study: Study) -> list[str]:
    """The report's protocol paragraph and Tables 1-3, with the window ablation when a column pools presets."""
    first = study.results[0]["settings"]
    n_runs = defaultdict(int)
    for r in study.results:
        n_runs[r["method"]] += 1
    n_line = samples_note(study.results)
    lines = [
        f"Every model was sampled from the same initial noise (seed {first['seed']}, {first['num_samples']} samples, "
        f"{first['num_steps']} DDIM steps, eta {first['eta']}); the IS network is "
        f"`{study.results[0]['inception_score']['network']}`, the embedding network "
        f"`{study.results[0]['vendi_embedding']['network']}`, pixels are resized to {first['pixel_size']}² for "
        f"Vendi. Models: " + ", ".join(f"{m} × {n}" for m, n in n_runs.items()) + ".",
        "",
        f"Entries: mean over runs ± standard error over runs (n = runs); Base: its sample SE. {HIGHER_IS_BETTER_NOTE}.",
        "",
        "## Table 1: reward",
        "",
        markdown_table(study.table("reward", 4)),
        "",
        n_line,
        "",
        "## Table 2: Inception Score (closer to Base = diversity preserved)",
        "",
        markdown_table(study.table("is", 3)),
        "",
        samples_note(study.results, inception=True),
        "",
        "## Table 3: Vendi score (closer to Base = diversity preserved)",
        "",
        "Raw pixels:",
        "",
        markdown_table(study.table("vendi_pixel", 3)),
        "",
        n_line,
        "",
        "Embeddings:",
        "",
        markdown_table(study.table("vendi_embedding", 3)),
        "",
        n_line,
        "",
    ]
    if all(family(m) == m for m in study.methods):  # every column is one method: no ablation to show
        return lines
    lines += ["## Window ablation (every method separately)", ""]
    for name, title_, digits in (("reward", "reward", 4), ("is", "IS", 3), ("vendi_pixel", "Vendi pixels", 3)):
        note = samples_note(study.results, inception=name == "is")
        lines += [f"{title_}:", "", markdown_table(study.table(name, digits, by="method")), "", note, ""]
    return lines


def _figure_lines(study: Study, out: Path, injections: dict[str, dict[str, Any]] | None) -> list[str]:
    """Draw the report's figures into ``out``; returns their Markdown section."""
    fig5 = plot_reward_vs_vendi(study, out / "fig5_reward_vs_vendi.png")
    lines = ["## Figures", "", f"![Reward vs Vendi]({fig5.name})", ""]
    # Fig. 1 wants DDPO's first seed; its arrays may be missing (an earlier study's evaluation): then the
    # first other method whose evaluations have arrays
    for method in dict.fromkeys(["ddpo", *study.methods]):
        proj = plot_projection(study, out / "fig1_projection.png", method=method)
        if proj is not None:
            if method != "ddpo":
                lines += [f"Embedding projection of Base vs {method} (no per-sample arrays of DDPO here).", ""]
            lines += [f"![Embedding projection]({proj.name})", ""]
            break
    else:
        lines += ["Embedding projection skipped: no Base and fine-tuned evaluations with per-sample arrays (.npz).", ""]
    for task in study.tasks:
        grid = plot_sample_grids(study, task, out / f"samples_{task}.png")
        if grid is not None:
            lines += [f"![Samples: {task}]({grid.name})", ""]
    if injections:
        inj = plot_injection(injections, out / "injection_sampling.png")
        lines += ["### Injection sampling (Appendix A.1)", "", f"![Injection sampling]({inj.name})", ""]
        rows = [["task", "switch step", "final distance to fine-tuned", "final distance to base"]]
        for task, d in injections.items():
            for s in d["curves"]:
                rows.append([task, s, f"{d['final_to_finetuned'][s]:.4f}", f"{d['final_to_base'][s]:.4f}"])
        lines += [markdown_table(rows), ""]
    return lines


def write_report(
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Evaluation report",
    header: Sequence[str] = (),
    injections: dict[str, dict[str, Any]] | None = None,
    timings: list[dict[str, Any]] | None = None,
    notes: Sequence[str] = (),
    extra: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``report.md`` and its figures into ``out_dir``; returns the Markdown path.

    Args:
        paths: evaluation JSON files or directories of them.
        out_dir: where ``report.md`` and the PNG figures go.
        title: the report's title.
        header: lines under the title.
        injections: injection-sampling results per task (Appendix A.1 plot and table).
        timings: a study's ``timings.json`` items (runtime table).
        notes: lines after the claims check.
        extra: evaluations loaded elsewhere (an earlier study's ``evaluations.json``), added to the
            rows unless a file of ``paths`` has the same label; without arrays they are left out
            of the projection plot.
    """
    own = load_results(paths)
    merged = merge_results(own, [{"method": r.get("label"), **r} for r in extra])
    study = Study([r for r in merged if "sweep" not in r])  # sweep runs are tuning runs: their own section
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", *header, "", *_table_lines(study)]
    if study.base:
        lines += [
            "## Reward gained and diversity kept",
            "",
            "Each method's reward gain over Base in SE over runs (n = 1: the two models' sample SEs combined), "
            "the share of Base's Inception Score it keeps, and its class agreement: the share of samples the "
            "digit classifier assigns to the class they were conditioned on (Base: 100% on this noise).",
            "",
            markdown_table(study.kept_table()),
            "",
        ]
    claims = study.claims()
    failed = [f"{row[0]}: {row[1]}" for row in claims[1:] if row[2] != "yes"]
    lines += ["## The paper's claims on these numbers", "", markdown_table(claims), ""]
    if len(claims) > 1:
        verdict = f"{len(claims) - 1 - len(failed)} of {len(claims) - 1} checks hold on this model."
        lines += [verdict + (" Not reproduced: " + "; ".join(failed) + "." if failed else ""), ""]
    lines += [*notes, ""] if notes else []
    lines += _sweep_lines(study, [r for r in merged if "sweep" in r], out)
    lines += _figure_lines(study, out, injections)
    if timings:
        lines += ["## Runtime of each stage", "", markdown_table(runtime_table(timings)), ""]
        lines += [
            "Item seconds are summed over the stage's runs or models (runs may overlap when the study trains "
            "several at once); wall-clock is the stage's elapsed time.",
            "",
        ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
