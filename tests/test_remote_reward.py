"""Remote rewards: the HTTP protocol against a local server on loopback, retries, and a dying server."""

import json
import threading
import urllib.request

import pytest
import torch

from agents.algorithms import load_run_config, train
from agents.common.checkpoint import load_checkpoint
from diffusion_gym.rewards import RemoteRewardError, make_reward, runs_on_host, serve_reward
from diffusion_gym.rewards.remote import decode_request, encode_request


class Server:
    """A reward server on a free loopback port, serving on a thread."""

    def __init__(self, reward_fn, name="test"):
        self.server = serve_reward(reward_fn, "127.0.0.1", 0, name=name)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def kill(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server_of():
    servers = []

    def start(reward_fn, name="test"):
        servers.append(Server(reward_fn, name))
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


def _images(n=6, channels=1, seed=0):
    return torch.rand(n, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_requests_give_the_local_jpeg_scores_exactly(server_of, channels):
    local = make_reward("jpeg_compressibility")
    server = server_of(local, "jpeg_compressibility")
    reward = make_reward("remote", url=server.url, batch_size=4)  # 6 images: two requests
    images = _images(channels=channels)
    assert runs_on_host(reward)
    assert torch.equal(reward(images), local(images))
    with urllib.request.urlopen(f"{server.url}/health") as answer:
        assert json.loads(answer.read()) == {"protocol": 1, "reward": "jpeg_compressibility"}


def test_npy_requests_are_lossless_and_conditions_travel(server_of):
    local = make_reward("digit_confidence")
    server = server_of(local)
    reward = make_reward("remote", url=server.url, encoding="npy")
    images, classes = _images(), torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(reward(images, classes), local(images, classes))
    seen = []
    prompts = server_of(lambda x, c: seen.extend(c) or torch.zeros(x.shape[0]))
    make_reward("remote", url=prompts.url)(images[:2], ["a bold 7", "a thin 1"])
    assert seen == ["a bold 7", "a thin 1"]


def test_the_request_round_trips_and_bad_requests_are_named():
    images = _images(3, 3)
    decoded, conditions = decode_request(json.loads(json.dumps(encode_request(images, torch.tensor([1, 2, 3]), "npy"))))
    assert torch.equal(decoded, images) and torch.equal(conditions, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="protocol 2 is not supported; this server speaks 1"):
        decode_request({**encode_request(images, None), "protocol": 2})
    with pytest.raises(ValueError, match="unknown image encoding 'jpeg'"):
        decode_request({"protocol": 1, "images": {"encoding": "jpeg", "data": []}})
    with pytest.raises(ValueError, match="conditions must be null or a list of 3 items"):
        decode_request({**encode_request(images, None), "conditions": [1]})


def test_a_server_error_is_reported_without_retries(server_of):
    calls = []

    def broken(images, conditions):
        calls.append(1)
        raise RuntimeError("the judge model is out of memory")

    server = server_of(broken)
    with pytest.raises(RemoteRewardError, match="HTTP 500: .*RuntimeError: the judge model is out of memory"):
        make_reward("remote", url=server.url, retries=0)(_images())
    bad = server_of(lambda x, c: torch.zeros(x.shape[0]))
    with pytest.raises(RemoteRewardError, match=r"HTTP 400: .*conditions must be null or a list"):
        make_reward("remote", url=bad.url, retries=3, backoff=5.0)._post(
            json.dumps({**encode_request(_images(2), None), "conditions": [1, 2, 3]}).encode()
        )
    assert len(calls) == 1


def test_no_server_is_a_clear_error_after_the_retries(server_of):
    server = server_of(lambda x, c: torch.zeros(x.shape[0]))
    server.kill()
    with pytest.raises(RemoteRewardError, match=r"no answer after 3 attempts .*python -m diffusion_gym.rewards.remote"):
        make_reward("remote", url=server.url, retries=2, backoff=0.01, timeout=2)(_images())


def test_bad_client_options_are_named():
    with pytest.raises(ValueError, match="url must start with http:// or https://, got 'localhost:8000'"):
        make_reward("remote", url="localhost:8000")
    with pytest.raises(ValueError, match=r"unknown encoding 'webp'; valid choices: \['png', 'npy'\]"):
        make_reward("remote", url="http://x", encoding="webp")


@pytest.mark.usefixtures("one_thread")
def test_a_run_whose_reward_server_dies_stops_with_its_last_checkpoint_intact(server_of, tmp_path):
    calls = []
    local = make_reward("jpeg_compressibility")

    def dies_after_two_epochs(images, conditions):  # evaluation + 2 epochs of 1 batch + evaluation = 4 calls
        calls.append(1)
        if len(calls) == 4:
            threading.Thread(target=server.kill).start()
        return local(images, conditions)

    server = server_of(dies_after_two_epochs)
    overrides = [
        "num_epochs=4",
        "sample.num_steps=4",
        "sample.num_envs=4",
        "sample.num_batches_per_epoch=1",
        "eval.num_samples=4",
        "eval.every=2",
        "env.reward=remote",
        f"env.reward_kwargs={{url: '{server.url}', retries: 1, backoff: 0.01, timeout: 2}}",
    ]
    with pytest.raises(RemoteRewardError, match="no answer after 2 attempts"):
        train(load_run_config(None, overrides), run_dir=tmp_path / "run", progress=False)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.epoch == 2, "the checkpoint written before the server died is the latest, and it loads"
    lines = (tmp_path / "run" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 2]
