"""Pinned behaviour: short training runs end with exactly the weights they ended with before the
runner redesign (and before any later change that is not meant to change numbers).

Each run goes through the command line only (``diffusion-gym train``), so the test survives any
internal reorganisation. The digest is the sha256 of the final checkpoint's UNet tensors (names,
dtypes, shapes and bytes, in name order).

Float results depend on the CPU's kernels (vector width, MKL/oneDNN code paths). The digests were
recorded on a 2-core AVX2 AMD EPYC (torch 2.14.1); :func:`_platform_digest` fingerprints the kernels,
and on a machine where they differ the test is skipped with a message saying so.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.cli import main
from agents.common.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]

PPO_TINY = [
    "sample.num_steps=10",
    "sample.num_envs=8",
    "sample.num_batches_per_epoch=1",
    "sample.samples_per_reference=4",
    "train.batch_size=32",
    "train.gradient_updates_per_epoch=2",
    "eval.num_samples=8",
    "eval.every=1",
    "save_every=1",
    "num_epochs=2",
]
VARD_TINY = [
    "num_epochs=2",
    "sample.num_steps=4",
    "sample.num_envs=4",
    "sample.num_batches_per_epoch=1",
    "value.width=8",
    "value.warmup_steps=2",
    "value.steps_per_epoch=1",
    "value.batch_size=16",
    "train.updates_per_epoch=1",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "eval.num_samples=4",
    "eval.every=1",
    "save_every=1",
]
RUNS: dict[str, tuple[str, list[str]]] = {
    "ppo_is_full": ("ppo-is", [*PPO_TINY, "env.window=full"]),
    "ppo_is_hrf_d": ("ppo-is", [*PPO_TINY, "env.window=hrf-d", "env.window_kwargs={stride: 3}"]),
    "drift": (
        "ppo-is",
        [
            *PPO_TINY,
            "sample.num_batches_per_epoch=2",
            "env.window=[[3, 5]]",
            "drift.subset_fraction=0.5",
            "drift.condition_noise=0.3",
            "drift.condition_noise_tau=[0.5, 1.0]",
            "drift.diversity_coef=0.1",
        ],
    ),
    "vard": ("vard", VARD_TINY),
}
GLOO = [
    *PPO_TINY,
    "sample.num_envs=12",
    "sample.num_batches_per_epoch=2",
    "train.learning_rate=1e-3",
    "env.window=hrf-d",
    "env.window_kwargs={stride: 3, last: 6, batches_per_iteration: 2}",
    "env.probe_size=5",
    "dist_timeout_s=120",
]

# Recorded on a 2-core AVX2 AMD EPYC (torch 2.14.1) before the runner redesign.
PLATFORM = "846f134db7e8bc61"
PINNED: dict[str, tuple[str, float, float]] = {
    "drift": ("a4ee4b0bf3d7457ae4bb1c1b05f8b160e8a747537d963115d62279be3d2fdd19", 803.8011753082169, 36955.19370828064),
    "ppo_is_full": (
        "0228bd9a346a590bb11e980b7e97b491558935722d4af80c129ed85536049d3f",
        800.887435448605,
        36955.13810833723,
    ),
    "ppo_is_hrf_d": (
        "611cb3110f5c4bfb6526b8fd9b82408aa0edaca75844b59f70a3a7af77267b2b",
        801.7743626270478,
        36955.01396475889,
    ),
    "vard": ("7f3bfdc8803786eb16e14896bd3203893f0fa7253c43b6d42b0b823bd212b5d5", 800.576581384764, 36949.50288258012),
    "gloo_2proc": (
        "4f7d01fec08333ce44e37308c5a7399b41d5c5ed57828bf161f0d2b4903e1641",
        805.5783057932829,
        37012.48219187308,
    ),
}
"""run name -> (sha256 of the UNet tensors, sum of the weights, sum of their absolute values)."""


def _platform_digest() -> str:
    """A fingerprint of this machine's float kernels: torch's CPU capability (AVX2, AVX512, ...) and the
    bits of a conv, matmul, softmax and group norm in fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 16, 16, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g)
    m = torch.randn(64, 64, generator=g)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, w, padding=1)
        y = torch.nn.functional.group_norm(y, 4).softmax(-1) @ m[:16, :16]
        z = (m @ m.T).tanh()
    digest = hashlib.sha256(f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()}".encode())
    for t in (y, z):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _weights_digest(run_dir: Path) -> tuple[str, float, float]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    tensors = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    digest = hashlib.sha256()
    total = absolute = 0.0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
        total += t.double().sum().item()
        absolute += t.double().abs().sum().item()
    return digest.hexdigest(), total, absolute


def _train(algo: str, overrides: list[str], run_dir: Path) -> tuple[str, float, float]:
    args = ["train", "--algo", algo, "--run-dir", str(run_dir), "--no-progress"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    return _weights_digest(run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_gloo(run_dir: Path) -> tuple[str, float, float]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
            HF_HUB_OFFLINE="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [sys.executable, "-m", "agents.cli", "train", "--run-dir", str(run_dir), "--no-progress"]
        for override in GLOO:
            cmd += ["--set", override]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for rank, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rank {rank} failed:\n{out.decode()[-3000:]}"
    return _weights_digest(run_dir)


def _check(name: str, got: tuple[str, float, float]) -> None:
    if name not in PINNED:
        pytest.fail(f"no pinned digest for {name!r}; this machine gives {got!r} (platform {_platform_digest()})")
    sha, total, absolute = PINNED[name]
    if _platform_digest() != PLATFORM:
        # Another CPU's kernels round differently, and JPEG sizes are step functions of the pixels: after a
        # few updates the runs part ways by more than rounding (measured: the same code's 8-epoch demo gives
        # -0.4618 on the machine of earlier work and -0.4665 on the AVX2 machine of the recording).
        # Bit-exactness is checked where the digests were recorded.
        pytest.skip(f"the digests were recorded on platform {PLATFORM}; this machine is {_platform_digest()}")
    assert got[0] == sha, f"{name}: the weights changed (sums {got[1]!r}, {got[2]!r} vs {total!r}, {absolute!r})"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_short_runs_end_with_the_pinned_weights(tmp_path, name):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    algo, overrides = RUNS[name]
    _check(name, _train(algo, overrides, tmp_path / name))


@pytest.mark.slow
def test_two_gloo_processes_end_with_the_pinned_weights(tmp_path):
    _check("gloo_2proc", _train_gloo(tmp_path / "gloo"))


if __name__ == "__main__":  # print the digests of this checkout (to pin them after a deliberate change)
    import tempfile

    print(f'PLATFORM = "{_platform_digest()}"')
    with tempfile.TemporaryDirectory() as tmp:
        for run, (algo_, overrides_) in sorted(RUNS.items()):
            print(f'    "{run}": {_train(algo_, overrides_, Path(tmp) / run)!r},', flush=True)
        print(f'    "gloo_2proc": {_train_gloo(Path(tmp) / "gloo")!r},', flush=True)
