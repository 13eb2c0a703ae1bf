"""Test-wide guards: no network, fixed threads, offline Hugging Face hub."""

import os
import socket

import pytest
import torch

from diffusion_gym.models import load_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DIFFUSION_GYM_TEST_THREADS=1 keeps parallel test runs on a 2-core machine from slowing each other.
torch.set_num_threads(int(os.environ.get("DIFFUSION_GYM_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a connection off this machine (tests must never download)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) and "/" not in host:
            raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def tiny_vard() -> list[str]:
    """``key=value`` overrides that make a VARD run take seconds (1 epoch, 4 steps, a tiny value net)."""
    return [
        "num_epochs=1",
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


@pytest.fixture(scope="module")
def model():
    """The embedded digits model (loaded once per test module)."""
    return load_model("embedded:digits")


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: the embedded networks are tiny, so one thread is as fast on
    quiet cores and far faster on busy ones (use with ``pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
