"""The ``diffusion-gym`` command line.

Subcommands:
    train     PPO-IS (DDPO-IS / HRF / HRF-D), GRPO (``--algo grpo``) or VARD (``--algo vard``) from a YAML config.
    sample    draw a PNG grid of images from a model or a training checkpoint.
    evaluate  reward ± SE, Inception Score and Vendi scores of models, all from the same noise (JSON).
    report    the paper's tables and plots from evaluation JSON files (Markdown + PNG).
    paper     the whole experiment: train every method × reward × seed, evaluate, report.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusion_gym import __version__

from .algorithms import algorithm_names

# Heavy modules (torch, diffusers) are imported inside the commands, after the arguments are parsed:
# `diffusion-gym --help` and a usage error answer at once.
DEFAULT_MODEL = "embedded:digits"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model spec: embedded:digits, random:<arch>, a hub id (cache only when offline) or a local "
        f"diffusers directory (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--weights", default=None, metavar="DIR", help="a local diffusers directory to load; overrides --model"
    )
    _add_device_argument(parser)


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="torch device: cpu, cuda, cuda:N, or auto (cuda when present; default)"
    )


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a CUDA device that is not there is an error.

    Raises:
        ValueError: for a device string torch does not parse, or a CUDA device that is not available.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; valid choices: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s); use --device cpu")
    return name


def _add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="write a PNG grid of samples from a model")
    _add_model_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps K (default 40, as in the paper)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0: the stochastic policy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial and policy noise")
    p.add_argument(
        "--class",
        dest="class_id",
        type=int,
        default=None,
        help="condition of a class-conditional model (default: cycle through the classes)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="a training run directory (its latest checkpoint), its checkpoints/ or one checkpoint, verified before "
        "loading; overrides --model (which refuses training runs)",
    )
    p.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    p.set_defaults(func=_run_sample)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune with PPO-IS (DDPO / HRF / HRF-D) or VARD from a YAML config")
    p.add_argument(
        "--algo",
        choices=algorithm_names(),
        default=None,
        help="trainer and config schema: ppo-is (DDPO / HRF / HRF-D / DRIFT), grpo (Flow-GRPO) or vard; default: the "
        "config's algo field, else ppo-is (a contradicting config is an error)",
    )
    p.add_argument("--config", default=None, help="YAML file (envs_configs/*.yaml); default: built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, YAML-typed (repeatable), e.g. --set train.learning_rate=1e-4",
    )
    p.add_argument(
        "--run-dir", default=None, help="run directory (default: <logdir>/<run_name or time>; on resume: the run's own)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_OR_CHECKPOINT",
        help="continue a run (its latest checkpoint) or a checkpoint, with its own config and run directory; "
        "--set may change only epochs, eval/save cadence, device and logging then",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a run already in the run directory (default: refuse)"
    )
    p.add_argument("--weights", default=None, metavar="DIR", help="a local diffusers directory; overrides model")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=_run_train)


def _train_config(args: argparse.Namespace) -> Any:
    """The run's config: the YAML (or defaults) with ``--set``; on ``--resume`` alone, the checkpoint's own."""
    from .algorithms import get_schema, load_run_config

    overrides = list(args.overrides) + ([f"model={args.weights}"] if args.weights else [])
    if args.resume is None or args.config is not None:
        return load_run_config(args.config, overrides, algo=args.algo)  # a resume then checks it is the same run
    from .common.checkpoint import load_checkpoint
    from .common.run_dir import config_for_resume

    saved = load_checkpoint(args.resume).state.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {args.resume}: the checkpoint holds no run config; pass --config")
    if args.algo is not None and saved.get("algo") != args.algo:
        raise ValueError(f"--resume {args.resume}: the run is algo {saved.get('algo')!r}, not --algo {args.algo}")
    return config_for_resume(saved, overrides, get_schema(str(saved.get("algo"))))


def _run_train(args: argparse.Namespace) -> int:
    from .algorithms import train

    what = f"resuming {args.resume}" if args.resume else f"config {args.config or '<defaults>'}"
    print(f"diffusion-gym train: {what}; loading torch and the model...", flush=True)
    config = _train_config(args)
    device = resolve_device(config.device)
    if device != config.device:
        config = config.model_copy(update={"device": device})
    result = train(
        config, run_dir=args.run_dir, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite
    )
    last = result.epochs[-1] if result.epochs else None
    print(f"run directory: {result.run_dir.resolve()}")
    print(f"  TensorBoard logs: {(result.run_dir / 'tb').resolve()}  (tensorboard --logdir {result.run_dir})")
    print(f"  checkpoints:      {(result.run_dir / 'checkpoints').resolve()}")
    print(f"  sample grids:     {(result.run_dir / 'samples').resolve()}  (fixed evaluation noise, per eval epoch)")
    if last is not None and result.base_eval_reward is not None and result.final_eval_reward is not None:
        print(
            f"  fixed-noise eval reward ({config.env.reward}): base {result.base_eval_reward:.4f} -> "
            f"{result.final_eval_reward:.4f} after {last.epoch + 1} epochs"
        )
    if result.stopped_early:
        print(f"  stopped early: {result.stopped_early}")
    return 0


def _refuse_training_dir(spec: str, flag: str) -> None:
    """Raise ``ValueError`` (pointing to ``--checkpoint``) when ``spec`` names a training run, not a model.

    A run directory (``checkpoints/`` inside), a ``checkpoints/`` directory and a checkpoint without a complete
    diffusers pipeline (``model_index.json``, ``unet/``, ``scheduler/``) are read by ``--checkpoint``; a checkpoint
    that is a complete pipeline still loads as a model.
    """
    from .common.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, META_FILE

    path = Path(spec).expanduser()
    if not path.is_dir():
        return
    if (path / CHECKPOINTS_DIR).is_dir() or (path / LATEST_FILE).is_file() or any(path.glob("epoch-*")):
        raise ValueError(f"{flag} {spec} is a training run, not a model directory: use --checkpoint {spec}")
    pipeline = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")
    if (path / META_FILE).is_file() and not all((path / name).is_file() for name in pipeline):
        missing = [name for name in pipeline if not (path / name).is_file()]
        raise ValueError(
            f"{flag} {spec} is a training checkpoint without a diffusers pipeline (missing {', '.join(missing)}): "
            f"use --checkpoint {spec}"
        )


def _run_sample(args: argparse.Namespace) -> int:
    import torch
    from torchvision.utils import save_image

    from diffusion_gym import sampling
    from diffusion_gym.models import load_model

    args.device = resolve_device(args.device)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    spec = args.weights or args.model
    if args.checkpoint:
        from .common.checkpoint import verify_checkpoint

        spec = str(
            verify_checkpoint(args.checkpoint)
        )  # a checkpoint is a diffusers pipeline folder (model_index.json, unet/, scheduler/)
    else:
        _refuse_training_dir(spec, "--weights" if args.weights else "--model")
    unet, scheduler = load_model(spec, device=args.device)
    schedule = sampling.make_schedule(scheduler, args.steps, eta=args.eta, device=args.device)
    num_classes = unet.config.num_class_embeds
    conditions = None
    if num_classes is not None:
        if args.class_id is not None and not 0 <= args.class_id < num_classes:
            raise ValueError(f"--class must lie in [0, {num_classes - 1}], got {args.class_id}")
        conditions = torch.full((args.n,), args.class_id) if args.class_id is not None else torch.arange(args.n)
        conditions = conditions % num_classes
    elif args.class_id is not None:
        raise ValueError("--class was given but the model is unconditional")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    start = time.perf_counter()
    x = sampling.generate(
        sampling.unet_denoiser(unet),
        schedule,
        args.n,
        shape,
        conditions,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nrow = num_classes if conditions is not None and args.class_id is None else int(args.n**0.5 + 0.5)
    save_image(sampling.to_unit_range(x), out, nrow=nrow, padding=1, pad_value=0.5)
    what = f"{args.n} samples of {args.checkpoint or spec} ({args.steps} DDIM steps, eta {args.eta})"
    print(f"wrote {what} to {out.resolve()} in {seconds:.1f} s")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    from .common.eval_settings import EvalSettings

    d = EvalSettings()
    p = subparsers.add_parser(
        "evaluate", help="score models on the same evaluation noise: reward ± SE, IS, Vendi (one JSON per model)"
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="model specs (embedded:digits, a hub id, a diffusers folder) or training runs / checkpoints; "
        "NAME=SPEC sets the file name and label; every model after the first is compared with the first "
        "(reward change in SE, class agreement and IS before -> after)",
    )
    p.add_argument("--out", default="eval", help="directory for <name>.json (+ .npz arrays) (default eval/)")
    p.add_argument("--n", type=int, default=d.num_samples, help=f"samples per model (default {d.num_samples})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the shared evaluation noise (default {d.seed})")
    p.add_argument("--steps", type=int, default=d.num_steps, help=f"DDIM steps (default {d.num_steps})")
    p.add_argument("--eta", type=float, default=d.eta, help=f"DDIM eta (default {d.eta})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--reward", dest="rewards", action="append", default=None, help="reward (repeatable; default: both JPEG)"
    )
    p.add_argument(
        "--metric-nets",
        default=d.metric_nets,
        help="digits (embedded classifier), inception (InceptionV3 + CLIP, weights from cache or the flags below) "
        "or auto (digits for 16x16 grey models)",
    )
    p.add_argument("--inception-weights", default=None, metavar="FILE", help="inception_v3_google-0cc3c7bd.pth")
    p.add_argument("--clip-weights", default=None, metavar="FILE", help="open_clip ViT-L-14 'openai' checkpoint")
    p.add_argument("--method", default=None, help="method name recorded for the report (e.g. ddpo, hrf-early, base)")
    p.add_argument("--task", default=None, help="the reward the models were fine-tuned on, for the report")
    _add_device_argument(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from diffusion_gym.models import load_model
    from diffusion_gym.nets import load_metric_nets

    from .evaluation import (
        EvalSettings,
        comparison_line,
        evaluate_model,
        resolve_model_spec,
        summary_line,
        write_evaluation,
    )
    from .paper import progress_note

    args.device = resolve_device(args.device)
    settings = EvalSettings(
        num_samples=args.n,
        seed=args.seed,
        num_steps=args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        metric_nets=args.metric_nets,
        rewards=args.rewards or EvalSettings().rewards,
        device=args.device,
    )
    settings.check()
    first = load_model(resolve_model_spec(args.models[0].split("=", 1)[-1]), device=args.device).unet
    shape = (first.config.in_channels, first.config.sample_size, first.config.sample_size)
    nets = load_metric_nets(
        args.metric_nets,
        image_shape=shape,
        inception_weights=args.inception_weights,
        clip_weights=args.clip_weights,
        device=args.device,
    )
    stage_start = time.perf_counter()
    results: list[dict] = []
    for done, item in enumerate(args.models, start=1):
        name, _, spec = item.rpartition("=")
        name = name or Path(spec.rstrip("/")).name.replace(":", "_")
        meta = {k: v for k, v in (("method", args.method or name), ("task", args.task)) if v is not None}
        start = time.perf_counter()
        result, arrays = evaluate_model(spec, settings, label=name, meta=meta, metric_nets=nets)
        path = write_evaluation(result, arrays, Path(args.out) / f"{name}.json")
        print(f"{name}: {summary_line(result)} ({time.perf_counter() - start:.0f} s) -> {path}")
        print(f"  [{progress_note(done, len(args.models), time.perf_counter() - stage_start)}]", flush=True)
        results.append(result)
    for result in results[1:]:  # every model against the first (same noise, same conditions)
        print(comparison_line(results[0], result))
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="Markdown tables and plots (paper Tables 1-3, Fig. 5) from evaluations")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="evaluation JSON files or directories of them")
    p.add_argument("--out", default="report", help="output directory (report.md + PNG figures)")
    p.add_argument("--title", default="Evaluation report")
    p.add_argument("--injection", action="append", default=[], metavar="JSON", help="injection-sampling JSON")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import json

    from .report import write_report

    injections = {}
    for item in args.injection:
        data = json.loads(Path(item).read_text())
        injections[data.get("task", Path(item).stem)] = data
    path = write_report(args.inputs, args.out, title=args.title, injections=injections or None)
    print(f"wrote {path.resolve()}")
    return 0


def _add_paper(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("paper", help="the paper's experiment: train methods x rewards x seeds, evaluate, report")
    p.add_argument("--config", default="envs_configs/paper_digits.yaml", help="study YAML (default: the digits study)")
    p.add_argument("--stages", default="all", help="all, or a comma list of train,evaluate,injection,report")
    p.set_defaults(func=_run_paper)


def _run_paper(args: argparse.Namespace) -> int:
    from .paper import run_study

    run_study(args.config, args.stages)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``diffusion-gym`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="diffusion-gym",
        description="RL fine-tuning of diffusion models as a Gymnasium problem.",
    )
    parser.add_argument("--version", action="version", version=f"diffusion-gym {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_evaluate(subparsers)
    _add_report(subparsers)
    _add_paper(subparsers)
    return parser


def _project_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as one ``error:`` line (exit 2) instead of a traceback."""
    import yaml

    from diffusion_gym.models import MissingWeightsError

    from .common.checkpoint import CheckpointError
    from .common.distributed import DistributedError
    from .common.runner import TrainingDivergedError

    return (ValueError, MissingWeightsError, CheckpointError, DistributedError, TrainingDivergedError, yaml.YAMLError)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffusion-gym`` console script: exit 0 on success, 2 on a reported error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"diffusion-gym {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"diffusion-gym {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if not isinstance(error, _project_errors()):
            raise
        print(f"diffusion-gym {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
