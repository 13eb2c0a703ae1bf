"""The conditions ``c`` of the denoising MDP: class ids or prompts, behind one interface.

Every episode's condition is an integer id: a class id for a class-conditional (or unconditional)
pixel model, a prompt's id in a :class:`~diffusion_gym.prompts.PromptBook` for a text-to-image model.
Tensors, rollouts and advantage groups carry ids; a :class:`ConditionSet` turns them into what each
consumer needs:

==============================  =======================================  ==============================
consumer                        :class:`ClassConditions`                 :class:`PromptConditions`
==============================  =======================================  ==============================
the denoiser (``(x, t, c)``)    class ids (``None``: unconditional)      a :class:`Conditioning` of the
                                                                         prompts' embeddings (cached)
the policy (:meth:`encode`)     ``Conditioning(labels=ids)``             the same :class:`Conditioning`
the reward ``r(images, c)``     class ids (``None``: unconditional)      the prompts, a list of strings
the single env's ``obs["c"]``   ``Discrete(num_classes)``                ``Text``: the prompt itself
the vector env's ``obs["c"]``   class ids                                prompt ids (``env.prompts[i]``)
==============================  =======================================  ==============================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from .families.base import Conditioning, ModelFamily
from .prompts import MAX_PROMPT_CHARS, MAX_PROMPTS, PROMPT_CHARSET, PromptBook, PromptSource, make_prompts

ENCODE_CHUNK = 64
"""Prompts encoded per text-encoder call when new prompts are first seen."""


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_condition(condition: Any, num_classes: int | None) -> int:
    """``condition`` as a class id, or a ``ValueError`` naming it and the valid range.

    Accepts Python and numpy integers (and whole floats such as ``3.0``, and 0-d integer tensors);
    rejects bools, floats that are not whole (``3.7`` would otherwise silently become class 3),
    strings and out-of-range ids. An unconditional model (``num_classes=None``) takes 0 only.

    Args:
        condition: the class id a user asked for (e.g. ``reset(options={"condition": c})``).
        num_classes: the model's number of classes, ``None`` for an unconditional model.
    """
    high = 0 if num_classes is None else num_classes - 1
    valid = f"[0, {high}]" + (" (an unconditional model takes condition 0 only)" if num_classes is None else "")
    value = condition
    if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= high:
        raise ValueError(f"condition must be an integer class id in {valid}, got {condition!r}")
    return int(value)


class ConditionSet(ABC):
    """What an env's condition ids mean (see the module docstring)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """The number of ids (the vector env's ``Discrete`` condition space)."""

    @property
    def conditional(self) -> bool:
        """Whether the model sees the condition (``False``: an unconditional model, every id is 0)."""
        return True

    @abstractmethod
    def draw(self, n: int, rng: np.random.Generator) -> Tensor:
        """``n`` condition ids for episodes that start from pure noise, an int64 CPU tensor."""

    @abstractmethod
    def check(self, condition: Any) -> int:
        """The id of a condition a user asked for (``reset(options={"condition": ...})``), or a ``ValueError``."""

    @abstractmethod
    def encode(self, ids: Tensor) -> Conditioning:
        """The family's :class:`Conditioning` of ``ids``, on the ids' device."""

    @abstractmethod
    def denoiser_input(self, ids: Tensor) -> Any:
        """The condition argument of a ``(x, t, c)`` denoiser for ``ids``."""

    @abstractmethod
    def reward_input(self, ids: Tensor) -> Any:
        """The ``conditions`` argument of a reward ``r(images, conditions)`` for ``ids``."""

    @abstractmethod
    def single_space(self) -> spaces.Space:
        """The single env's ``obs["c"]`` space."""

    @abstractmethod
    def single_value(self, condition_id: int) -> Any:
        """The single env's ``obs["c"]`` for an id."""

    @abstractmethod
    def labels(self, ids: Sequence[int]) -> list[str]:
        """Human-readable names of ``ids`` (logs, sample grids)."""

    def evaluation_ids(self, n: int) -> Tensor:
        """The fixed conditions of ``n`` evaluation samples: the ids cycled in order (``i % size``)."""
        return torch.arange(n) % self.size

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to give the same ids the same meaning (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - nothing to restore by default
        """Restore :meth:`state_dict`."""


class ClassConditions(ConditionSet):
    """Class ids of a class-conditional pixel model, or the single id 0 of an unconditional one.

    Args:
        num_classes: the model's number of classes (``None``: unconditional).
    """

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes

    @property
    def size(self) -> int:
        """``num_classes`` (1 for an unconditional model)."""
        return self.num_classes or 1

    @property
    def conditional(self) -> bool:
        """Whether the model is class-conditional."""
        return self.num_classes is not None

    def draw(self, n: int, rng: np.random.Generator) -> Tensor:
        """Uniform class ids (zeros, without touching ``rng``, for an unconditional model)."""
        if self.num_classes is None:
            return torch.zeros(n, dtype=torch.long)
        return torch.from_numpy(rng.integers(0, self.num_classes, size=n))

    def check(self, condition: Any) -> int:
        """See :func:`check_condition`."""
        return check_condition(condition, self.num_classes)

    def encode(self, ids: Tensor) -> Conditioning:
        """``Conditioning(labels=ids)`` (empty for an unconditional model)."""
        return Conditioning(labels=ids) if self.conditional else Conditioning()

    def denoiser_input(self, ids: Tensor) -> Tensor | None:
        """The class ids (``None`` for an unconditional model)."""
        return ids if self.conditional else None

    def reward_input(self, ids: Tensor) -> Tensor | None:
        """The class ids (``None`` for an unconditional model)."""
        return ids if self.conditional else None

    def single_space(self) -> spaces.Discrete:
        """``Discrete(num_classes)`` (``Discrete(1)`` unconditional)."""
        return spaces.Discrete(self.size)

    def single_value(self, condition_id: int) -> np.int64:
        """The class id."""
        return np.int64(condition_id)

    def labels(self, ids: Sequence[int]) -> list[str]:
        """Names such as ``"class 3"``."""
        return [f"class {int(i)}" for i in ids]


class PromptConditions(ConditionSet):
    """Prompts of a text-to-image model: ids into a :class:`~diffusion_gym.prompts.PromptBook`.

    The embeddings of each prompt (and of the negative prompt) are computed once, when the prompt is
    first used, and kept on the family's device: rollouts and updates look them up by id.

    Args:
        family: the text-conditioned model family (its text encoders).
        prompts: a prompt source or spec (:func:`~diffusion_gym.prompts.make_prompts`).
        negative_prompt: the negative prompt of classifier-free guidance for every prompt (``None``:
            the pipeline's default unconditional input).
    """

    def __init__(
        self,
        family: ModelFamily,
        prompts: Any = "animals",
        negative_prompt: str | None = None,
    ) -> None:
        self.family = family
        self.source: PromptSource = make_prompts(prompts)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {negative_prompt!r}")
        self.negative_prompt = negative_prompt
        finite = self.source.prompts
        self.book = PromptBook(finite or ())
        self._size = len(finite) if finite is not None else MAX_PROMPTS
        self.book.limit = self._size
        self._table: Conditioning | None = None

    @property
    def size(self) -> int:
        """The number of prompts of a list source (``MAX_PROMPTS`` for an open-ended one)."""
        return self._size

    @property
    def prompts(self) -> list[str]:
        """The prompts registered so far, by id."""
        return self.book.prompts

    def draw(self, n: int, rng: np.random.Generator) -> Tensor:
        """The ids of ``n`` prompts drawn from the source."""
        return torch.tensor(self.book.ids(self.source.sample(n, rng)), dtype=torch.long)

    def check(self, condition: Any) -> int:
        """A prompt string (registered if new) or the id of a registered prompt.

        Raises:
            ValueError: for anything else, or a prompt outside a list source.
        """
        if isinstance(condition, str):
            if self.source.prompts is not None and condition not in self.source.prompts:
                shown = list(self.source.prompts[:5]) + (["…"] if len(self.source.prompts) > 5 else [])
                raise ValueError(f"prompt {condition!r} is not in the env's prompt list; valid choices: {shown}")
            return self.book.id(condition)
        if _is_int(condition) and 0 <= int(condition) < len(self.book):
            return int(condition)
        raise ValueError(
            f"condition must be a prompt (a string) or a prompt id in [0, {len(self.book) - 1}], got {condition!r}"
        )

    def _table_for(self, needed: int) -> Conditioning:
        """The embeddings of prompts ``0 … needed − 1`` (encoding the ones not seen yet)."""
        done = 0 if self._table is None else int(self._table.batch_size or 0)
        if needed > done:
            parts = [] if self._table is None else [self._table]
            for start in range(done, needed, ENCODE_CHUNK):
                chunk = self.book.lookup(range(start, min(needed, start + ENCODE_CHUNK)))
                parts.append(self.family.encode_conditions(chunk, negative=self.negative_prompt))
            self._table = Conditioning.cat(parts)
        assert self._table is not None
        return self._table

    def encode(self, ids: Tensor) -> Conditioning:
        """The prompts' embeddings (rows of the cached table), on the family's device.

        Every id comes from the book, so the table covers ``len(book)`` prompts; that count lives on the
        host: looking up a batch never waits for the device.
        """
        table = self._table_for(max(1, len(self.book)))
        return table[ids.to(self.family.device)]

    def denoiser_input(self, ids: Tensor) -> Conditioning:
        """See :meth:`encode`."""
        return self.encode(ids)

    def reward_input(self, ids: Tensor) -> list[str]:
        """The prompts of ``ids``."""
        return self.book.lookup(ids.tolist())

    def single_space(self) -> spaces.Text:
        """``Text(MAX_PROMPT_CHARS)`` over :data:`~diffusion_gym.prompts.PROMPT_CHARSET`, empty prompt allowed."""
        return spaces.Text(MAX_PROMPT_CHARS, min_length=0, charset="".join(sorted(PROMPT_CHARSET)))

    def single_value(self, condition_id: int) -> str:
        """The prompt."""
        return self.book[condition_id]

    def labels(self, ids: Sequence[int]) -> list[str]:
        """The prompts."""
        return self.book.lookup(ids)

    def evaluation_ids(self, n: int) -> Tensor:
        """The list's prompts cycled in order; an open-ended source's first prompts seen (at least one).

        Raises:
            ValueError: for an open-ended source before any prompt was drawn.
        """
        if self.source.prompts is None and len(self.book) == 0:
            raise ValueError("a prompt function has no fixed evaluation prompts before it drew any")
        count = self.size if self.source.prompts is not None else len(self.book)
        return torch.arange(n) % count

    def state_dict(self) -> dict[str, Any]:
        """The prompt book (an open-ended source's ids depend on the order prompts were drawn)."""
        return {"book": self.book.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.book.load_state_dict(state["book"])


def make_conditions(family: ModelFamily, prompts: Any = None, negative_prompt: str | None = None) -> ConditionSet:
    """The condition set of ``family``: prompts for a text family, class ids otherwise.

    Args:
        family: the model.
        prompts: the prompt source of a text family (default ``"animals"``); must be ``None`` otherwise.
        negative_prompt: a text family's negative prompt.

    Raises:
        ValueError: for prompts (or a negative prompt) given to a model that is not text-conditioned.
    """
    if family.text_conditioned:
        return PromptConditions(family, "animals" if prompts is None else prompts, negative_prompt)
    if prompts is not None or negative_prompt is not None:
        raise ValueError(
            f"prompts and negative_prompt need a text-to-image model; this {family.name} model is conditioned on "
            "class ids: leave them unset"
        )
    return ClassConditions(getattr(family, "num_classes", None))
