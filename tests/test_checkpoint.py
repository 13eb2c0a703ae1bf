"""Checkpoints: atomic save, pruning, verification, RNG capture/restore, and a SIGKILL during a write."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_unet import TINY_UNET, tiny_unet
from diffusers import UNet2DModel

from agents.common.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def stepped_optimizer(unet: UNet2DModel) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-3)
    x = torch.randn(2, 1, 8, 8)
    unet(x, torch.tensor([3, 7])).sample.square().mean().backward()
    opt.step()
    opt.zero_grad()
    return opt


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_tree_equal(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    unet = tiny_unet()
    opt = stepped_optimizer(unet)
    ema = {k: v.detach().clone() * 0.5 for k, v in unet.state_dict().items()}
    lora = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(3, 4).t()}  # non-contiguous on purpose
    state = {"epoch": 3, "optimizer": opt.state_dict(), "rng": capture_rng_state(), "config": {"lr": 1e-3}}

    path = save_checkpoint(tmp_path, 3, unet, state, extra_weights={"ema": ema, "lora": lora})
    assert path == tmp_path / "checkpoints" / "epoch-000003"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "epoch-000003"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["epoch"] == 3 and "trainer_state.pt" in meta["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in meta["files"] and "ema.safetensors" in meta["files"]
    assert all(len(info["sha256"]) == 64 and info["size"] > 0 for info in meta["files"].values())

    for where in (tmp_path, tmp_path / "checkpoints", path):
        ckpt = load_checkpoint(where)
        assert isinstance(ckpt, Checkpoint) and ckpt.path == path and ckpt.epoch == 3
    assert ckpt.unet_dir == path / "unet"

    loaded = UNet2DModel.from_pretrained(ckpt.unet_dir)
    assert_tree_equal(unet.state_dict(), loaded.state_dict())

    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3, weight_decay=1e-3)
    opt2.load_state_dict(ckpt.state["optimizer"])
    assert_tree_equal(opt.state_dict(), opt2.state_dict())
    assert ckpt.state["config"] == {"lr": 1e-3} and ckpt.state["epoch"] == 3

    assert_tree_equal(ema, ckpt.extra_weights["ema"])
    assert_tree_equal({k: v.contiguous() for k, v in lora.items()}, ckpt.extra_weights["lora"])


def test_rng_capture_restore(tmp_path):
    def draw():
        return (random.random(), np.random.rand(3).tolist(), torch.rand(3), torch.randn(2))

    random.random(), np.random.rand(), torch.rand(1)  # move off any default state
    state = capture_rng_state()
    first = draw()
    draw()  # advance further
    restore_rng_state(state)
    assert_tree_equal(first, draw())

    # also after a save/load round trip
    unet = tiny_unet()
    save_checkpoint(tmp_path, 0, unet, {"rng": capture_rng_state()})
    expected = draw()
    draw()
    restore_rng_state(load_checkpoint(tmp_path).state["rng"])
    assert_tree_equal(expected, draw())


def test_prune_latest_and_resave(tmp_path):
    unet = tiny_unet()
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, epoch, unet, {"epoch": epoch}, keep=2)
    assert names(tmp_path) == ["epoch-000003", "epoch-000004", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-000004"

    # re-saving an existing epoch (e.g. after a resume) replaces it
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    save_checkpoint(tmp_path, 4, unet, {"epoch": 4, "again": True}, keep=2)
    assert names(tmp_path) == ["epoch-000003", "epoch-000004", "latest"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.epoch == 4 and ckpt.state["again"] is True
    assert_tree_equal(unet.state_dict(), UNet2DModel.from_pretrained(ckpt.unet_dir).state_dict())

    save_checkpoint(tmp_path, 5, unet, {"epoch": 5}, keep=1)
    assert names(tmp_path) == ["epoch-000005", "latest"]

    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 6, unet, {}, keep=0)
    with pytest.raises(ValueError, match="extra_weights name"):
        save_checkpoint(tmp_path, 6, unet, {}, extra_weights={"../evil": {}})
    assert names(tmp_path) == ["epoch-000005", "latest"]


def test_corruption_detected(tmp_path):
    unet = tiny_unet()
    save_checkpoint(tmp_path, 1, unet, {"epoch": 1})
    p2 = save_checkpoint(tmp_path, 2, unet, {"epoch": 2}, extra_weights={"ema": unet.state_dict()})

    weights = p2 / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == p2  # same size: only the checksum notices
    with pytest.raises(CheckpointError, match="unet/diffusion_pytorch_model.safetensors"):
        load_checkpoint(tmp_path)

    # a truncated file makes the checkpoint incomplete: latest_checkpoint falls back, loading it names the file
    (p2 / "ema.safetensors").write_bytes(b"oops")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-000001"
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_checkpoint(p2)

    # a checkpoint dir without meta.json is ignored, even if `latest` names it
    (p2 / "meta.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-000001"
    assert load_checkpoint(tmp_path).epoch == 1
    assert latest_checkpoint(p2) is None
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(p2)

    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    assert latest_checkpoint(tmp_path / "empty") is None


KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch, safetensors.torch
from diffusers import UNet2DModel
from agents.common.checkpoint import save_checkpoint

def partial_write_then_hang(write, path_or_file):
    write(path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "r+b") as f:
            f.truncate(os.path.getsize(path_or_file) // 2)
    else:
        path_or_file.flush()
        path_or_file.truncate(path_or_file.tell() // 2)
    print("WRITING", flush=True)
    time.sleep(600)

if {target!r} == "torch.save":
    real = torch.save
    torch.save = lambda obj, f, *a, **k: partial_write_then_hang(lambda p: real(obj, p, *a, **k), f)
else:
    real = safetensors.torch.save_file
    safetensors.torch.save_file = lambda t, f, *a, **k: partial_write_then_hang(lambda p: real(t, p, *a, **k), f)

torch.manual_seed(1)
save_checkpoint({run_dir!r}, 2, UNet2DModel(**{config!r}), {{"epoch": 2}})
print("FINISHED", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("target", ["torch.save", "safetensors"])
def test_kill_during_write(tmp_path, target):
    unet = tiny_unet()
    p1 = save_checkpoint(tmp_path, 1, unet, {"epoch": 1})
    root = tmp_path / "checkpoints"

    script = textwrap.dedent(KILL_SCRIPT).format(repo=str(REPO), target=target, run_dir=str(tmp_path), config=TINY_UNET)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        line = b""
        while not line.startswith(b"WRITING"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            line = proc.stdout.readline() if ready else b""
            if not ready or (not line and proc.poll() is not None):
                proc.kill()
                pytest.fail(f"writer never reached the partial write: {proc.communicate()[1].decode()[-2000:]}")
            assert not line.startswith(b"FINISHED")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(stale) == 1 and stale[0].name.startswith(".tmp-epoch-000002-")  # the killed write
    assert not (root / "epoch-000002").exists()
    assert (root / "latest").read_text().strip() == "epoch-000001"
    assert latest_checkpoint(tmp_path) == p1
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.epoch == 1 and ckpt.state == {"epoch": 1}
    assert_tree_equal(unet.state_dict(), UNet2DModel.from_pretrained(ckpt.unet_dir).state_dict())

    p2 = save_checkpoint(tmp_path, 2, unet, {"epoch": 2})
    assert names(tmp_path) == ["epoch-000001", "epoch-000002", "latest"]  # stale .tmp-* removed
    assert latest_checkpoint(tmp_path) == p2 and load_checkpoint(tmp_path).state == {"epoch": 2}
