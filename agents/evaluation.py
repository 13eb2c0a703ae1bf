"""Evaluate models the way the HRF paper does: reward mean ± SE, Inception Score, Vendi scores.

Every model is sampled from **the same initial noise** (``initial_noise(seed)``, drawn on the CPU)
and the same conditions, so sample ``i`` of the base model and of every fine-tuned model start
from the same ``x_K``: the comparisons are paired, as the paper's "same initial noise" protocol.

:func:`evaluate_model` returns a JSON-ready dict (written by ``diffusion-gym evaluate``) and the
per-sample arrays (rewards, embeddings) the report's projection plot uses; :func:`injection_study`
is the paper's Appendix A.1 experiment (switch from the fine-tuned to the base model mid-chain).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffusion_gym import metrics, sampling
from diffusion_gym.models import LoadedModel, load_model
from diffusion_gym.rewards import make_reward

from .common.eval_settings import EvalSettings

SCHEMA_VERSION = 1

IS_SAMPLES_PER_CLASS = 5
"""An Inception Score split needs at least this many samples per class of the IS network, else a warning.

A split of ``m`` samples scores ``exp(mean_i KL(p(y|x_i) ‖ p̂(y)))`` with ``p̂`` the split's mean prediction: it
can never exceed ``m`` (``p̂ >= p(y|x_i) / m``), and the entropy of ``p̂`` is biased low by about
``(C − 1) / 2m`` nats for ``C`` classes. From ``m = 5 C`` on that is under 0.1 nats (a score about 10 % low at
most); for the 10-class digits classifier: 50 samples per split, 500 with the 10 default splits; for Inception's
1,008 classes: 5,040 per split, torch-fidelity's usual 50,000 samples in 10 splits.

Measured with the digits classifier (10 splits, 40 DDIM steps, eta 1), the base model scores 4.99 at n = 50
(5 per split: the cap), 9.97 at n = 100, 9.87 at n = 200, 9.95 at n = 500 and 9.94 at n = 1,000 with the
evaluation seed 2024 (seed 7: 5.00, 9.97, 9.91 at n = 50, 100, 200). The base model draws its classes in turn,
so each split holds every class equally often and shows no further bias from 10 per split on; a model whose
classes drift from the ones it is asked for does. Simulated, a model drawing its classes
at random (confident predictions, true IS 9.93) scores 3.9, 5.9, 7.7, 9.0, 9.5 and 9.7 at 5, 10, 20, 50,
100 and 200 samples per split.
"""


def resolve_model_spec(spec: str | os.PathLike[str]) -> str:
    """A model spec for :func:`load_model`: a training run or checkpoint becomes its latest checkpoint, verified.

    Raises:
        CheckpointError: when the checkpoint is missing, incomplete or fails its sha256 check.
    """
    from .common.checkpoint import verify_checkpoint

    path = Path(spec)
    if (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
        return str(verify_checkpoint(path))
    return str(spec)


def _noise_digest(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _conditions(loaded: LoadedModel, n: int) -> Tensor | None:
    num_classes = getattr(loaded.unet.config, "num_class_embeds", None)
    return None if num_classes is None else torch.arange(n) % num_classes


@torch.no_grad()
def sample_paired(
    loaded: LoadedModel, settings: EvalSettings, n: int | None = None
) -> tuple[Tensor, Tensor | None, str]:
    """``n`` images in ``[0, 1]`` from the evaluation noise, their conditions, and a digest of sample 0's noise.

    The digest is taken from what the network actually receives at the first step, so two models
    with equal digests provably started sample 0 from the same ``x_K``.
    """
    n = settings.num_samples if n is None else n
    unet = loaded.unet
    schedule = sampling.make_schedule(loaded.scheduler, settings.num_steps, eta=settings.eta, device=settings.device)
    base = sampling.unet_denoiser(unet)
    seen: dict[str, str] = {}

    def recording(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        if "first" not in seen:
            seen["first"] = _noise_digest(x[0])
        return base(x, t, c)

    conditions = _conditions(loaded, n)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = sampling.generate(
        recording,
        schedule,
        n,
        shape,
        conditions,
        seed=settings.seed,
        device=settings.device,
        batch_size=settings.batch_size,
    )
    return sampling.to_unit_range(x).cpu(), conditions, seen["first"]


def warn_if_few_is_samples(num_samples: int, splits: int, num_classes: int, label: str = "") -> bool:
    """Warn (``RuntimeWarning``) when the Inception Score of ``num_samples`` samples in ``splits`` splits is biased low.

    Args:
        num_samples: samples scored.
        splits: Inception Score splits.
        num_classes: classes of the IS network (10 for the digits classifier, 1,008 for Inception).
        label: the model, named in the warning.

    Returns:
        Whether it warned: fewer than :data:`IS_SAMPLES_PER_CLASS` × ``num_classes`` samples per split.
    """
    per_split, needed = num_samples // splits, IS_SAMPLES_PER_CLASS * num_classes
    if per_split >= needed:
        return False
    warnings.warn(
        f"{label + ': ' if label else ''}the Inception Score of {num_samples} samples in {splits} splits "
        f"({per_split} per split) is biased low and not comparable with larger evaluations: a split scores at "
        f"most its sample count, and {num_classes} classes need about {needed} per split; evaluate at least "
        f"{needed * splits} samples (e.g. the digits base model scores 4.99 at n = 50, 9.95 at n = 500)",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


class ImageScores(NamedTuple):
    """What :func:`score_images` returns."""

    values: dict[str, float]
    """``inception_score`` (± ``inception_score_std`` over splits), ``vendi_pixel``, ``vendi_embedding`` and, when
    the classifier knows the conditions' classes, ``class_agreement``."""
    embeddings: Tensor
    """The embedding network's features of each image (CPU)."""
    predicted: Tensor
    """The classifier's most probable class of each image."""


def score_images(
    images: Tensor,
    conditions: Tensor | None,
    nets: Any,
    *,
    pixel_size: int = 32,
    is_splits: int = 10,
    device: str | torch.device = "cpu",
    label: str = "",
) -> ImageScores:
    """The sample metrics of an evaluation: Inception Score, Vendi scores of pixels and embeddings, class agreement.

    Args:
        images: images in ``[0, 1]``, ``(N, C, H, W)``.
        conditions: each image's class id (class-conditional models), else ``None`` (prompts, unconditional).
        nets: a ``MetricNets`` (:func:`diffusion_gym.nets.load_metric_nets`).
        pixel_size: side the images are resized to for the pixel Vendi score.
        is_splits: Inception Score splits.
        device: where the networks run.
        label: the model, named in the few-samples warning.

    Returns:
        The scores; ``class_agreement`` (the share of images the digit classifier assigns to their conditioned
        class) only for the digit classifier and integer class ids.

    Warns:
        RuntimeWarning: too few samples per Inception Score split (:func:`warn_if_few_is_samples`).
    """
    cls = metrics.classifier_outputs(nets.classifier, images.to(device))
    warn_if_few_is_samples(len(images), is_splits, cls.probs.shape[1], label=label)
    score = metrics.inception_score(cls.probs, splits=is_splits)
    if nets.embedder is nets.classifier:
        embeddings = cls.features
    else:
        embeddings = torch.cat([nets.embedder.features(b.to(device)).float().cpu() for b in images.split(64)])
    values = {
        "inception_score": score.mean,
        "inception_score_std": score.std,
        "vendi_pixel": metrics.pixel_vendi(images, pixel_size),
        "vendi_embedding": metrics.vendi_score(embeddings),
    }
    predicted = cls.probs.argmax(1)
    is_class_ids = isinstance(conditions, Tensor) and not torch.is_floating_point(conditions)
    if is_class_ids and nets.classifier_name == "digit-classifier":  # the classifier knows the classes
        values["class_agreement"] = float((predicted == conditions.cpu()).float().mean())
    return ImageScores(values, embeddings, predicted)


def _score_fields(values: dict[str, float], nets: Any) -> dict[str, Any]:
    """An evaluation JSON's fields of :func:`score_images`' values, naming the networks."""
    fields: dict[str, Any] = {
        "inception_score": {
            "mean": values["inception_score"],
            "std": values["inception_score_std"],
            "network": nets.classifier_name,
        },
        "vendi_pixel": values["vendi_pixel"],
        "vendi_embedding": {"value": values["vendi_embedding"], "network": nets.embedder_name},
    }
    if "class_agreement" in values:
        fields["class_agreement"] = values["class_agreement"]
    return fields


def evaluate_model(
    model: str | os.PathLike[str],
    settings: EvalSettings | None = None,
    *,
    label: str | None = None,
    meta: dict[str, Any] | None = None,
    metric_nets: Any = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample a model from the evaluation noise and score it.

    Args:
        model: a model spec (``embedded:digits``, hub id, diffusers folder) or a training run / checkpoint.
        settings: sampling and metric settings (defaults: :class:`EvalSettings`).
        label: a name for tables (default: the spec).
        meta: extra fields copied into the result (method, trained reward, seed…).
        metric_nets: a ``MetricNets`` (classifier for IS + embedder for Vendi); default: loaded per
            ``settings.metric_nets``.

    Returns:
        ``(result, arrays)``: the JSON-ready metrics and per-sample arrays (``rewards_<name>``,
        ``embeddings``, ``conditions``, ``predicted``).

    Warns:
        RuntimeWarning: too few samples per Inception Score split (:func:`warn_if_few_is_samples`: digits, < 500).
    """
    from diffusion_gym.nets import load_metric_nets

    settings = settings or EvalSettings()
    settings.check()
    spec = resolve_model_spec(model)
    timings: dict[str, float] = {}
    tic = time.perf_counter()
    loaded = load_model(spec, scheduler=settings.scheduler, device=settings.device)
    images, conditions, digest = sample_paired(loaded, settings)
    timings["sampling"] = time.perf_counter() - tic

    tic = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "label": label or str(model),
        "model": str(model),
        "resolved": spec,
        **(meta or {}),
        "settings": asdict(settings),
        "initial_noise_digest": digest,
        "rewards": {},
    }
    arrays: dict[str, np.ndarray] = {}
    c = None if conditions is None else conditions
    for name in settings.rewards:
        values = make_reward(name)(images, c).float().cpu()
        stat = metrics.mean_and_standard_error(values)
        result["rewards"][name] = {"mean": stat.mean, "se": stat.std}
        arrays[f"rewards_{name}"] = values.numpy()
    timings["rewards"] = time.perf_counter() - tic

    tic = time.perf_counter()
    shape = tuple(images.shape[1:])
    nets = metric_nets or load_metric_nets(settings.metric_nets, image_shape=shape, device=settings.device)
    scores = score_images(
        images,
        conditions,
        nets,
        pixel_size=settings.pixel_size,
        is_splits=settings.is_splits,
        device=settings.device,
        label=label or str(model),
    )
    result.update(_score_fields(scores.values, nets))
    timings["metrics"] = time.perf_counter() - tic
    result["seconds"] = timings
    arrays["embeddings"] = scores.embeddings.numpy().astype(np.float32)
    arrays["predicted"] = scores.predicted.numpy()
    if conditions is not None:
        arrays["conditions"] = conditions.numpy()
    arrays["images_uint8"] = (images[:100] * 255).round().to(torch.uint8).numpy()
    return result, arrays


def summary_line(result: dict[str, Any]) -> str:
    """One line of a model's evaluation: each reward ± SE, class agreement (digits), Inception Score, Vendi."""
    parts = [", ".join(f"{k} {v['mean']:.4f} ± {v['se']:.4f}" for k, v in result["rewards"].items())]
    if "class_agreement" in result:
        parts.append(f"class agreement {100 * result['class_agreement']:.1f}%")
    parts.append(f"IS {result['inception_score']['mean']:.2f}")
    parts.append(f"Vendi pixels {result['vendi_pixel']:.3f}, embeddings {result['vendi_embedding']['value']:.3f}")
    return "; ".join(parts)


def comparison_line(baseline: dict[str, Any], result: dict[str, Any]) -> str:
    """How ``result`` moved from ``baseline`` (both from the same evaluation noise): a line for people.

    Each shared reward's change in units of the difference's standard error ``hypot(SE_a, SE_b)`` (the two
    sample means taken as independent: conservative, as the samples are paired), then the class agreement and
    the Inception Score before and after.
    """
    parts = []
    for name, after in result["rewards"].items():
        before = baseline["rewards"].get(name)
        if before is None:
            continue
        se = math.hypot(before["se"], after["se"])
        gain = after["mean"] - before["mean"]
        z = gain / se if se > 0 else float("inf") if gain else 0.0
        parts.append(f"{name} {before['mean']:.4f} -> {after['mean']:.4f} ({gain:+.4f}, {z:+.1f} SE)")
    if "class_agreement" in baseline and "class_agreement" in result:
        parts.append(
            f"class agreement {100 * baseline['class_agreement']:.1f}% -> {100 * result['class_agreement']:.1f}%"
        )
    parts.append(f"IS {baseline['inception_score']['mean']:.2f} -> {result['inception_score']['mean']:.2f}")
    return f"{result['label']} vs {baseline['label']}: " + "; ".join(parts)


def write_evaluation(result: dict[str, Any], arrays: dict[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as JSON at ``path`` and the arrays next to it (``.npz``), each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    npz = path.with_suffix(".npz")
    result = {**result, "arrays": npz.name}
    tmp = npz.with_name(npz.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(npz)
    tmp_json = path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    tmp_json.replace(path)
    return path


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ``1 − cos(a_i, b_i)`` of flattened images."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
    return (1 - cos).clamp(min=0)


@torch.no_grad()
def injection_study(
    finetuned: LoadedModel,
    base: LoadedModel,
    injection_steps: Sequence[int] = (38, 35, 30, 25, 20, 10),
    num_samples: int = 15,
    num_steps: int = 40,
    eta: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """The paper's Appendix A.1: start sampling with the fine-tuned model, switch to the base model.

    Injection steps are on the paper's axis (``num_steps`` = noisiest, 0 = the final sample): with
    injection step ``s`` the fine-tuned model takes the first ``num_steps − s`` steps and the base
    model the rest. All chains share the initial noise and the policy noise of every step, so they
    differ only by the model that denoised. At every step the x̂0 prediction of each injected chain
    is compared with the fine-tuned chain's (cosine distance, mean over samples); the final images
    are also compared with the base model's own samples.

    Returns:
        JSON-ready ``{"axis": [...], "curves": {s: [...]}, "final_to_finetuned": {s: d},
        "final_to_base": {s: d}, ...}``, steps on the paper's axis.
    """
    for s in injection_steps:
        if not 0 <= s <= num_steps:
            raise ValueError(f"injection steps must lie in [0, {num_steps}] (paper axis), got {s}")
    schedule = sampling.make_schedule(finetuned.scheduler, num_steps, eta=eta, device=device)
    shape = (finetuned.unet.config.in_channels, finetuned.unet.config.sample_size, finetuned.unet.config.sample_size)
    x_start = sampling.initial_noise(num_samples, shape, seed, device)
    num_classes = getattr(finetuned.unet.config, "num_class_embeds", None)
    c = None if num_classes is None else (torch.arange(num_samples) % num_classes).to(device)
    noise = torch.randn((num_steps, num_samples, *shape), generator=torch.Generator().manual_seed(seed + 1))
    shared_noise = sampling.PrecomputedNoise(noise)
    finetuned_net, base_net = sampling.unet_denoiser(finetuned.unet), sampling.unet_denoiser(base.unet)

    def chain(switch: int) -> tuple[Tensor, list[Tensor]]:
        x0s: list[Tensor] = []

        def record(k: int, step: sampling.StepOutput) -> None:
            x0s.append(step.x0)

        x = sampling.denoise_chain(finetuned_net, x_start, schedule, c, stop=switch, noise=shared_noise, on_step=record)
        x = sampling.denoise_chain(base_net, x, schedule, c, start=switch, noise=shared_noise, on_step=record)
        return x, x0s

    ref_final, ref_x0 = chain(num_steps)
    base_final, _ = chain(0)
    out: dict[str, Any] = {
        "axis": [num_steps - k for k in range(num_steps)],
        "num_samples": num_samples,
        "seed": seed,
        "curves": {},
        "final_to_finetuned": {},
        "final_to_base": {},
    }
    for s in injection_steps:
        final, x0s = chain(num_steps - s)
        out["curves"][str(s)] = [_cosine_distance(a, b).mean().item() for a, b in zip(x0s, ref_x0, strict=True)]
        out["final_to_finetuned"][str(s)] = _cosine_distance(final, ref_final).mean().item()
        out["final_to_base"][str(s)] = _cosine_distance(final, base_final).mean().item()
    out["finetuned_to_base"] = _cosine_distance(ref_final, base_final).mean().item()
    return out
