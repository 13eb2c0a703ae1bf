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

import pytest
import torch
from diffusers import UNet2DModel

from agents.common.checkpoint import latest_checkpoint
from agents.common.distributed import Distributed, DistributedError, init_distributed
from agents.ppo_is.config import ConfigError, load_config
from agents.ppo_is.trainer import _owned_pairs, train
from diffusion_gym.envs import Shard
from diffusion_gym.models import load_model

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
    "dist_timeout_s=30",
]
HRF_D = ["env.window=hrf-d", "env.window_kwargs={stride: 3, batches_per_iteration: 2}", "env.probe_size=5"]
FULL = ["env.window=full", "env.window_kwargs={}"]
TOLERANCE = 1e-5


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


def test_two_processes_train_like_one(tmp_path):
    """torchrun with 2 gloo processes, HRF-D, 2 epochs: the weights equal one process's (float
    tolerance) and are identical on both ranks; the HRF-D start steps and rewards are the same."""
    overrides = [*TINY, *HRF_D, "num_epochs=2"]
    single = train(load_config(None, overrides), run_dir=tmp_path / "one", progress=False)
    one = _checkpoint_weights(tmp_path / "one")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += _worker_args(tmp_path / "two", tmp_path / "out", overrides)
    proc = subprocess.run(cmd, env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in range(2))

    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert rank0["epochs"] == [{**e, "seconds": rank0["epochs"][i]["seconds"]} for i, e in enumerate(rank1["epochs"])]
    two = _checkpoint_weights(tmp_path / "two")  # rank 0 wrote the checkpoint
    assert all(torch.equal(two[k], rank0["weights"][k]) for k in two)
    base = load_model("embedded:digits").unet.state_dict()
    diff = _max_diff(one, two)
    print(f"max |w_1proc - w_2proc| = {diff:.3g}; weights moved by {_moved(base, one):.3g}")
    assert diff < TOLERANCE
    assert _moved(base, one) > 100 * TOLERANCE  # training did move the weights
    for a, b in zip(single.epochs, rank0["epochs"], strict=True):
        assert a.start_steps == b["start_steps"]  # same HRF-D choice, same shared start in every batch
        assert a.reward_mean == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a.num_pairs == b["num_pairs"]
        assert a.loss == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoints_resume_under_another_number_of_processes(tmp_path, first, second):
    """Epoch 0 under `first` processes, epoch 1 resumed under `second`: the weights of a straight run."""
    overrides = [*TINY, *FULL, "num_epochs=2"]  # full window: the per-condition tracker crosses the resume
    train(load_config(None, overrides), run_dir=tmp_path / "straight", progress=False)
    straight = _checkpoint_weights(tmp_path / "straight")

    run = tmp_path / "run"
    for epochs, world in ((1, first), (None, second)):
        resume = run if epochs is None else None
        if world == 1:
            train(load_config(None, overrides), run_dir=run, resume=resume, stop_after=epochs, progress=False)
        else:
            _run_two(run, tmp_path / "out", overrides, resume=resume, stop_after=epochs)
    diff = _max_diff(straight, _checkpoint_weights(run))
    print(f"{first} -> {second} processes: max weight difference to a straight run {diff:.3g}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stuck_rank_makes_the_other_fail_clearly(tmp_path, how):
    """Rank 1 is killed (or frozen) when its first update starts; rank 0, waiting in a collective, fails
    with an error naming its rank and the configured timeout, not a hang."""
    timeout = 6
    overrides = [*TINY, *FULL, "num_epochs=2", f"dist_timeout_s={timeout}"]
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
    monkeypatch.setattr("agents.ppo_is.trainer.init_distributed", lambda device, t: (Distributed(0, 5), device))
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
        shard = Shard(rank, world, lambda t: t)
        local = _owned_pairs(chunk, b, shard)
        global_ids = (local // b) * b * world + rank * b + local % b
        seen += global_ids.tolist()
    assert sorted(seen) == sorted(chunk.tolist())
    assert torch.equal(_owned_pairs(chunk, b * world, None), chunk)
