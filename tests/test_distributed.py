"""Data-parallel PPO-IS on torch.distributed (gloo, 2 CPU processes): same weights as one process.

The processes are started the way ``torchrun`` starts them (``torchrun --standalone`` itself for
the main test; plain subprocesses with ``RANK``/``WORLD_SIZE``/``MASTER_*`` for the others), each
running tests/_distributed_worker.py, which trains and saves its rank's final weights.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _distributed_worker
import pytest
import torch
from diffusers import UNet2DModel

from agents.common.checkpoint import latest_checkpoint
from agents.common.distributed import Distributed, DistributedError, init_distributed
from agents.common.rollout import RolloutLayout
from agents.ppo_is import train
from agents.ppo_is.config import ConfigError, load_config
from diffusion_gym.models import load_model
from diffusion_gym.rewards import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"
TINY = [
    "sample.num_steps=10",
    "sample.num_envs=12",  # 6 per process: the middle reference group of 4 straddles the two processes
    "sample.num_batches_per_epoch=2",
    "sample.samples_per_reference=4",
    "train.batch_size=32",
    "train.gradient_updates_per_epoch=2",
    "train.learning_rate=1e-3",
    # Adam with eps=1e-8 turns float rounding in near-zero gradient entries (advantages sum to 0) into
    # steps of up to lr: one process run with another micro-batch size differs by ~5e-4 after one
    # epoch. With eps=1e-4 that floor is ~1e-6 while the weights still move by ~2e-3 per epoch.
    "train.adam_epsilon=1e-4",
    "eval.num_samples=4",
    "eval.every=100",
    "save_every=1",
    "dist_timeout_s=60",
    # A smooth reward (see _distributed_worker.py): JPEG sizes are step functions of the pixels, so the
    # float rounding of gradient sums, which differs with the number of processes, could flip a byte.
    "env.reward=test_brightness",
    "env.references=digits",
    "env.window=hrf-d",
    "env.window_kwargs={stride: 3, last: 6, batches_per_iteration: 2}",  # candidates 0, 3, 6
    "env.probe_size=5",  # split 3 + 2 across the processes
    "keep_checkpoints=2",
]
TOLERANCE = 3e-5  # measured 7e-6 (2 epochs, 2 processes vs 1); the weights move by ~4e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(run_dir: Path, out: Path, overrides: list[str], **options: object) -> list[str]:
    args = [str(WORKER), "--run-dir", str(run_dir), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    for key, value in options.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


def _spawn(args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """Start ``world_size`` worker processes with the variables torchrun would set."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = _child_env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _run_two(run_dir: Path, out: Path, overrides: list[str], **options: object) -> list[dict]:
    results = _wait(_spawn(_worker_args(run_dir, out, overrides, **options)), timeout=240)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    unet = UNet2DModel.from_pretrained(latest_checkpoint(run_dir) / "unet")
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max((before[k] - after[k]).abs().max().item() for k in before)


@pytest.fixture(scope="module", autouse=True)
def brightness_reward():
    """The smooth test reward, registered for this module only."""
    _distributed_worker.register_reward()
    yield
    _REGISTRY.pop("test_brightness", None)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, HRF-D, 2 epochs (checkpoints of both epochs kept)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = train(load_config(None, [*TINY, "num_epochs=2"]), run_dir=run_dir, progress=False)
    return result, run_dir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same config under ``torchrun --standalone --nproc_per_node=2`` (gloo)."""
    root = tmp_path_factory.mktemp("two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += _worker_args(root / "run", root / "out", [*TINY, "num_epochs=2"])
    tic = time.monotonic()
    proc = subprocess.run(cmd, env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"torchrun, 2 processes, 2 epochs: {time.monotonic() - tic:.1f} s")
    ranks = [torch.load(root / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, root / "run"


def test_two_processes_train_like_one(one_process, two_processes):
    """torchrun with 2 gloo processes, HRF-D, 2 epochs: the weights equal one process's (float
    tolerance) and are identical on both ranks; start steps, rewards and losses are the same."""
    single, one_dir = one_process
    (rank0, rank1), two_dir = two_processes
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    for a, b in zip(rank0["epochs"], rank1["epochs"], strict=True):  # every rank returns the same statistics
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    two = _checkpoint_weights(two_dir)  # rank 0 wrote the checkpoint
    assert all(torch.equal(two[k], rank0["weights"][k]) for k in two)
    one = _checkpoint_weights(one_dir)
    moved = _moved(load_model("embedded:digits").unet.state_dict(), one)
    diff = _max_diff(one, two)
    print(f"max |w_1proc - w_2proc| = {diff:.3g} (the weights moved by {moved:.3g})")
    assert diff < TOLERANCE
    assert moved > 50 * TOLERANCE  # training did move the weights
    for a, b in zip(single.epochs, rank0["epochs"], strict=True):
        assert a.start_steps == b["start_steps"]  # the same HRF-D choice: every batch starts at the same step
        assert a.num_pairs == b["num_pairs"] > 0
        assert a.reward_mean == pytest.approx(b["reward_mean"], abs=1e-5)
        assert a.loss == pytest.approx(b["loss"], abs=1e-5)


def test_checkpoints_resume_under_another_number_of_processes(tmp_path, one_process, two_processes):
    """Epoch 1 resumed from 2 processes' epoch-0 checkpoint in 1 process, and from 1 process's under
    2 processes: both end with the weights of the uninterrupted runs."""
    _, one_dir = one_process
    _, two_dir = two_processes
    epoch0 = "checkpoints/epoch-000001"  # after the first epoch
    overrides = [*TINY, "num_epochs=2"]
    train(load_config(None, overrides), run_dir=tmp_path / "2to1", resume=two_dir / epoch0, progress=False)
    _run_two(tmp_path / "1to2", tmp_path / "out", overrides, resume=one_dir / epoch0)
    one = _checkpoint_weights(one_dir)
    for name in ("2to1", "1to2"):
        diff = _max_diff(one, _checkpoint_weights(tmp_path / name))
        print(f"resumed {name}: max weight difference to one uninterrupted process {diff:.3g}")
        assert diff < TOLERANCE


def test_drift_under_two_processes_trains_like_one(tmp_path):
    """DRIFT (subsets, condition noise, diversity shaping) sees the whole batch under torchrun: the
    reference group that straddles the processes gets the same subset, potentials and advantages, so
    1 epoch in 2 processes ends with one process's weights and statistics."""
    overrides = [*TINY, "num_epochs=1", "drift.subset_fraction=0.5", "drift.condition_noise=0.5"]
    overrides += ["drift.diversity_coef=0.1"]
    single = train(load_config(None, overrides), run_dir=tmp_path / "one", progress=False)
    rank0, _ = _run_two(tmp_path / "two", tmp_path / "out", overrides)
    ((a,), (b,)) = single.epochs, rank0["epochs"]
    assert a.drift["kept_fraction"] == b["drift"]["kept_fraction"] == 0.5
    assert a.drift["final_diversity"] == pytest.approx(b["drift"]["final_diversity"], abs=1e-6)
    assert a.num_pairs == b["num_pairs"] and a.loss == pytest.approx(b["loss"], abs=1e-5)
    assert a.first_ratio_max_dev < 1e-5 and b["first_ratio_max_dev"] < 1e-5
    one = _checkpoint_weights(tmp_path / "one")
    assert _max_diff(one, _checkpoint_weights(tmp_path / "two")) < TOLERANCE
    assert _moved(load_model("embedded:digits").unet.state_dict(), one) > 50 * TOLERANCE


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stuck_rank_makes_the_other_fail_clearly(tmp_path, how):
    """Rank 1 is killed (or frozen) before its first rollout; rank 0, waiting in a collective, fails
    with an error naming its rank and the configured timeout, not a hang."""
    timeout = 6
    overrides = [*TINY, "num_epochs=2", "env.window=full", "env.window_kwargs={}", f"dist_timeout_s={timeout}"]
    procs = _spawn(_worker_args(tmp_path / "run", tmp_path / "out", overrides, die_rank=1, die_signal=how))
    tic = time.monotonic()
    try:
        code, text = _wait(procs[:1], timeout=120)[0]
        elapsed = time.monotonic() - tic
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
    assert code != 0
    assert "DistributedError" in text and "rank 0 of 2" in text and f"dist_timeout_s={timeout} s" in text, text[-3000:]
    assert elapsed < 90


def test_num_envs_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("agents.common.runner.init_distributed", lambda device, t: (Distributed(0, 5), device))
    with pytest.raises(ConfigError, match=r"sample.num_envs \(12\).*WORLD_SIZE=5.*\[1, 2, 3, 4, 6, 12\]"):
        train(load_config(None, TINY), progress=False)


def test_single_process_needs_no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist, device = init_distributed("cpu", 5)
    assert not dist.enabled and dist.is_main and device == "cpu"
    t = torch.arange(4.0)
    assert dist.all_gather_cat(t) is t and dist.broadcast_object("x") == "x"
    dist.all_reduce_([t])
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="dist_timeout_s must be > 0"):
        init_distributed("cpu", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="RANK is not"):
        init_distributed("cpu", 5)


def test_owned_pairs_partition_every_chunk():
    """Global pair g = row g % B of block g // B: the processes' owned pairs partition the chunk."""
    b, world, blocks = 3, 2, 4
    chunk = torch.randperm(b * world * blocks)[:10]
    seen = []
    for rank in range(world):
        local = RolloutLayout(b, world, rank).owned(chunk)
        global_ids = (local // b) * b * world + rank * b + local % b
        seen += global_ids.tolist()
    assert sorted(seen) == sorted(chunk.tolist())
    assert torch.equal(RolloutLayout(b * world).owned(chunk), chunk)
