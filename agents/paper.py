"""The paper's experiment in one command: train every method × reward × seed, evaluate, report.

``diffusion-gym paper --config envs_configs/paper_digits.yaml`` (or ``make paper``) runs the stages

1. **train**: one run per (method, reward, seed) from the method's training config (a template
   with ``{reward}``; PPO-IS, or VARD for ``{config: ..., algo: vard}``), plus the study's
   overrides; runs that already finished are skipped, so an interrupted study continues where it
   stopped;
2. **evaluate**: the base model and every run, on the same evaluation noise (``diffusion-gym
   evaluate``'s JSON per model);
3. **injection**: the Appendix A.1 experiment on one method's first seed per reward;
4. **report**: ``report.md`` with Tables 1–3, the window ablation, the claims check, Fig. 5, the
   projection and injection plots and the runtime of each stage, written to ``report_dir``. The
   evaluations of earlier studies named in ``compare_with`` join the rows when their evaluation
   settings and initial noise equal this study's (otherwise an error names the field).

A study with a ``prompt_following`` section (``envs_configs/paper_t2i.yaml``, ``make paper-t2i``)
has two stages: train (methods may be GRPO configs, ``{config: ..., algo: grpo}``) and report, which
reads every run's own ``eval.jsonl`` (:mod:`agents.prompt_report`): curves along training instead of
one evaluation per finished model.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .common.eval_settings import EvalSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluationSection(_Strict):
    """Settings of the evaluation stage (identical for every model)."""

    num_samples: int = Field(500, ge=10, description="images per model (the paper: 2,142)")
    seed: int = Field(2024, description="seed of the shared evaluation noise")
    num_steps: int = Field(40, ge=1, description="DDIM steps")
    eta: float = Field(1.0, ge=0.0, description="DDIM eta")
    batch_size: int = Field(250, ge=1, description="images per sampling chain")
    metric_nets: str = Field("auto", description="digits, inception or auto")


class InjectionSection(_Strict):
    """Settings of the Appendix A.1 injection-sampling stage."""

    method: str = Field("ddpo", description="whose first-seed run is switched to the base model")
    steps: list[int] = Field([38, 35, 30, 25, 20, 10], description="switch steps, paper axis (K = noisiest)")
    num_samples: int = Field(15, ge=1, description="trajectories (the paper: 15)")
    seed: int = Field(0, description="seed of the shared noise")


class MethodSpec(_Strict):
    """One method of a study: its training config template and the algorithm that reads it."""

    config: str = Field(..., description="training config; {reward} is replaced by the task")
    algo: Literal["ppo-is", "vard", "grpo"] = Field(
        "ppo-is", description="trainer and config schema: ppo-is, vard or grpo"
    )


class PromptFollowingSection(_Strict):
    """A prompt-following study (``make paper-t2i``): the report reads every run's own ``eval.jsonl``.

    Each run evaluates itself on fixed noise and held-out phrasings along training (its ``eval``
    section), so the study has no evaluation or injection stage.
    """

    target: float = Field(0.85, gt=0, le=1, description="held-out accuracy a run must reach, guards held")
    levels: list[float] = Field([0.8], min_length=1, description="accuracies at which diversity is compared")
    data_ink_margin_p90: float = Field(..., gt=0, description="the data's 90th-percentile bold/thin ink margin")
    margin_factor: float = Field(2.0, gt=0, description="guard: mean |ink margin| <= factor x the data's p90")
    diversity_floor: float = Field(0.7, ge=0, le=1, description="guard: Vendi >= this fraction of the base's")


class SweepSection(_Strict):
    """One config key of one method swept over values on one task (e.g. VARD's KL weight β).

    Each value is a run per seed named ``<method>@<leaf>=<value>`` (``vard@kl_coef=0.1``); the report
    draws reward gain vs diversity kept, one point per value, and tabulates them. Sweep runs stay out
    of the method tables: tune on other seeds than the reported ones.
    """

    method: str = Field(..., description="the study method whose config is swept")
    key: str = Field(..., description="dotted config key, as --set takes it (train.kl_coef)")
    values: list[float] = Field(..., min_length=1, description="the values, each a run per seed")
    reward: str = Field(..., description="the task the sweep trains on (one of the study's rewards)")
    seeds: list[int] = Field([], description="the sweep's seeds ([] = the study's)")

    def name(self, value: float) -> str:
        """The sweep point's method name: ``<method>@<leaf>=<value>``."""
        return f"{self.method}@{self.key.rsplit('.', 1)[-1]}={value:g}"


COMPARED_SETTINGS = ("num_samples", "seed", "num_steps", "eta", "scheduler", "pixel_size", "is_splits", "metric_nets")
"""Evaluation settings that must be equal for an earlier study's evaluations to join this study's rows."""


class StudyConfig(_Strict):
    """A whole study (see ``envs_configs/paper_digits.yaml``)."""

    out_dir: str = Field("runs/paper_digits", description="runs, evaluations and timings")
    report_dir: str = Field("docs/results/paper_digits", description="where report.md and figures go")
    title: str = Field("HRF paper experiment", description="report title")
    base_model: str = Field("embedded:digits", description="the model every method fine-tunes")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    rewards: list[str] = Field(["jpeg_compressibility", "jpeg_incompressibility"], min_length=1)
    methods: dict[str, MethodSpec] = Field(
        ..., min_length=1, description="method name -> training config template, or {config: template, algo: vard}"
    )
    overrides: list[str] = Field([], description="--set overrides for every run")
    method_overrides: dict[str, list[str]] = Field({}, description="extra overrides per method")
    jobs: int = Field(1, ge=1, description="training runs in parallel (each gets cores / jobs threads)")
    evaluation: EvaluationSection = EvaluationSection()
    injection: InjectionSection | None = InjectionSection()
    compare_with: list[str] = Field([], description="evaluations.json files of earlier studies shown as extra rows")
    prompt_following: PromptFollowingSection | None = Field(
        None, description="set: a prompt-following study, reported from each run's eval.jsonl (no evaluate stage)"
    )
    sweep: SweepSection | None = Field(None, description="one key of one method swept on one task")
    front_pairs: list[tuple[str, str]] = Field(
        [], description="pairs of methods compared cell by cell at matched reward on the fronts ([a, b]: a − b)"
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _template_is_ppo_is(cls, value: Any) -> Any:
        """A bare template string is a PPO-IS method."""
        if isinstance(value, dict):
            return {k: {"config": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


def load_study(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study YAML; errors name the key."""
    from .common.config import ConfigError, yaml_load

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config not found: {path}")
    try:
        study = StudyConfig.model_validate(yaml_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{path}: {problems}") from None
    for field, names in (
        ("method_overrides", set(study.method_overrides)),
        ("front_pairs", {m for pair in study.front_pairs for m in pair}),
    ):
        unknown = names - set(study.methods)
        if unknown:
            known = list(study.methods)
            raise ConfigError(f"{path}: {field} names unknown methods {sorted(unknown)}; methods: {known}")
    if study.prompt_following is not None and (study.injection is not None or study.compare_with):
        raise ConfigError(
            f"{path}: a prompt_following study has no injection stage or compared evaluations: set injection: null "
            "and compare_with: []"
        )
    if study.sweep is not None and (study.sweep.method not in study.methods or study.sweep.reward not in study.rewards):
        raise ConfigError(
            f"{path}: sweep.method {study.sweep.method!r} / sweep.reward {study.sweep.reward!r} must be one of the "
            f"methods {list(study.methods)} / rewards {list(study.rewards)}"
        )
    if study.injection is not None and study.injection.method not in study.methods:
        raise ConfigError(
            f"{path}: injection.method {study.injection.method!r} is not one of the methods {list(study.methods)}"
        )
    from .algorithms import load_run_config

    for method, spec in study.methods.items():
        for reward in study.rewards:
            config = spec.config.format(reward=reward)
            if not Path(config).is_file():
                raise ConfigError(f"{path}: methods.{method}: {config} does not exist")
            try:
                load_run_config(config, _overrides(study, method, study.seeds[0]), algo=spec.algo)
            except ConfigError as error:
                raise ConfigError(f"{path}: methods.{method} (algo {spec.algo}): {error}") from None
    if study.sweep is not None:
        sweep = study.sweep
        spec = study.methods[sweep.method]
        for value in sweep.values:
            name = sweep.name(value)
            try:
                load_run_config(spec.config.format(reward=sweep.reward), _overrides(study, name, 0), algo=spec.algo)
            except ConfigError as error:
                raise ConfigError(f"{path}: sweep {name}: {error}") from None
    for item in study.compare_with:
        if not Path(item).is_file():
            raise ConfigError(f"{path}: compare_with: {item} does not exist")
    return study


def machine_description() -> str:
    """One line naming the machine, for the report header."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU model
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"
    )


class Timings:
    """Stage runtimes, kept in ``<out_dir>/timings.json`` so a resumed study reports all of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
        self.added: list[str] = []  # stages of the items recorded by this process, in order

    def add(self, stage: str, name: str, seconds: float, **extra: Any) -> None:
        """Record (or replace) one item's runtime; stage ``wall`` holds a whole stage's wall-clock time."""
        self.items = [t for t in self.items if (t["stage"], t["name"]) != (stage, name)]
        self.items.append({"stage": stage, "name": name, "seconds": round(seconds, 2), **extra})
        self.added.append(stage)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items, indent=1))
        tmp.replace(self.path)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 07 s`` or ``2 h 05 min``."""
    s = round(max(float(seconds), 0.0))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_note(done: int, total: int, elapsed: float) -> str:
    """``k/N, elapsed …, ETA …`` once ``done`` of ``total`` items took ``elapsed`` seconds (no ETA after the last).

    The ETA assumes the remaining items take as long as the finished ones did on average. Used by the study's
    stages and ``diffusion-gym evaluate``.
    """
    note = f"{done}/{total}, elapsed {format_duration(elapsed)}"
    if done < total:
        note += f", ETA {format_duration(elapsed / max(done, 1) * (total - done))}"
    return note


def _run_name(method: str, reward: str, seed: int) -> str:
    return f"{method}__{reward}__seed{seed}"


def _finished(run_dir: Path, num_epochs: int) -> bool:
    from .common.checkpoint import CheckpointError, latest_checkpoint

    try:
        found = latest_checkpoint(run_dir)
    except CheckpointError:  # a run killed while writing: it restarts
        return False
    return found is not None and json.loads((found / "meta.json").read_text()).get("epoch") == num_epochs


def _method_of(study: StudyConfig, name: str) -> tuple[str, float | None]:
    """A run's study method and its swept value (``None`` for a method's own runs)."""
    sweep = study.sweep
    if sweep is not None and name not in study.methods:
        return sweep.method, next(v for v in sweep.values if sweep.name(v) == name)
    return name, None


def _overrides(study: StudyConfig, name: str, seed: int) -> list[str]:
    method, value = _method_of(study, name)
    swept = [f"{study.sweep.key}={value!r}"] if study.sweep is not None and value is not None else []
    return [
        *study.overrides,
        *study.method_overrides.get(method, []),
        *swept,
        f"seed={seed}",
        f"model={study.base_model}",
    ]


def planned_runs(study: StudyConfig, out: Path) -> dict[tuple[str, str, int], Path]:
    """Every run of the study, ``(method, reward, seed) -> run directory``: methods first, then the sweep."""
    keys = [(m, r, s) for r in study.rewards for m in study.methods for s in study.seeds]
    if study.sweep is not None:
        sweep = study.sweep
        keys += [(sweep.name(v), sweep.reward, s) for v in sweep.values for s in sweep.seeds or study.seeds]
    return {(m, r, s): out / "runs" / _run_name(m, r, s) for m, r, s in keys}


def _run_meta(study: StudyConfig, name: str, reward: str, seed: int) -> dict[str, Any]:
    """What an evaluation records of its run (a sweep run also its method, key and value)."""
    meta: dict[str, Any] = {"method": name, "task": reward, "seed": seed}
    method, value = _method_of(study, name)
    if study.sweep is not None and value is not None:
        meta["sweep"] = {"method": method, "key": study.sweep.key, "value": value}
    return meta


def _train_command(study: StudyConfig, name: str, reward: str, seed: int, run_dir: Path) -> list[str]:
    spec = study.methods[_method_of(study, name)[0]]
    cmd = [sys.executable, "-m", "agents.cli", "train", "--algo", spec.algo]
    cmd += ["--config", spec.config.format(reward=reward), "--run-dir", str(run_dir), "--no-progress"]
    for o in _overrides(study, name, seed):
        cmd += ["--set", o]
    return cmd


def train_stage(study: StudyConfig, out: Path, timings: Timings, log: Any = print) -> dict[tuple[str, str, int], Path]:
    """Train every (method, reward, seed) that has not finished; returns the run directories."""
    from .algorithms import load_run_config

    runs = planned_runs(study, out)
    todo = []
    for (name, reward, seed), run_dir in runs.items():
        spec = study.methods[_method_of(study, name)[0]]
        config = load_run_config(spec.config.format(reward=reward), _overrides(study, name, seed), algo=spec.algo)
        if _finished(run_dir, config.num_epochs):
            log(f"  train {run_dir.name}: done already, skipped")
        else:
            todo.append((run_dir, _train_command(study, name, reward, seed, run_dir), spec.algo, config))
    threads = max(1, (os.cpu_count() or 1) // study.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    finished, lock, stage_start = [0], threading.Lock(), time.perf_counter()  # runs done, for the ETA

    def run(item: tuple[Path, list[str], str, Any]) -> None:
        run_dir, cmd, algo, config = item
        if run_dir.exists():  # an interrupted run restarts from scratch (its logs would mix otherwise)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        tic = time.perf_counter()
        if study.jobs == 1:  # in this process: no interpreter start-up and model loading per run
            from .algorithms import train

            train(config, run_dir=run_dir, progress=False, overwrite=True)
        else:
            with open(run_dir / "train.log", "w") as logfile:
                done = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"training {run_dir.name} failed (exit {done.returncode}); see {run_dir / 'train.log'}"
                )
        seconds = time.perf_counter() - tic
        timings.add("train", run_dir.name, seconds)
        with lock:
            finished[0] += 1
            note = progress_note(finished[0], len(todo), time.perf_counter() - stage_start)
        log(f"  train {run_dir.name}: {seconds:.0f} s ({note})")

    if study.jobs == 1:  # on this thread: torch ops on a second thread slow OpenMP here (see rewards.reward_async)
        for item in todo:
            run(item)
    else:
        with ThreadPoolExecutor(study.jobs) as pool:
            list(pool.map(run, todo))
    return runs


def evaluate_stage(
    study: StudyConfig, runs: dict[tuple[str, str, int], Path], out: Path, timings: Timings, log: Any = print
) -> list[Path]:
    """Evaluate the base model and every run (skipping JSON files already written)."""
    from diffusion_gym.nets import load_metric_nets

    from .evaluation import evaluate_model, write_evaluation

    e = study.evaluation
    settings = EvalSettings(
        num_samples=e.num_samples,
        seed=e.seed,
        num_steps=e.num_steps,
        eta=e.eta,
        batch_size=e.batch_size,
        metric_nets=e.metric_nets,
        rewards=list(study.rewards),
    )
    items = [("base", study.base_model, {"method": "base"})]
    items += [(run_dir.name, str(run_dir), _run_meta(study, *key)) for key, run_dir in runs.items()]
    nets = None
    paths = [out / "eval" / f"{name}.json" for name, _, _ in items]
    todo = [(item, path) for item, path in zip(items, paths, strict=True) if not path.is_file()]
    stage_start = time.perf_counter()
    for done, ((name, model, meta), path) in enumerate(todo, start=1):
        tic = time.perf_counter()
        if nets is None:
            from diffusion_gym.models import load_model

            unet = load_model(study.base_model).unet
            shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            nets = load_metric_nets(e.metric_nets, image_shape=shape)
        result, arrays = evaluate_model(model, settings, label=name, meta=meta, metric_nets=nets)
        write_evaluation(result, arrays, path)
        seconds = time.perf_counter() - tic
        timings.add("evaluate", name, seconds)
        log(f"  evaluate {name}: {seconds:.0f} s ({progress_note(done, len(todo), time.perf_counter() - stage_start)})")
    return paths


def _injection_path(out: Path, reward: str) -> Path:
    return out / "eval" / f"injection__{reward}.json"


def cached_injections(study: StudyConfig, out: Path) -> dict[str, dict[str, Any]]:
    """The injection results already written for the study's rewards (none when the study has no injection)."""
    if study.injection is None:
        return {}
    paths = {reward: _injection_path(out, reward) for reward in study.rewards}
    return {reward: json.loads(path.read_text()) for reward, path in paths.items() if path.is_file()}


def injection_stage(
    study: StudyConfig, runs: dict[tuple[str, str, int], Path], out: Path, timings: Timings, log: Any = print
) -> dict[str, dict[str, Any]]:
    """The Appendix A.1 experiment per reward on ``injection.method``'s first seed."""
    from diffusion_gym.models import load_model

    from .evaluation import injection_study, resolve_model_spec

    inj = study.injection
    if inj is None:
        return {}
    results = {}
    base = load_model(study.base_model)
    for reward in study.rewards:
        path = _injection_path(out, reward)
        if not path.is_file():
            tic = time.perf_counter()
            tuned = load_model(resolve_model_spec(runs[(inj.method, reward, study.seeds[0])]))
            data = injection_study(
                tuned,
                base,
                inj.steps,
                inj.num_samples,
                study.evaluation.num_steps,
                study.evaluation.eta,
                inj.seed,
            )
            data.update(method=inj.method, task=reward, seed=study.seeds[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
            timings.add("injection", reward, time.perf_counter() - tic)
        results[reward] = json.loads(path.read_text())
    log("  injection sampling: done")
    return results


def load_comparisons(
    study: StudyConfig, base: dict[str, Any], base_path: str | os.PathLike[str]
) -> list[dict[str, Any]]:
    """The evaluations of ``study.compare_with``, checked against this study's base evaluation.

    Args:
        study: the study (its ``compare_with`` files and rewards).
        base: this study's evaluation of the base model (``<out_dir>/eval/base.json``).
        base_path: where ``base`` was read, for error messages.

    Returns:
        Every evaluation of every file, each with ``compared_from`` (the file) and without per-sample arrays.

    Raises:
        ValueError: naming the file, the field and both values when an evaluation's settings (those of
            :data:`COMPARED_SETTINGS`, the rewards this study uses), networks or initial noise differ.
    """
    out = []
    for item in study.compare_with:
        data = json.loads(Path(item).read_text())
        if not isinstance(data, list) or not all(isinstance(e, dict) and "settings" in e for e in data):
            raise ValueError(
                f"compare_with: {item} is not an evaluations.json (a list of `diffusion-gym evaluate` results)"
            )
        for entry in data:
            label = entry.get("label", "?")

            def differ(field: str, theirs: Any, ours: Any, item: str = item, label: str = label) -> ValueError:
                return ValueError(
                    f"compare_with: {item}: evaluation {label!r} is not comparable: {field} is {theirs!r} there but "
                    f"{ours!r} in this study's base evaluation ({base_path})"
                )

            for key in COMPARED_SETTINGS:
                theirs, ours = entry["settings"].get(key), base["settings"].get(key)
                if theirs != ours:
                    raise differ(f"settings.{key}", theirs, ours)
            missing = [r for r in study.rewards if r not in entry.get("rewards", {})]
            if missing:
                raise differ("rewards", sorted(entry.get("rewards", {})), list(study.rewards))
            for field in ("inception_score", "vendi_embedding"):
                theirs, ours = entry[field].get("network"), base[field].get("network")
                if theirs != ours:
                    raise differ(f"{field}.network", theirs, ours)
            if entry.get("initial_noise_digest") != base["initial_noise_digest"]:
                raise differ("initial_noise_digest", entry.get("initial_noise_digest"), base["initial_noise_digest"])
            clean = {k: v for k, v in entry.items() if k != "arrays" and not k.startswith("_")}
            out.append({**clean, "compared_from": str(item)})
    return out


def run_study(config_path: str | os.PathLike[str], stages: str = "all", log: Any = print) -> Path:
    """Run the study's stages (``all``, or a comma list of train, evaluate, injection, report)."""
    valid = ("train", "evaluate", "injection", "report")
    wanted = valid if stages == "all" else tuple(s.strip() for s in stages.split(","))
    bad = [s for s in wanted if s not in valid]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; valid choices: all or a comma list of {list(valid)}")
    study = load_study(config_path)
    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    sweep = study.sweep
    swept = (
        f" + {sweep.method}'s {sweep.key} at {len(sweep.values)} values × {len(sweep.seeds or study.seeds)} seeds"
        if sweep
        else ""
    )
    log(
        f"study {config_path}: {len(study.methods)} methods × {len(study.rewards)} rewards × {len(study.seeds)} seeds"
        + swept
    )

    def timed(stage: str, fn: Any, *args: Any) -> Any:
        """Run a stage; its wall-clock time is recorded when it did any work."""
        before = len(timings.added)
        tic, start = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        value = fn(*args)
        done = timings.added[before:].count(stage)
        if done:  # skipped stages keep their old time; a call that redid some items says how many
            timings.add("wall", stage, time.perf_counter() - tic, start=start, items=done)
        return value

    if "train" in wanted:
        runs = timed("train", train_stage, study, out, timings, log)
    else:
        runs = planned_runs(study, out)
    if "evaluate" in wanted and study.prompt_following is None:  # prompt-following runs evaluate themselves
        timed("evaluate", evaluate_stage, study, runs, out, timings, log)
    if "injection" in wanted:
        injections = timed("injection", injection_stage, study, runs, out, timings, log)
    else:  # a report alone still shows the injection results an earlier call wrote
        injections = cached_injections(study, out)
    if "report" not in wanted:
        return out
    if study.prompt_following is not None:
        return prompt_report_stage(study, config_path, runs, timings, log)
    return report_stage(study, config_path, out, timings, injections, log, runs)


def _report_header(config_path: str | os.PathLike[str], timings: Timings) -> list[str]:
    """The report's first lines: the command that produced it, when its stages ran, the machine."""
    target = os.environ.get("DIFFUSION_GYM_MAKE_PAPER")  # set by the Makefile: 1 (make paper) or the target
    command = (
        f"make {'paper' if target == '1' else target}"
        if target
        else "diffusion-gym paper --config " + shlex.quote(str(config_path))
    )
    return [
        f"Produced by `{command}` (study config `{config_path}`); stages started "
        + ", ".join(f"{t['name']} {t['start']}" for t in timings.items if t["stage"] == "wall" and "start" in t)
        + f"; report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine_description()}.",
    ]


def prompt_report_stage(
    study: StudyConfig,
    config_path: str | os.PathLike[str],
    runs: dict[tuple[str, str, int], Path],
    timings: Timings,
    log: Any = print,
) -> Path:
    """Write a prompt-following study's report from its runs' ``eval.jsonl`` curves."""
    from .prompt_report import Guards, read_run, write_prompt_report

    p = study.prompt_following
    assert p is not None
    tic = time.perf_counter()
    curves = [read_run(path, method, seed) for (method, _, seed), path in runs.items()]
    guards = Guards(p.data_ink_margin_p90, p.margin_factor, p.diversity_floor)
    path = write_prompt_report(
        curves,
        Path(study.report_dir),
        title=study.title,
        header=_report_header(config_path, timings),
        target=p.target,
        levels=p.levels,
        guards=guards,
        timings=timings.items,
    )
    timings.add("report", "report", time.perf_counter() - tic)
    log(f"report: {path}")
    return path


FRONT_METRICS = {
    "inception_score": "Inception Score (one split)",
    "class_agreement": "class agreement",
    "vendi_embedding": "embedding Vendi",
    "vendi_pixel": "pixel Vendi",
    "vendi_pixels": "within-class pixel Vendi",
    "held_out/digit_confidence": "digit confidence",
}
"""``eval.jsonl`` fields drawn against the reward along training (when a study's runs evaluate along the way)."""


def front_sections(study: StudyConfig, runs: dict[tuple[str, str, int], Path], report_dir: Path) -> list[str]:
    """The fronts of each task's method runs (sweep runs left out); none when a run evaluated fewer than 3 times."""
    from .fronts import front_lines
    from .prompt_report import read_run

    lines: list[str] = []
    for reward in study.rewards:
        mine = [(m, s, path) for (m, r, s), path in runs.items() if r == reward and m in study.methods]
        curves = [read_run(path, m, s) for m, s, path in mine if (path / "eval.jsonl").is_file()]
        if not curves or len(curves) < len(mine) or min(len(c.rows) for c in curves) < 3:
            continue  # evaluated only at the end (eval.every = num_epochs): no front to draw
        titles = {k: t for k, t in FRONT_METRICS.items() if curves[0].rows[0].get(k) is not None}
        lines += front_lines(
            curves,
            titles,
            report_dir,
            heading=f"Fronts: {reward}",
            figure=f"fronts_{reward}.png",
            pairs=study.front_pairs,
        )
    return lines


def report_stage(
    study: StudyConfig,
    config_path: str | os.PathLike[str],
    out: Path,
    timings: Timings,
    injections: dict[str, Any],
    log: Any = print,
    runs: dict[tuple[str, str, int], Path] | None = None,
) -> Path:
    """Write the study's report (with any ``compare_with`` rows) and the per-model metrics next to it."""
    from .report import merge_results, write_report

    tic = time.perf_counter()
    header = _report_header(config_path, timings)
    own = [json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json")) if "injection" not in p.name]
    compared: list[dict[str, Any]] = []
    if study.compare_with:
        base_path = out / "eval" / "base.json"
        if not base_path.is_file():
            raise ValueError(f"compare_with needs this study's base evaluation {base_path}: run the evaluate stage")
        compared = merge_results(own, load_comparisons(study, json.loads(base_path.read_text()), base_path))[len(own) :]
        header.append(
            "Rows from earlier studies (same evaluation settings and initial noise, not re-run here): "
            + "; ".join(
                f"`{item}` ({sum(e['compared_from'] == item for e in compared)} evaluations)"
                for item in study.compare_with
            )
            + "."
        )
    report_dir = Path(study.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = write_report(
        [out / "eval"],
        report_dir,
        title=study.title,
        header=header,
        injections=injections,
        timings=timings.items,
        extra=compared,
        notes=front_sections(study, runs if runs is not None else planned_runs(study, out), report_dir),
    )
    timings.add("report", "report", time.perf_counter() - tic)
    # the per-model metrics travel with the report (the arrays stay in out_dir); compared ones say where from
    (report_dir / "evaluations.json").write_text(json.dumps([*own, *compared], indent=1))
    log(f"report: {path}")
    return path
