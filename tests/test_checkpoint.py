"""Checkpoints: atomic save, pruning, verification, RNG capture/restore, a SIGKILL during a write, a trainer
state without pickle (exact round trip, old pickle checkpoints refused), and no silent fallback to older ones."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import pickle
import random
import select
import shutil
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
    ALLOW_PICKLE_ENV,
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def stepped_optimizer(unet: UNet2DModel, steps: int = 1) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(steps):
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
    assert meta["epoch"] == 3 and meta["version"] == 2
    assert {"trainer_state.json", "trainer_state.safetensors"} <= meta["files"].keys()
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in meta["files"])
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

    # a truncated file makes the checkpoint incomplete: readers refuse it (naming the file) instead of falling
    # back silently; only strict=False still returns the older complete one
    p1 = tmp_path / "checkpoints" / "epoch-000001"
    (p2 / "ema.safetensors").write_bytes(b"oops")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path, strict=False) == p1
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_checkpoint(p2)

    # a checkpoint dir without meta.json named by `latest`: refused as well, skipped only with strict=False
    (p2 / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="epoch-000002.*meta.json is missing"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path, strict=False) == p1
    assert load_checkpoint(p1).epoch == 1
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

if {target!r} == "state-json":
    import agents.common.state_io as state_io
    real = state_io._write_bytes
    state_io._write_bytes = lambda path, data: partial_write_then_hang(lambda p: real(p, data), path)
else:
    real = safetensors.torch.save_file
    safetensors.torch.save_file = lambda t, f, *a, **k: partial_write_then_hang(lambda p: real(t, p, *a, **k), f)

torch.manual_seed(1)
save_checkpoint({run_dir!r}, 2, UNet2DModel(**{config!r}), {{"epoch": 2}})
print("FINISHED", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("target", ["state-json", "safetensors"])
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


# --------------------------------------------------------------------------------------------- trainer state format


def assert_same(a, b, path="state"):
    """Equal with the same Python types all the way down (tensors and arrays: dtype, shape and bytes)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device, a.requires_grad) == (b.dtype, b.shape, b.device, b.requires_grad), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def realistic_state(unet: UNet2DModel, pcg: np.random.Generator) -> dict:
    """What the trainers pass: optimizer after 2 steps, lr schedule, stat tracker, env, generators, config."""
    opt = stepped_optimizer(unet, steps=2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 3))
    buffer = collections.deque([0.5, -1.25, float("nan")], maxlen=4)
    return {
        "epoch": 11,
        "optimizer": opt.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "tracker": {"buffers": {3: list(buffer), 7: []}},
        "env": {
            "core": {"k_host": np.array([0, 5, 9], dtype=np.int64), "episodes": {"x": torch.randn(2, 1, 8, 8)}},
            "np_random": pcg.bit_generator.state,
            "window": {"batches": 4, "chosen": np.int64(12), "chosen_iteration": None},
        },
        "generator": torch.Generator().manual_seed(7).get_state(),
        "rng": capture_rng_state(),
        "config": {"lr": 1e-3, "run_name": "ppo", "clusters": [[8, 12], [18, 22]], "$not_a_tag": {"x": True}},
        "base_eval": (0.25, 0.5),
        "specials": [float("nan"), float("inf"), -float("inf"), -0.0, 2**64 + 1, -(2**100), 2**53 + 1],
        "numpy": [np.float32("inf"), np.float64(0.1), np.bool_(True), np.uint64(2**64 - 1), np.array(2.5, ">f8")],
        "keys": {(1, "a"): 1, 2.5: 2, None: 3, True: 4, "t": (1, (2, [3]))},
        "tensors": [torch.arange(6.0).reshape(2, 3).t(), torch.ones(2, dtype=torch.bfloat16), torch.empty(0, 3)],
    }


def test_trainer_state_round_trip_is_exact_and_pickle_free(tmp_path, monkeypatch):
    unet = tiny_unet()
    pcg = np.random.Generator(np.random.PCG64(123))
    pcg.random(5)
    state = realistic_state(unet, pcg)
    assert state["env"]["np_random"]["state"]["state"] > 2**64  # a Python int wider than any tensor dtype
    path = save_checkpoint(tmp_path, 11, unet, state)

    # plain JSON (no NaN/Infinity literals) next to the safetensors file; nothing pickled anywhere
    assert {p.name for p in path.iterdir() if p.is_file()} == {
        "meta.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    }
    doc = json.loads((path / "trainer_state.json").read_text(), parse_constant=pytest.fail)
    assert doc["format"] == "diffusion-gym-trainer-state" and doc["state"]["epoch"] == 11

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "Unpickler"):
            m.setattr(pickle, name, no_unpickling)
        m.setattr(torch, "load", no_unpickling)
        loaded = load_checkpoint(tmp_path).state
    assert_same(state, loaded)
    assert isinstance(loaded["rng"]["python"], tuple) and loaded["rng"]["numpy"][1].dtype == np.uint32
    assert isinstance(loaded["optimizer"]["param_groups"][0]["betas"], tuple)
    assert list(loaded["optimizer"]["state"]) == list(range(len(list(unet.parameters()))))

    # restoring reproduces the same draws: global RNGs, the trainer's torch generator, the env's PCG64
    def draws():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3)

    restore_rng_state(state["rng"])
    expected = draws()
    draws()
    restore_rng_state(loaded["rng"])
    assert_same(expected, draws())
    mine, theirs = torch.Generator(), torch.Generator()
    mine.set_state(state["generator"])
    theirs.set_state(loaded["generator"])
    assert torch.equal(torch.rand(4, generator=mine), torch.rand(4, generator=theirs))
    restored = np.random.Generator(np.random.PCG64())
    restored.bit_generator.state = loaded["env"]["np_random"]
    assert restored.random(4).tolist() == pcg.random(4).tolist()

    # the optimizer state loads back into an AdamW and continues identically
    opt = torch.optim.AdamW(tiny_unet(1).parameters(), lr=1e-3, weight_decay=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert_same(state["optimizer"], opt.state_dict())


class PickleBomb:
    """Unpickling it calls open(marker, "w"): the file appears only if the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def make_legacy(ckpt: Path, state) -> None:
    """Turn a checkpoint into the format-version-1 layout: a pickled trainer_state.pt listed in meta.json."""
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / name).unlink()
        del meta["files"][name]
    torch.save(state, ckpt / "trainer_state.pt")
    data = (ckpt / "trainer_state.pt").read_bytes()
    meta["files"]["trainer_state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta["version"] = 1
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_old_pickle_checkpoint_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "run", 1, tiny_unet(), {"epoch": 1})
    make_legacy(ckpt, {"epoch": 1, "payload": PickleBomb(marker)})
    assert latest_checkpoint(tmp_path / "run") == ckpt  # complete: it is found, and its files verify
    assert verify_checkpoint(tmp_path / "run") == ckpt

    for where in (tmp_path / "run", ckpt):
        with pytest.raises(CheckpointError, match="old pickle-based checkpoint") as err:
            load_checkpoint(where)
        assert "allow_pickle=True" in str(err.value) and f"{ALLOW_PICKLE_ENV}=1" in str(err.value)
        assert "arbitrary code" in str(err.value)
    assert not marker.exists()

    monkeypatch.setenv(ALLOW_PICKLE_ENV, "yes")
    with pytest.raises(CheckpointError, match=rf"invalid {ALLOW_PICKLE_ENV}='yes'.*'1'"):
        load_checkpoint(ckpt)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    with pytest.raises(CheckpointError, match="old pickle-based checkpoint"):
        load_checkpoint(ckpt, allow_pickle=False)  # an explicit False wins over the environment
    assert not marker.exists()

    loaded = load_checkpoint(ckpt)  # opted in through the environment: this is what the refusal prevents
    loaded.state["payload"].close()
    assert loaded.state["epoch"] == 1 and marker.exists()
    marker.unlink()
    monkeypatch.delenv(ALLOW_PICKLE_ENV)
    loaded = load_checkpoint(tmp_path / "run", allow_pickle=True)
    loaded.state["payload"].close()
    assert loaded.epoch == 1 and marker.exists()


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "where", "type_name"),
    [
        ({"buffers": {3: collections.deque([1.0])}}, r"state\['tracker'\]\['buffers'\]\[3\]", "collections.deque"),
        ([1, Opaque()], r"state\['tracker'\]\[1\]", "Opaque"),
        ({"s": {1, 2}}, r"state\['tracker'\]\['s'\]", "set"),
        ((torch.nn.Parameter(torch.ones(1)),), r"state\['tracker'\]\[0\]", "Parameter"),
        ({frozenset({1}): 0}, r"state\['tracker'\]\[frozenset\(\{1\}\)\].*a dict key", "frozenset"),
        (np.array(["a"]), r"state\['tracker'\]", "<U1"),
    ],
)
def test_unsupported_state_refused_before_writing(tmp_path, value, where, type_name):
    unet = tiny_unet()
    save_checkpoint(tmp_path, 1, unet, {"epoch": 1})
    before = names(tmp_path)
    with pytest.raises(TypeError, match=where) as err:
        save_checkpoint(tmp_path, 2, unet, {"epoch": 2, "tracker": value})
    assert type_name in str(err.value) and "upported" in str(err.value)  # names the type and what is allowed
    assert names(tmp_path) == before  # no epoch-000002, no .tmp-* directory
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "epoch-000001"
    assert load_checkpoint(tmp_path).state == {"epoch": 1}


def test_malformed_state_file_is_a_checkpoint_error(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, tiny_unet(), {"epoch": 1})
    doc = json.loads((ckpt / "trainer_state.json").read_text())
    doc["state"]["epoch"] = {"$pickle": "gASV..."}
    data = json.dumps(doc).encode()
    (ckpt / "trainer_state.json").write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())  # a consistent meta.json: the checksum proves nothing
    meta["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unreadable trainer state.*\$pickle"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------- no silent fallback


def test_truncated_latest_is_refused_not_skipped(tmp_path):
    unet = tiny_unet()
    root = tmp_path / "checkpoints"
    p11 = save_checkpoint(tmp_path, 11, unet, {"epoch": 11})
    p12 = save_checkpoint(tmp_path, 12, unet, {"epoch": 12})
    weights = p12 / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    for read in (load_checkpoint, verify_checkpoint, latest_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(tmp_path)
        message = str(err.value)
        assert str(p12) in message and "unet/diffusion_pytorch_model.safetensors" in message, message
        assert f"pass its directory explicitly: {p11}" in message, message
    assert latest_checkpoint(tmp_path, strict=False) == p11
    with pytest.raises(CheckpointError, match="unet/diffusion_pytorch_model.safetensors has"):
        load_checkpoint(p12)

    # the user follows the advice: load the older one explicitly, then save over the broken epoch
    ckpt = load_checkpoint(p11)
    assert ckpt.epoch == 11 and ckpt.state == {"epoch": 11}
    save_checkpoint(tmp_path, 12, UNet2DModel.from_pretrained(ckpt.unet_dir), {"epoch": 12})
    assert load_checkpoint(tmp_path).state == {"epoch": 12}

    # `latest` naming a directory that is gone, or nothing sensible: refused; without an older one, says so
    _delete_all_but(root, "epoch-000012")
    (root / "latest").write_text("epoch-000013\n")
    with pytest.raises(CheckpointError, match="epoch-000013.*does not exist.*pass its directory explicitly"):
        load_checkpoint(tmp_path)
    (root / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="'garbage', not a checkpoint name"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path, strict=False) == root / "epoch-000012"
    (root / "epoch-000012" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no other complete checkpoint"):
        load_checkpoint(tmp_path)

    # no `latest` and no checkpoints: nothing to resume, not an error
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    assert latest_checkpoint(tmp_path / "fresh") is None
    assert latest_checkpoint(tmp_path / "fresh" / "checkpoints") is None


def _delete_all_but(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry)


def test_verify_checkpoint_detects_a_flipped_byte(tmp_path):
    path = save_checkpoint(tmp_path, 3, tiny_unet(), {"epoch": 3, "x": torch.ones(4)})
    for where in (tmp_path, tmp_path / "checkpoints", path):
        assert verify_checkpoint(where) == path
    for rel in ("unet/diffusion_pytorch_model.safetensors", "trainer_state.safetensors", "trainer_state.json"):
        file = path / rel
        original = file.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
        assert latest_checkpoint(tmp_path) == path  # same size: only the checksum notices
        with pytest.raises(CheckpointError, match=rf"{rel} does not match the sha256"):
            verify_checkpoint(tmp_path)
        with pytest.raises(CheckpointError, match=rel):
            load_checkpoint(path)
        file.write_bytes(original)
    assert verify_checkpoint(path) == path
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        verify_checkpoint(tmp_path / "nowhere")
