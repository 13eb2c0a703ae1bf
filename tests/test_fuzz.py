"""Hostile input: every bad env argument, action, config, command line and corrupted checkpoint gets one
clear project error (a message naming the problem, exit code 2 on the command line), never a
traceback, and leaves an existing run directory byte for byte as it was."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffusion_gym  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.cli import main
from agents.common.checkpoint import latest_checkpoint
from diffusion_gym.models import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "sample.num_steps=4",
    "sample.num_envs=4",
    "sample.num_batches_per_epoch=1",
    "sample.samples_per_reference=2",
    "train.batch_size=16",
    "eval.num_samples=4",
    "num_epochs=1",
]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run, and the digest of every byte in it."""
    root = tmp_path_factory.mktemp("fuzz") / "run"
    args = ["train", "--run-dir", str(root), "--no-progress"]
    assert main([*args, *(a for o in TINY for a in ("--set", o))]) == 0
    return root, _digest(root)


@pytest.fixture
def files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sample: {num_steps: [1, 2\n")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    return {"bad_yaml": bad_yaml, "list": listing, "tmp": tmp_path}


# ---- command lines -------------------------------------------------------------------------------------------------
BAD_SETS = [
    "train.learning_rate=.inf",
    "train.learning_rate=.nan",
    "train.learning_rate=-1",
    "train.learning_rate=fast",
    "train.weight_decay=.inf",
    "train.batch_size=true",
    "train.batch_size=0",
    "train.batch_size=2.5",
    "train.clip_range=0",
    "train.advantage_mode=median",
    "train.stat_min_count=100",
    "train.lora_rank=-1",
    "train.learning_rat=1e-4",
    "seed=-1",
    "seed=abc",
    "num_epochs=0",
    "save_every=0",
    "keep_checkpoints=0",
    "sample.num_steps=0",
    "sample.num_steps=100000",
    "sample.eta=-0.1",
    "sample.eta=.inf",
    "sample.scheduler=euler",
    "sample.num_envs=0",
    "sample.start_mode=sometimes",
    "env.reward=nope",
    "env.reward_kwargs={qualty: 50}",
    "env.window=nope",
    "env.window=[[5, 2]]",
    "env.window=[[0, 99]]",
    "env.window_kwargs={bogus: 1}",
    "env.probe_size=0",
    "eval.every=0",
    "eval.num_samples=-3",
    "drift.subset_fraction=0",
    "drift.subset_fraction=1.5",
    "drift.condition_noise_tau=[0.9, 0.1]",
    "mixed_precision=fp8",
    "compile=fastest",
    "policy_noise=gpu",
    "device=tpu",
    "model=",
    "algo=sac",
    "sample=3",
    "nonsense",
]


@pytest.mark.parametrize("override", BAD_SETS)
def test_bad_config_values_are_one_clear_error(override, capsys, tmp_path):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusion-gym train: error: ") and "Traceback" not in err
    key = override.split("=")[0]
    assert key.split(".")[-1] in err or "override" in err, err
    assert not (tmp_path / "r").exists(), "a refused run leaves no directory"


def _cli_cases(run_dir: Path, files: dict[str, Path]) -> list[list[str]]:
    tmp = files["tmp"]
    return [
        ["train", "--run-dir", str(run_dir)],  # another run lives there
        ["train", "--run-dir", str(run_dir), "--set", "num_epochs=2"],
        ["train", "--resume", str(run_dir), "--set", "sample.num_steps=5"],  # not changeable on resume
        ["train", "--resume", str(run_dir), "--set", "env.reward=jpeg_incompressibility"],
        ["train", "--resume", str(run_dir), "--set", "seed=3"],
        ["train", "--resume", str(run_dir), "--set", "train.lora_rank=4"],
        ["train", "--resume", str(run_dir), "--algo", "vard"],
        ["train", "--resume", str(run_dir), "--config", "envs_configs/digits_hrf_jpeg_compressibility.yaml"],
        ["train", "--resume", str(tmp / "nowhere")],
        ["train", "--config", str(tmp / "missing.yaml")],
        ["train", "--config", str(files["bad_yaml"])],
        ["train", "--config", str(files["list"])],
        ["train", "--config", "envs_configs/digits_vard_jpeg_compressibility.yaml", "--algo", "ppo-is"],
        ["train", "--set", "device=cuda:7", "--run-dir", str(tmp / "x")],
        ["sample", "--n", "0"],
        ["sample", "--checkpoint", str(tmp / "nowhere")],
        ["sample", "--class", "11", "--steps", "2", "--n", "2", "--out", str(tmp / "s.png")],
        ["sample", "--device", "cuda:3"],
        ["sample", "--device", "quantum"],
        ["sample", "--model", "nope/not-a-model", "--n", "2"],
        ["sample", "--steps", "0", "--n", "2", "--out", str(tmp / "s.png")],
        ["sample", "--eta", "1.5", "--steps", "2", "--n", "2", "--out", str(tmp / "s.png")],
        ["sample", "--eta", "-1", "--steps", "2", "--n", "2", "--out", str(tmp / "s.png")],
        ["evaluate", str(tmp / "nowhere"), "--n", "10"],
        ["evaluate", "embedded:digits", "--n", "5"],  # fewer samples than IS splits
        ["evaluate", "embedded:digits", "--n", "10", "--reward", "nope"],
        ["report", str(tmp / "nowhere")],
        ["paper", "--config", str(tmp / "nowhere.yaml")],
        ["paper", "--stages", "train,fly"],
    ]


def test_bad_command_lines_are_one_clear_error_and_leave_the_run_untouched(run, files, capsys):
    run_dir, before = run
    cases = _cli_cases(run_dir, files)
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith(f"diffusion-gym {argv[0]}: error: ") and "Traceback" not in err, (argv, err)
        assert _digest(run_dir) == before, f"{argv} changed the run directory"
    assert not (files["tmp"] / "x").exists()


def test_usage_errors_exit_2(capsys):
    for argv in (["train", "--algo", "sac"], ["train", "--bogus"], ["sample", "--n", "many"], ["fly"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "usage:" in capsys.readouterr().err


# ---- corrupted checkpoints -----------------------------------------------------------------------------------------
def _corruptions(ckpt: Path) -> dict[str, callable]:
    unet = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    state = ckpt / "trainer_state.json"
    tensors = ckpt / "trainer_state.safetensors"
    meta = ckpt / "meta.json"
    latest = ckpt.parent / "latest"

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    return {
        "truncated unet": lambda: unet.write_bytes(unet.read_bytes()[:100]),
        "flipped unet byte": lambda: flip(unet),
        "flipped state byte": lambda: flip(state),
        "flipped tensor byte": lambda: flip(tensors),
        "missing state": lambda: state.unlink(),
        "missing meta": lambda: meta.unlink(),
        "garbage meta": lambda: meta.write_text("{not json"),
        "empty meta": lambda: meta.write_text("{}"),
        "latest names nothing": lambda: latest.write_text("epoch-000099\n"),
        "latest garbage": lambda: latest.write_bytes(b"\xff\xfe\x00"),
        "checkpoint dir removed": lambda: shutil.rmtree(ckpt),
    }


@pytest.mark.parametrize("damage", list(_corruptions(Path("x")).keys()))
def test_corrupted_checkpoints_are_one_clear_error(run, damage, tmp_path, capsys):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _corruptions(latest_checkpoint(copy))[damage]()
    before = _digest(copy)
    for argv in (
        ["train", "--resume", str(copy), "--no-progress"],
        ["sample", "--checkpoint", str(copy), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")],
    ):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (damage, argv, err)
        assert "error:" in err and "Traceback" not in err, err
        assert _digest(copy) == before, f"{damage}: {argv[0]} changed the run"


# ---- env arguments and actions -------------------------------------------------------------------------------------
BAD_ENV_KWARGS = [
    {"window": "nope"},
    {"window": [(5, 2)]},
    {"window": [(0, 99)]},
    {"window": 3},
    {"reward": "nope"},
    {"reward": 42},
    {"num_steps": 0},
    {"num_steps": -4},
    {"num_steps": 2.5},
    {"eta": -1.0},
    {"eta": math.nan},
    {"eta": 1.5},
    {"scheduler": "euler"},
    {"samples_per_reference": 0},
    {"probe_size": 0},
    {"start_mode": "sometimes"},
    {"model": "nope/not-a-model"},
    {"references": "/nowhere/at/all"},
    {"reward_kwargs": {"qualty": 3}},
    {"window_kwargs": {"bogus": 1}},
    {"device": "quantum"},
    {"render_mode": "ascii"},
    {"info_x0": "yes"},
]


@pytest.mark.parametrize("kwargs", BAD_ENV_KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_bad_env_arguments_are_one_clear_error(kwargs):
    with pytest.raises((ValueError, TypeError, MissingWeightsError)) as info:
        gym.make("DiffusionDenoise-v0", num_steps=kwargs.pop("num_steps", 4), **kwargs)
    assert str(info.value), "the error says what is wrong"


def _bad_actions(shape: tuple[int, ...]) -> list[object]:
    good = np.zeros(shape, dtype=np.float32)
    return [
        np.zeros((1, *shape), dtype=np.float32),
        np.zeros(shape[1:], dtype=np.float32),
        good.astype(np.int64),
        np.full(shape, np.nan, dtype=np.float32),
        np.full(shape, np.inf, dtype=np.float32),
        np.full(shape, 100.0, dtype=np.float32),
        "x_prev",
        None,
    ]


@pytest.mark.parametrize("which", range(8))
def test_bad_actions_are_one_clear_error_and_leave_the_env_unchanged(which):
    env = gym.make("DiffusionDenoise-v0", num_steps=4)
    obs, _ = env.reset(seed=0)
    action = _bad_actions(env.action_space.shape)[which]
    with pytest.raises((ValueError, TypeError)):
        env.step(action)
    after = env.unwrapped.core.x[0].numpy()
    assert np.array_equal(after, obs["x_t"]), "a refused action changes nothing"
    env.step(env.action_space.sample())  # and the env still works


@pytest.mark.parametrize("options", [{"condition": 3.7}, {"condition": 10}, {"condition": -1}, {"start_step": 9},
                                     {"start_step": 1.5}, {"bogus": 1}])  # fmt: skip
def test_bad_reset_options_are_one_clear_error(options):
    env = gym.make("DiffusionDenoise-v0", num_steps=4)
    with pytest.raises(ValueError):
        env.reset(seed=0, options=options)


def test_bad_vector_actions_are_one_clear_error():
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=2, vectorization_mode="vector_entry_point", num_steps=4)
    envs.reset(seed=0)
    shape = (2, 1, 16, 16)
    for bad in (torch.zeros(3, 1, 16, 16), torch.full(shape, float("nan")), torch.zeros(shape, dtype=torch.long)):
        with pytest.raises(ValueError):
            envs.step(bad)
