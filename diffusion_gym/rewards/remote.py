"""Rewards scored by another process or machine over HTTP, and the server that scores them.

A heavy reward (GenEval's detector, a VLM judge, a reward with its own pinned packages) runs in its
own environment; the training run sends it images and conditions and gets one score per image.

Protocol (version 1)
--------------------
``POST <url>/score`` with a JSON body::

    {"protocol": 1,
     "images": {"encoding": "png", "data": ["<base64 PNG>", ...]},   # or "npy" (below)
     "conditions": null | [3, 7, ...] | ["a bold 7", ...]}

* ``png``: one 8-bit PNG per image (grey ``L`` or ``RGB``), the images in ``[0, 1]`` rounded to
  ``round(x · 255)``, as JPEG-style rewards quantise anyway; ``npy``: ``data`` is one base64 string of
  a ``numpy.save`` float32 array ``(B, C, H, W)`` in ``[0, 1]``: lossless, 4 bytes per value.
* ``conditions``: class ids, prompts, or ``null`` for an unconditional model.

The answer is ``200`` with ``{"scores": [float, ...]}``, one finite score per image, higher is
better; a request the server cannot score is answered ``400`` (or ``500``) with ``{"error": "..."}``.
``GET <url>/health`` answers ``{"protocol": 1, "reward": "<name>"}``.

The client (:class:`RemoteReward`, registered as ``remote``: ``reward: remote``, ``reward_kwargs:
{url: http://host:8000}``) sends a batch in requests of at most ``batch_size`` images, waits
``timeout`` seconds for each answer, and retries a request that got no answer (refused, reset, timed
out) or a ``5xx`` up to ``retries`` times, ``backoff · 2^i`` seconds apart; then it raises
:class:`RemoteRewardError`, which stops a training run with its last checkpoint intact. A ``4xx``
is the request's fault and is not retried.

The reference server serves any registered reward::

    python -m diffusion_gym.rewards.remote --reward jpeg_compressibility --port 8000
    python -m diffusion_gym.rewards.remote --reward laion_aesthetic --options '{"device": "cuda"}'
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_gym.rewards.registry import RewardFn

__all__ = [
    "ENCODINGS",
    "PROTOCOL",
    "RemoteReward",
    "RemoteRewardError",
    "decode_request",
    "encode_request",
    "serve_reward",
]

PROTOCOL = 1
"""The version of the protocol this module speaks."""
ENCODINGS = ("png", "npy")
"""How images travel: 8-bit PNGs or a lossless float32 array."""


class RemoteRewardError(RuntimeError):
    """A remote reward that could not be scored: no server answered, or it answered with an error."""


def _encode_images(images: Tensor, encoding: str) -> dict[str, Any]:
    from PIL import Image

    array = images.detach().float().cpu().clamp(0, 1).numpy()
    if encoding == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float32), allow_pickle=False)
        return {"encoding": "npy", "data": base64.b64encode(buffer.getvalue()).decode("ascii")}
    pngs = []
    for image in (array * 255).round().astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"encoding": "png", "data": pngs}


def _decode_images(payload: dict[str, Any]) -> Tensor:
    from PIL import Image

    encoding = payload.get("encoding")
    if encoding == "npy":
        array = np.load(io.BytesIO(base64.b64decode(payload["data"])), allow_pickle=False)
        if array.ndim != 4:
            raise ValueError(f"npy images must be an array (B, C, H, W), got shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if encoding == "png":
        arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item)))) for item in payload["data"]]
        chw = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]
        return torch.from_numpy(np.stack(chw)).float() / 255
    raise ValueError(f"unknown image encoding {encoding!r}; valid choices: {list(ENCODINGS)}")


def _encode_conditions(conditions: Any) -> Any:
    if conditions is None:
        return None
    if isinstance(conditions, Tensor):
        return [int(c) for c in conditions.detach().cpu().flatten().tolist()]
    return [str(c) for c in conditions]


def encode_request(images: Tensor, conditions: Any, encoding: str = "png") -> dict[str, Any]:
    """The JSON body of a ``/score`` request for ``images`` in ``[0, 1]`` and their conditions."""
    return {
        "protocol": PROTOCOL,
        "images": _encode_images(images, encoding),
        "conditions": _encode_conditions(conditions),
    }


def decode_request(body: dict[str, Any]) -> tuple[Tensor, Any]:
    """The images ``(B, C, H, W)`` in ``[0, 1]`` and the conditions of a ``/score`` request body.

    Raises:
        ValueError: for another protocol version, a malformed body or conditions of another count.
    """
    if body.get("protocol") != PROTOCOL:
        raise ValueError(f"protocol {body.get('protocol')!r} is not supported; this server speaks {PROTOCOL}")
    images = _decode_images(body.get("images") or {})
    conditions = body.get("conditions")
    if conditions is not None:
        if not isinstance(conditions, list) or len(conditions) != images.shape[0]:
            raise ValueError(f"conditions must be null or a list of {images.shape[0]} items, got {conditions!r:.80}")
        if all(isinstance(c, int) for c in conditions):
            conditions = torch.tensor(conditions, dtype=torch.long)
    return images, conditions


class RemoteReward:
    """The client of a reward server (see the module docstring for the protocol), registered as ``remote``.

    A host reward (:func:`~diffusion_gym.rewards.host_reward`): the images go to the host to be sent.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8000"``.
        timeout: seconds to wait for each answer.
        retries: further attempts of a request that got no answer or a ``5xx``.
        backoff: seconds before the first retry, doubled for each next one.
        batch_size: images per request (``None``: the whole batch in one).
        encoding: ``"png"`` (8-bit) or ``"npy"`` (lossless float32).

    Raises:
        ValueError: for a URL that is not ``http(s)://``, a bad encoding or non-positive sizes.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int | None = None,
        encoding: str = "png",
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward url must start with http:// or https://, got {url!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; valid choices: {list(ENCODINGS)}")
        if timeout <= 0 or retries < 0 or backoff < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"remote reward needs timeout > 0, retries >= 0, backoff >= 0 and batch_size >= 1 or None; got "
                f"timeout={timeout}, retries={retries}, backoff={backoff}, batch_size={batch_size}"
            )
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.encoding = batch_size, encoding

    runs_on_host = True

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def _post(self, body: bytes) -> list[float]:
        """One request's scores, retried as the class docstring says."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.url}/score", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310 - http(s) only
                    return json.loads(answer.read())["scores"]
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                last = RemoteRewardError(f"remote reward {self.url}: HTTP {error.code}: {detail}")
                if error.code < 500:
                    raise last from None
            except (OSError, TimeoutError) as error:  # refused, reset, timed out (URLError is an OSError)
                last = error
        raise RemoteRewardError(
            f"remote reward {self.url}: no answer after {self.retries + 1} attempts ({last}); is the server "
            "running? Start one with: python -m diffusion_gym.rewards.remote --reward NAME --port PORT"
        )

    def __call__(self, images: Tensor, conditions: Any = None) -> Tensor:
        """The server's scores of ``images`` as a ``(B,)`` float32 tensor on the host.

        Raises:
            RemoteRewardError: when no server answered after the retries, or it answered an error or a
                wrong number of scores.
        """
        step = self.batch_size or max(1, images.shape[0])
        scores: list[float] = []
        for start in range(0, images.shape[0], step):
            chunk = slice(start, start + step)
            part = conditions[chunk] if conditions is not None else None
            body = json.dumps(encode_request(images[chunk], part, self.encoding)).encode()
            got = self._post(body)
            if not isinstance(got, list) or len(got) != images[chunk].shape[0]:
                raise RemoteRewardError(
                    f"remote reward {self.url} answered {got!r:.80} for {images[chunk].shape[0]} images"
                )
            scores.extend(float(s) for s in got)
        return torch.tensor(scores, dtype=torch.float32)


def _handler(reward_fn: RewardFn, name: str, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            if self.path.rstrip("/") == "/health":
                self._answer(200, {"protocol": PROTOCOL, "reward": name})
            else:
                self._answer(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._answer(404, {"error": f"unknown path {self.path!r}; use POST /score"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images, conditions = decode_request(body)
            except (ValueError, KeyError, TypeError) as error:
                self._answer(400, {"error": f"bad request: {error}"})
                return
            try:
                with lock:  # one batch at a time through the reward (a model is not thread-safe)
                    scores = reward_fn(images, conditions)
            except Exception as error:  # noqa: BLE001 - reported to the client
                self._answer(500, {"error": f"{type(error).__name__}: {error}"})
                return
            self._answer(200, {"scores": [float(s) for s in scores.detach().cpu().tolist()]})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    return Handler


def serve_reward(reward_fn: RewardFn, host: str = "127.0.0.1", port: int = 0, name: str = "") -> ThreadingHTTPServer:
    """A reward server for ``reward_fn`` bound to ``host:port`` (port 0: a free one), not yet serving.

    Call ``serve_forever()`` (in a thread, for tests); ``server.server_address`` has the port;
    ``shutdown()`` and ``server_close()`` stop it.
    """
    server = ThreadingHTTPServer((host, port), _handler(reward_fn, name or repr(reward_fn), threading.Lock()))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusion_gym.rewards.remote``: serve a registered reward over HTTP."""
    from diffusion_gym.rewards.registry import available_rewards, make_reward  # the package registered them

    parser = argparse.ArgumentParser(description="Serve a registered diffusion-gym reward over HTTP (protocol 1).")
    parser.add_argument("--reward", required=True, help=f"registered reward: {', '.join(available_rewards())}")
    parser.add_argument("--options", default="{}", help="the reward's options as JSON, e.g. '{\"quality\": 50}'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    reward_fn = make_reward(args.reward, **json.loads(args.options))
    server = serve_reward(reward_fn, args.host, args.port, name=args.reward)
    host, port = server.server_address[:2]
    print(
        f"serving reward {args.reward!r} on http://{host}:{port} (POST /score, GET /health); Ctrl-C stops", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
