"""Prompt sources: where the prompts of a text-conditioned env's episodes come from.

A text-to-image episode's condition is a prompt. A :class:`PromptSource` draws the prompts of a
batch from the env's random generator, so a seeded env draws the same prompts every time:

* :class:`PromptList` — a fixed list, drawn uniformly with replacement (as ddpo-pytorch's prompt
  functions do). Built from an inline list, a text file (one prompt per line, blank lines and ``#``
  comments skipped) or a built-in set: ``"animals"`` (:data:`ANIMALS`, simple animal names written by
  this project, in the spirit of ddpo-pytorch's ``simple_animals``), ``"digits"``,
  ``"digits-heldout"`` (the embedded text-to-image model's phrasings) and their thin-stroke subsets
  ``"digits-thin"``, ``"digits-heldout-thin"``.
* :class:`PromptFunction` — a callable ``fn(rng) -> str`` (e.g. a template filled with random
  words); the prompts are open-ended.

Each distinct prompt gets an integer id, its index in a :class:`PromptBook`: episodes, rollouts,
advantage groups (the per-prompt stat tracker) and the vector env's observations carry ids; the
strings are looked up in the book. A list source fills the book in its own order, so a prompt's id is
its position in the list.
"""

from __future__ import annotations

import os
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_gym.digit_prompts import HELDOUT_PROMPTS, HELDOUT_THIN_PROMPTS, THIN_PROMPTS, TRAIN_PROMPTS

ANIMALS = (
    "cat", "dog", "horse", "cow", "sheep", "pig", "goat", "rabbit", "hamster", "mouse",
    "fox", "wolf", "bear", "deer", "moose", "lion", "tiger", "leopard", "cheetah", "zebra",
    "giraffe", "elephant", "rhinoceros", "hippopotamus", "camel", "kangaroo", "koala", "panda", "raccoon", "squirrel",
    "hedgehog", "otter", "seal", "dolphin", "whale", "shark", "turtle", "frog", "snake", "lizard",
    "owl", "eagle", "parrot", "penguin", "duck", "swan", "flamingo", "butterfly", "bee", "crab",
)  # fmt: skip
"""The built-in ``"animals"`` prompts: fifty common animals, one word each (written for this project)."""
BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {
    "animals": ANIMALS,
    "digits": TRAIN_PROMPTS,
    "digits-heldout": HELDOUT_PROMPTS,
    "digits-thin": THIN_PROMPTS,
    "digits-heldout-thin": HELDOUT_THIN_PROMPTS,
}
"""Built-in prompt sets by name (``digits``: the embedded text-to-image model's training phrasings,
``digits-heldout``: its evaluation phrasings; ``digits-thin`` and ``digits-heldout-thin``: their
thin-stroke subsets; :mod:`diffusion_gym.digit_prompts`)."""
MAX_PROMPT_CHARS = 1000
"""The longest prompt an env takes (the single env's ``Text`` observation space has this ``max_length``)."""
PROMPT_CHARSET = frozenset(string.printable.replace("\x0b", "").replace("\x0c", "")) | frozenset(
    chr(c) for c in range(0xA0, 0x250)
)
"""Characters a prompt may hold: printable ASCII (with tab and newline) and Latin letters with accents."""
MAX_PROMPTS = 2**20
"""How many distinct prompts one env registers at most (ids are ``Discrete(MAX_PROMPTS)`` for open sources)."""


def check_prompt(prompt: Any, what: str = "prompt") -> str:
    """``prompt`` if it is a usable prompt, else a ``ValueError`` saying why.

    A prompt is a string of at most :data:`MAX_PROMPT_CHARS` characters from :data:`PROMPT_CHARSET`
    (the empty prompt is allowed: it is the unconditional input of classifier-free guidance).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"{what} must be a string, got {prompt!r} ({type(prompt).__name__})")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{what} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed: {prompt[:60]!r}…"
        )
    bad = sorted(set(prompt) - PROMPT_CHARSET)
    if bad:
        raise ValueError(f"{what} {prompt!r} holds characters outside printable ASCII and Latin letters: {bad[:5]}")
    return prompt


class PromptSource(ABC):
    """Draws the prompts of a batch."""

    prompts: tuple[str, ...] | None = None
    """The finite set of prompts this source draws from, in order (``None`` for an open-ended source)."""

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` prompts drawn with ``rng`` (the env's generator)."""

    def describe(self) -> str:
        """A short description for logs."""
        return type(self).__name__


class PromptList(PromptSource):
    """Prompts drawn uniformly, with replacement, from a fixed list.

    Args:
        prompts: the prompts (at least one; duplicates are refused: each prompt is one group).
        name: what the list is, for logs (a file, a built-in set's name).

    Raises:
        ValueError: for an empty list, a duplicate or a prompt :func:`check_prompt` refuses.
    """

    def __init__(self, prompts: Sequence[str], name: str = "list") -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        checked = tuple(check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts))
        if not checked:
            raise ValueError(f"the prompt list {name!r} is empty; give at least one prompt")
        seen: dict[str, int] = {}
        for i, prompt in enumerate(checked):
            if prompt in seen:
                raise ValueError(f"prompt {prompt!r} appears twice in {name!r} (positions {seen[prompt]} and {i})")
            seen[prompt] = i
        self.prompts = checked
        self.name = name

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """See :meth:`PromptSource.sample`."""
        assert self.prompts is not None
        return [self.prompts[i] for i in rng.integers(0, len(self.prompts), size=n)]

    def describe(self) -> str:
        """``"<name> (<n> prompts)"``."""
        return f"{self.name} ({len(self.prompts or ())} prompts)"


class PromptFunction(PromptSource):
    """Open-ended prompts from a callable ``fn(rng: numpy.random.Generator) -> str``, one call per prompt.

    The callable must draw its randomness from ``rng`` only, so that a seeded env repeats itself.
    """

    def __init__(self, fn: Callable[[np.random.Generator], str]) -> None:
        if not callable(fn):
            raise TypeError(f"a prompt function must be callable, got {fn!r}")
        self.fn = fn

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """See :meth:`PromptSource.sample`."""
        return [check_prompt(self.fn(rng), f"the prompt returned by {self.describe()}") for _ in range(n)]

    def describe(self) -> str:
        """The callable's name."""
        return getattr(self.fn, "__name__", repr(self.fn))


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a text file: one per line, stripped; blank lines and lines starting with ``#`` skipped."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def make_prompts(spec: str | os.PathLike[str] | Sequence[str] | Callable[..., str] | PromptSource) -> PromptSource:
    """A prompt source from a spec.

    Args:
        spec: a built-in set's name (``"animals"``), a text file of prompts (one per line), a list of
            prompts, a callable ``fn(rng) -> str`` or a :class:`PromptSource` (returned as is).

    Raises:
        ValueError: for a string that is neither a built-in name nor an existing file (the message
            lists the valid choices), or a list :class:`PromptList` refuses.
    """
    if isinstance(spec, PromptSource):
        return spec
    if isinstance(spec, str | os.PathLike):
        name = os.fspath(spec)
        if name in BUILTIN_PROMPTS:
            return PromptList(BUILTIN_PROMPTS[name], name=name)
        if Path(name).expanduser().is_file():
            return PromptList(read_prompt_file(name), name=name)
        raise ValueError(
            f"unknown prompts {name!r}; valid choices: a built-in set {sorted(BUILTIN_PROMPTS)}, an existing text "
            "file with one prompt per line, a list of prompts, or a callable fn(rng) -> str"
        )
    if callable(spec):
        return PromptFunction(spec)
    return PromptList(spec)


class PromptBook:
    """The ids of the prompts an env has seen: ``book.id(prompt)`` registers, ``book[i]`` looks up.

    Args:
        prompts: prompts registered first, in order (a list source's prompts: their ids are their
            positions).
        limit: most prompts the book holds.
    """

    def __init__(self, prompts: Sequence[str] = (), limit: int = MAX_PROMPTS) -> None:
        self.limit = limit
        self._prompts: list[str] = []
        self._ids: dict[str, int] = {}
        for prompt in prompts:
            self.id(prompt)

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> str:
        return self._prompts[index]

    @property
    def prompts(self) -> list[str]:
        """The registered prompts, by id."""
        return list(self._prompts)

    def id(self, prompt: str) -> int:
        """The id of ``prompt``, registering it if it is new.

        Raises:
            ValueError: for a prompt :func:`check_prompt` refuses, or a new prompt past :attr:`limit`.
        """
        found = self._ids.get(prompt)
        if found is not None:
            return found
        check_prompt(prompt)
        if len(self._prompts) >= self.limit:
            raise ValueError(
                f"the env has registered {self.limit} distinct prompts, its limit; a prompt function that never "
                "repeats itself should draw from a finite vocabulary"
            )
        self._ids[prompt] = len(self._prompts)
        self._prompts.append(prompt)
        return self._ids[prompt]

    def ids(self, prompts: Sequence[str]) -> list[int]:
        """The ids of ``prompts`` (registering new ones)."""
        return [self.id(p) for p in prompts]

    def lookup(self, ids: Sequence[int]) -> list[str]:
        """The prompts of ``ids``."""
        return [self._prompts[int(i)] for i in ids]

    def state_dict(self) -> dict[str, Any]:
        """The registered prompts (a checkpoint of an env with an open-ended source needs them)."""
        return {"prompts": list(self._prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the saved prompts must extend this book's (same ids for the same prompts).

        Raises:
            ValueError: when the saved book disagrees with this one (another prompt list).
        """
        saved = list(state["prompts"])
        if saved[: len(self._prompts)] != self._prompts[: len(saved)]:
            raise ValueError("the saved env's prompts differ from this env's prompt list (another env.prompts?)")
        for prompt in saved[len(self._prompts) :]:
            self.id(prompt)
