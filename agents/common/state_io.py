"""Trainer state without pickle: tensors in a safetensors file, everything else in tagged JSON.

A trainer state (optimizer and lr-schedule state dicts, RNG states, counters, config, ...) is split into

* ``trainer_state.safetensors``: every ``torch.Tensor`` and every ``numpy.ndarray`` in the state, named
  ``t0``, ``t1``, ... in the order they are met;
* ``trainer_state.json``: the structure, with each tensor / array replaced by a reference to its name.

Loading uses only :mod:`json` and :mod:`safetensors`, so a crafted checkpoint cannot run code. The round trip
is exact, Python types included. Values are encoded as follows (JSON objects with a key starting with ``$``
are tags; a dict is written as a plain JSON object only when all its keys are strings not starting with ``$``):

=================================  ============================================================================
value                              JSON
=================================  ============================================================================
``None``, ``bool``, ``str``        ``null``, ``true`` / ``false``, a string
``int``                            a number when ``|x| <= 2**53``, else ``{"$int": "<hex>"}`` (any size, exact)
``float``                          a number when finite, else ``{"$float": "nan" | "inf" | "-inf" | "<bits>"}``
                                   (``<bits>``: the 16 hex digits of a NaN with a non-default payload or sign)
``list``                           an array
``tuple``                          ``{"$tuple": [...]}``
``dict``                           an object, or ``{"$dict": [[key, value], ...]}`` for other keys (``int``,
                                   ``float``, ``bool``, ``None``, ``tuple`` of these, or ``$``-strings)
``collections.OrderedDict``        ``{"$odict": [[key, value], ...]}``
``torch.Tensor``                   ``{"$tensor": "t3"}`` (plus ``"requires_grad": true`` when set); the tensor's
                                   dtype, shape and bytes are in the safetensors file
``numpy.ndarray``                  ``{"$ndarray": "t4", "dtype": "<u4"}`` (bool, int, uint, float16/32/64, complex64)
numpy bool / int / float scalar    ``{"$npscalar": "int64", "value": 3}``
=================================  ============================================================================

Anything else (arbitrary objects, ``deque``, ``set``, named tuples, ``str`` / ``int`` subclasses, tensor
subclasses such as ``nn.Parameter``, sparse or quantized tensors) is refused by :func:`encode_state` with a
``TypeError`` naming its key path, before anything is written. Tensors are stored detached and contiguous;
two references to one tensor come back as two equal tensors (aliasing is not kept).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "EncodedState",
    "StateDecodeError",
    "decode_state",
    "encode_state",
    "read_state",
    "write_state",
]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "diffusion-gym-trainer-state"
STATE_VERSION = 1

_MAX_JSON_INT = 2**53  # larger integers lose precision in many JSON readers (and JavaScript)
_DEFAULT_NAN_BITS = struct.pack(">d", math.nan).hex()

_TORCH_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
    }
    | {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}
)
_NUMPY_ARRAY_DTYPES = frozenset(
    np.dtype(name)
    for name in (
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
        "complex64",
    )
)
_NUMPY_SCALAR_DTYPES = frozenset(dtype for dtype in _NUMPY_ARRAY_DTYPES if dtype.kind in "biuf")
_SUPPORTED = (
    "dict (keys: str, int, float, bool, None or tuples of these), collections.OrderedDict, list, tuple, str, "
    "int, float, bool, None, torch.Tensor, numpy.ndarray and numpy bool/int/float scalars"
)
_HINTS = {
    "collections.deque": "convert it with list(...)",
    "set": "convert it with sorted(...) or list(...)",
    "frozenset": "convert it with sorted(...) or list(...)",
    "torch.nn.parameter.Parameter": "store parameter.detach() (a plain tensor)",
    "torch.device": "store str(device)",
    "torch.dtype": "store str(dtype)",
    "pathlib.PosixPath": "store str(path)",
    "pathlib.WindowsPath": "store str(path)",
}


class StateDecodeError(ValueError):
    """A trainer-state file is malformed (not written by :func:`write_state`, or damaged)."""


class EncodedState(NamedTuple):
    """A trainer state ready to write: the JSON document and the tensors it references.

    Attributes:
        document: The UTF-8 content of ``trainer_state.json``.
        tensors: ``{name: tensor}`` for ``trainer_state.safetensors`` (detached, contiguous, unshared).
    """

    document: bytes
    tensors: dict[str, Tensor]


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _refuse(path: str, value: Any, what: str = "") -> TypeError:
    name = _type_name(value)
    hint = _HINTS.get(name) or ("convert it with tuple(...)" if isinstance(value, tuple) else "")
    return TypeError(
        f"cannot save {path}{what}: type {name} is not supported in a checkpoint's trainer state "
        f"(it is stored without pickle). Supported: {_SUPPORTED}" + (f"; {hint}" if hint else "")
    )


def _float_tag(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    bits = struct.pack(">d", value).hex()
    return "nan" if bits == _DEFAULT_NAN_BITS else bits


class _Encoder:
    """Walks a state, collecting tensors and building the JSON tree (one instance per state)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._storages: set[tuple[str, int]] = set()

    def _add_tensor(self, tensor: Tensor) -> str:
        tensor = tensor.detach().resolve_conj().resolve_neg()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if not tensor.is_contiguous() or (storage in self._storages and tensor.numel() > 0):
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared memory
        else:
            self._storages.add(storage)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = tensor
        return name

    def key(self, key: Any, path: str) -> Any:
        if key is None or type(key) in (str, bool, int, float):
            return self.value(key, path)
        if type(key) is tuple:
            return {"$tuple": [self.key(item, f"{path}[{i}]") for i, item in enumerate(key)]}
        raise _refuse(path, key, f" (a dict key {key!r})")

    def value(self, value: Any, path: str) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            return value if abs(value) <= _MAX_JSON_INT else {"$int": hex(value)}
        if kind is float:
            return value if math.isfinite(value) else {"$float": _float_tag(value)}
        if kind is list:
            return [self.value(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if kind is tuple:
            return {"$tuple": [self.value(item, f"{path}[{i}]") for i, item in enumerate(value)]}
        if kind is dict or kind is OrderedDict:
            plain = kind is dict and all(type(k) is str and not k.startswith("$") for k in value)
            if plain:
                return {k: self.value(v, f"{path}[{k!r}]") for k, v in value.items()}
            pairs = [[self.key(k, f"{path}[{k!r}]"), self.value(v, f"{path}[{k!r}]")] for k, v in value.items()]
            return {"$odict" if kind is OrderedDict else "$dict": pairs}
        if kind is Tensor:
            if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
                raise _refuse(path, value, f" (a {value.layout} tensor on {value.device}; only dense tensors)")
            if value.dtype not in _TORCH_DTYPES:
                raise TypeError(
                    f"cannot save {path}: tensor dtype {value.dtype} is not supported in a checkpoint's trainer "
                    f"state; supported: {sorted(str(d) for d in _TORCH_DTYPES)}"
                )
            node: dict[str, Any] = {"$tensor": self._add_tensor(value)}
            if value.requires_grad:
                node["requires_grad"] = True
            return node
        if kind is np.ndarray:
            if value.dtype.newbyteorder("=") not in _NUMPY_ARRAY_DTYPES:
                raise TypeError(
                    f"cannot save {path}: numpy array dtype {value.dtype} is not supported in a checkpoint's "
                    f"trainer state; supported: {sorted(d.name for d in _NUMPY_ARRAY_DTYPES)}"
                )
            native = np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
            return {"$ndarray": self._add_tensor(torch.from_numpy(native)), "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            if value.dtype not in _NUMPY_SCALAR_DTYPES:
                raise TypeError(
                    f"cannot save {path}: numpy scalar of dtype {value.dtype} is not supported in a checkpoint's "
                    f"trainer state; supported: {sorted(d.name for d in _NUMPY_SCALAR_DTYPES)}"
                )
            return {"$npscalar": value.dtype.name, "value": self.value(value.item(), path)}
        raise _refuse(path, value)


def encode_state(state: Any, root: str = "state") -> EncodedState:
    """Check and encode a trainer state; nothing is written.

    Args:
        state: The state (usually a dict; see the module docstring for the supported types).
        root: Name of the state in error messages (``state['optimizer']['state'][0]``).

    Returns:
        The :class:`EncodedState` to pass to :func:`write_state`.

    Raises:
        TypeError: The state holds an unsupported value; the message names its key path and type.
    """
    encoder = _Encoder()
    tree = encoder.value(state, root)
    document = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": tree}
    text = json.dumps(document, indent=1, allow_nan=False, ensure_ascii=True) + "\n"
    return EncodedState(document=text.encode("utf-8"), tensors=encoder.tensors)


def write_state(directory: str | Path, encoded: EncodedState) -> list[Path]:
    """Write ``trainer_state.json`` and ``trainer_state.safetensors`` into ``directory`` (not fsynced).

    Args:
        directory: An existing directory.
        encoded: The result of :func:`encode_state`.

    Returns:
        The two paths written.
    """
    directory = Path(directory)
    tensors_path, json_path = directory / STATE_TENSORS, directory / STATE_JSON
    safetensors.torch.save_file(encoded.tensors, str(tensors_path), metadata={"format": STATE_FORMAT})
    _write_bytes(json_path, encoded.document)
    return [json_path, tensors_path]


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Decoder:
    """Rebuilds a state from the JSON tree and the loaded tensors (only builtin, numpy and torch types)."""

    def __init__(self, tensors: Mapping[str, Tensor], map_location: str | torch.device) -> None:
        self.tensors = tensors
        self.map_location = map_location

    def _tensor(self, name: Any, path: str) -> Tensor:
        if type(name) is not str or name not in self.tensors:
            raise StateDecodeError(f"{path} refers to tensor {name!r}, which is not in {STATE_TENSORS}")
        return self.tensors[name]

    def key(self, node: Any, path: str) -> Any:
        key = self.value(node, path)
        if not _is_key(key):
            raise StateDecodeError(f"{path} has a dict key of type {_type_name(key)}; expected str, int, float, ...")
        return key

    def _pairs(self, pairs: Any, path: str, out: dict[Any, Any]) -> dict[Any, Any]:
        if type(pairs) is not list or not all(type(p) is list and len(p) == 2 for p in pairs):
            raise StateDecodeError(f"{path} is malformed: expected a list of [key, value] pairs")
        for key_node, value_node in pairs:
            key = self.key(key_node, f"{path}[key]")
            if key in out:
                raise StateDecodeError(f"{path} has the key {key!r} twice")
            out[key] = self.value(value_node, f"{path}[{key!r}]")
        return out

    def value(self, node: Any, path: str) -> Any:
        kind = type(node)
        if node is None or kind in (bool, str, int, float):
            return node
        if kind is list:
            return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node)]
        if kind is not dict:
            raise StateDecodeError(f"{path} has an unexpected JSON value of type {kind.__name__}")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self.value(v, f"{path}[{k!r}]") for k, v in node.items()}
        if len(tags) != 1:
            raise StateDecodeError(f"{path} has several tags {tags}")
        tag, arg = tags[0], node[tags[0]]
        if tag == "$int" and type(arg) is str:
            try:
                return int(arg, 16)
            except ValueError:
                raise StateDecodeError(f"{path} has a malformed $int {arg!r}") from None
        if tag == "$float" and type(arg) is str:
            return _parse_float_tag(arg, path)
        if tag == "$tuple" and type(arg) is list:
            return tuple(self.value(item, f"{path}[{i}]") for i, item in enumerate(arg))
        if tag == "$dict":
            return self._pairs(arg, path, {})
        if tag == "$odict":
            return self._pairs(arg, path, OrderedDict())
        if tag == "$tensor":
            tensor = self._tensor(arg, path).to(self.map_location)
            if node.get("requires_grad") is True:
                tensor.requires_grad_(True)
            return tensor
        if tag == "$ndarray":
            dtype = _parse_dtype(node.get("dtype"), _NUMPY_ARRAY_DTYPES, path)
            array = self._tensor(arg, path).cpu().numpy()
            if array.dtype != dtype.newbyteorder("="):
                raise StateDecodeError(f"{path} is stored as {array.dtype}, but recorded as {dtype}")
            return array if array.dtype == dtype else array.astype(dtype)
        if tag == "$npscalar":
            dtype = _parse_dtype(arg, _NUMPY_SCALAR_DTYPES, path)
            value = self.value(node.get("value"), path)
            if type(value) not in (bool, int, float):
                raise StateDecodeError(f"{path} has a numpy scalar with a value of type {_type_name(value)}")
            return dtype.type(value)
        raise StateDecodeError(f"{path} has an unknown or malformed tag {tag!r} (written by a newer version?)")


def _is_key(key: Any) -> bool:
    if key is None or type(key) in (str, bool, int, float):
        return True
    return type(key) is tuple and all(_is_key(item) for item in key)


def _parse_float_tag(text: str, path: str) -> float:
    if text in ("nan", "inf", "-inf"):
        return float(text)
    try:
        value = struct.unpack(">d", bytes.fromhex(text))[0]
    except (ValueError, struct.error):
        raise StateDecodeError(f"{path} has a malformed $float {text!r}") from None
    if not math.isnan(value):
        raise StateDecodeError(f"{path} has a $float {text!r} that is not a NaN")
    return value


def _parse_dtype(text: Any, allowed: frozenset[np.dtype], path: str) -> np.dtype:
    try:
        dtype = np.dtype(text) if type(text) is str else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.newbyteorder("=") not in allowed:
        raise StateDecodeError(f"{path} has an unsupported numpy dtype {text!r}")
    return dtype


def decode_state(document: bytes, tensors: Mapping[str, Tensor], map_location: str | torch.device = "cpu") -> Any:
    """Rebuild a state from ``trainer_state.json`` content and the tensors of ``trainer_state.safetensors``.

    Args:
        document: The JSON document written by :func:`encode_state`.
        tensors: The tensors it references (e.g. ``safetensors.torch.load_file(...)``).
        map_location: Device of the restored torch tensors (numpy arrays are always on the host).

    Returns:
        The state, equal to the encoded one with the same Python types.

    Raises:
        StateDecodeError: The document is malformed or refers to a missing tensor.
    """

    def no_constants(name: str) -> float:
        raise StateDecodeError(f"{STATE_JSON} contains {name}, which this format never writes")

    try:
        doc = json.loads(document.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise StateDecodeError(f"{STATE_JSON} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or "state" not in doc:
        raise StateDecodeError(f"{STATE_JSON} is not a {STATE_FORMAT} document")
    if doc.get("version") != STATE_VERSION:
        raise StateDecodeError(
            f"{STATE_JSON} has version {doc.get('version')!r}; this code reads version {STATE_VERSION}"
        )
    try:
        return _Decoder(tensors, map_location).value(doc["state"], "state")
    except RecursionError:
        raise StateDecodeError(f"{STATE_JSON} is nested too deeply") from None


def read_state(directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read the state written by :func:`write_state` (only :mod:`json` and :mod:`safetensors`, no pickle).

    Args:
        directory: The directory holding ``trainer_state.json`` and ``trainer_state.safetensors``.
        map_location: Device of the restored torch tensors.

    Returns:
        The decoded state.

    Raises:
        StateDecodeError: A file is malformed.
        OSError: A file cannot be read.
    """
    directory = Path(directory)
    try:
        tensors = safetensors.torch.load_file(str(directory / STATE_TENSORS), device="cpu")
    except safetensors.SafetensorError as err:
        raise StateDecodeError(f"{STATE_TENSORS} is not a valid safetensors file: {err}") from None
    return decode_state((directory / STATE_JSON).read_bytes(), tensors, map_location)
