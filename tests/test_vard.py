"""VARD: the value fits a reward with a known answer; fine-tuning with it raises the reward; configs load."""

from pathlib import Path

import pytest
import torch

from agents.common.checkpoint import latest_checkpoint, load_checkpoint
from agents.ppo_is.config import ConfigError
from agents.vard import train
from agents.vard.config import VardConfig, load_vard_config
from agents.vard.value import ValueData, ValueNetwork, explained_variance, fit_value, state_timesteps
from diffusion_gym import sampling
from diffusion_gym.digits import load_digits_dataset
from diffusion_gym.models import load_model
from diffusion_gym.rewards import register_reward

# The embedded networks are tiny: one thread is as fast on quiet cores and far faster on busy ones.
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "envs_configs"


def _brightness_factory():
    def mean_brightness(images, conditions=None):
        return images.mean(dim=(1, 2, 3))

    return mean_brightness


register_reward("test_mean_brightness", _brightness_factory, overwrite=True)


def _noisy_digits(n, schedule, steps, generator):
    """Digits at random brightness scales, noised to random step indices in ``steps`` (K = clean)."""
    images, labels = load_digits_dataset()
    pick = torch.randint(len(images), (n,), generator=generator)
    x0 = images[pick] * (0.2 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator))  # [0, 1]
    target = x0.mean(dim=(1, 2, 3))  # the known answer: mean brightness of the clean image
    x0 = x0 * 2 - 1
    k = torch.tensor(steps)[torch.randint(len(steps), (n,), generator=generator)]
    K = schedule.num_steps
    noised = sampling.add_noise(x0, torch.randn(x0.shape, generator=generator), k.clamp(max=K - 1), schedule)
    x = torch.where((k == K).view(-1, 1, 1, 1), x0, noised)
    return ValueData(x=x, t=state_timesteps(schedule)[k], k=k, c=labels[pick], target=target)


def test_value_fits_a_synthetic_reward_better_than_the_constant_baseline():
    torch.manual_seed(0)
    _, scheduler = load_model("embedded:digits")
    schedule = sampling.make_schedule(scheduler, 10)
    g = torch.Generator().manual_seed(0)
    steps = [7, 8, 9, 10]  # near the end of the chain (and the clean image): x_t determines r(x_0)
    train_data, test_data = _noisy_digits(768, schedule, steps, g), _noisy_digits(256, schedule, steps, g)
    value = ValueNetwork(1, num_classes=10, width=16)
    assert explained_variance(value, test_data) < 0.2  # untrained: no better than a constant
    opt = torch.optim.Adam(value.parameters(), lr=2e-3)
    fitted = fit_value(value, opt, train_data, num_steps=250, batch_size=64, generator=g)
    assert fitted["explained_variance"] > 0.9
    held_out = explained_variance(value, test_data)
    mse = (value(test_data.x, test_data.t, test_data.c) - test_data.target).pow(2).mean()
    baseline = (train_data.target.mean() - test_data.target).pow(2).mean()  # the constant predictor
    assert held_out > 0.9 and mse < 0.1 * baseline, (held_out, mse.item(), baseline.item())
    # normalised units: the head predicts (r − mean) / std of the data it was fit on
    assert value.target_std.item() == pytest.approx(train_data.target.std().item(), rel=1e-5)


def test_value_gradient_reaches_the_image():
    value = ValueNetwork(1, num_classes=None, width=8, depth=1)
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    value(x, torch.tensor([900, 10, -25])).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="class-conditional"):
        ValueNetwork(1, num_classes=10)(x, torch.zeros(3))


def test_kl_to_reference_known_values():
    mean, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std = torch.tensor([0.5, 0.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(sampling.kl_same_std(mean, ref, std), torch.tensor([2.0, 0.0]))  # 1/(2·0.25); σ=0 → 0
    summed = sampling.kl_same_std(mean, ref, std, reduction="sum")  # the whole sample's KL: 4 dimensions
    torch.testing.assert_close(summed, torch.tensor([8.0, 0.0]))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        sampling.kl_same_std(mean, ref, std, reduction="max")


def _vard(path, overrides):
    """A VARD trainer built from a config file, as the runner builds it (no training)."""
    from agents.algorithms import load_run_config
    from agents.common.distributed import Distributed
    from agents.common.runner import RunContext
    from agents.vard.algorithm import VARD
    from diffusion_gym.conditions import make_conditions
    from diffusion_gym.families import load_family

    config = load_run_config(path, overrides, algo="vard")
    family = load_family(config.model, device="cpu")
    conditions = make_conditions(family, config.env.prompts)
    schedule = sampling.make_schedule(family.scheduler, config.sample.num_steps, config.sample.eta, "cpu")
    run = RunContext(config, family, conditions, schedule, Distributed(), torch.Generator().manual_seed(0))
    return VARD(config, run), conditions


def test_vards_kl_is_the_whole_samples_kl_by_default():
    """``train.kl_reduction: sum`` weighs the step KL D = 256 times the per-pixel mean on the 16×16 digits."""
    from agents.vard.algorithm import _unroll

    path = CONFIGS / "digits_vard_jpeg_compressibility.yaml"
    assert load_vard_config(path).train.kl_reduction == "sum"
    with pytest.raises(ConfigError, match=r"train.kl_reduction: Input should be 'sum' or 'mean'"):
        load_vard_config(path, ["train.kl_reduction=pixels"])
    kl = {}
    for reduction in ("sum", "mean"):
        algo, _ = _vard(path, ["sample.num_steps=4", f"train.kl_reduction={reduction}"])
        with torch.no_grad():  # the policy moves away from the frozen base copy
            for p in algo.policy.trainable_parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        n = 3
        starts = ValueData(
            x=torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
            t=torch.zeros(n),
            k=torch.tensor([0, 1, 2]),
            c=torch.tensor([1, 4, 7]),
            target=torch.zeros(n),
        )
        kl[reduction] = _unroll(algo.policy, algo.reference, algo.value, starts, algo.config, torch.Generator())[2]
    assert bool((kl["mean"] > 0).all())
    torch.testing.assert_close(kl["sum"], 256 * kl["mean"], rtol=1e-4, atol=0)


def test_vard_raises_a_reward_on_the_embedded_model_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = VardConfig.model_validate(
        {
            "num_epochs": 3,
            "sample": {"num_steps": 8, "num_envs": 16, "num_batches_per_epoch": 1},
            "env": {"reward": "test_mean_brightness"},
            "value": {"width": 16, "warmup_steps": 80, "steps_per_epoch": 20, "batch_size": 64},
            "train": {"updates_per_epoch": 3, "batch_size": 32, "learning_rate": 3e-4, "kl_coef": 0.01},
            "eval": {"num_samples": 32, "every": 3},
        }
    )
    result = train(config, run_dir=tmp_path / "run", progress=False)
    base, final = result.base_eval, result.final_eval
    assert final.mean > base.mean + 2 * max(base.std, final.std), (base, final)  # paired fixed noise
    assert all(e.value_explained_variance > 0.5 for e in result.epochs), result.epochs
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt.epoch == 3 and "value" in ckpt.extra_weights and ckpt.state["algo"] == "vard"
    assert (ckpt.path / "model_index.json").is_file()  # a pipeline folder: `diffusion-gym sample` reads it
    load_model(str(ckpt.path))


@pytest.mark.parametrize(
    "name", ["digits_vard_jpeg_compressibility", "digits_vard_jpeg_incompressibility", "digits-t2i_vard_prompt_match"]
)
def test_vard_configs_load_and_list_every_field(name):
    path = CONFIGS / f"{name}.yaml"
    config = load_vard_config(path)
    assert config.env.reward == name.split("vard_")[1].replace("prompt_match", "prompt_match_smooth")
    text = path.read_text()
    for section in ("sample", "env", "value", "train", "eval"):
        for key in type(getattr(config, section)).model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from {path.name}"
    with pytest.raises(ConfigError, match="value.widht"):
        load_vard_config(path, ["value.widht=3"])


def test_renormalization_preserves_the_value():
    value = ValueNetwork(1, num_classes=None, width=8, depth=1)
    value.set_normalization(torch.tensor([0.0, 1.0, 2.0]))
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([900, 500, 10, -25])
    before = value(x, t)
    value.set_normalization(torch.tensor([10.0, 30.0]))  # the reward moved: new units, same predictions
    assert value.target_mean.item() == 20.0
    torch.testing.assert_close(value(x, t), before, atol=1e-4, rtol=1e-5)


def test_a_prompt_conditioned_value_separates_prompts_an_unconditional_one_cannot():
    """Same images, reward +1 under one prompt and -1 under the other: only the prompt's features explain it."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 12, generator=g)  # two prompts' pooled embeddings
    x = torch.randn(128, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)  # every image under both prompts
    c = torch.arange(256) // 128
    data = ValueData(x=x, t=torch.full((256,), 500), k=torch.zeros(256, dtype=torch.long), c=c, target=1.0 - 2.0 * c)
    fitted = {}
    for name, dim in (("prompt", 12), ("none", None)):
        torch.manual_seed(0)
        value = ValueNetwork(4, width=8, depth=1, condition_dim=dim)
        if dim:
            value.condition_features = lambda ids: features[ids]
        opt = torch.optim.Adam(value.parameters(), lr=3e-3)
        fitted[name] = fit_value(value, opt, data, num_steps=150, batch_size=64, generator=g)["explained_variance"]
    assert fitted["prompt"] > 0.95 and fitted["none"] < 0.2, fitted
    unset = ValueNetwork(4, width=8, depth=1, condition_dim=12)
    with pytest.raises(ValueError, match="prompt-conditioned: set condition_features"):
        unset(x[:2], torch.zeros(2), c[:2])
    with pytest.raises(ValueError, match="class ids or on prompt features, not both"):
        ValueNetwork(4, num_classes=10, condition_dim=12)


def test_vard_on_the_embedded_text_model_reads_the_prompt():
    """The value of a text-to-image run is conditioned on the prompts' pooled embeddings, by prompt id."""
    algo, conditions = _vard(CONFIGS / "digits-t2i_vard_prompt_match.yaml", ["sample.num_envs=8"])
    ids = torch.tensor(conditions.book.ids(["a thin 3", "a bold 3"]))
    pooled = conditions.encode(ids).pooled
    assert algo.value.condition_proj is not None and algo.value.condition_proj.in_features == pooled.shape[-1]
    assert torch.equal(algo.value.condition_features(ids), pooled)
    x = torch.zeros(2, *algo.envs.core.sample_shape)
    out = algo.value(x, torch.full((2,), 500), ids)
    assert out[0] != out[1]  # the same image, two prompts: two values
