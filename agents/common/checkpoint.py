"""Atomic, verifiable training checkpoints: diffusers UNet + trainer state + extra safetensors weights.

On-disk layout (one run directory, one writer)::

    run_dir/
      checkpoints/
        latest                      # text file: the name of the newest checkpoint, e.g. "epoch-000012"
        epoch-000011/
        epoch-000012/
          unet/                     # unet.save_pretrained(..., safe_serialization=True): diffusers format,
            config.json             #   so UNet2DModel.from_pretrained(".../epoch-000012/unet") loads it
            diffusion_pytorch_model.safetensors
          trainer_state.json        # the trainer state without pickle (optimizer, lr schedule, RNG states, epoch,
          trainer_state.safetensors #   window and stat-tracker state, config ...): its tensors and numpy arrays
                                    #   in the safetensors file, everything else as tagged JSON (state_io.py)
          <name>.safetensors        # one per ``extra_weights`` entry (EMA weights, LoRA adapters, ...)
          meta.json                 # written last: epoch, time, and every file above with its size and sha256
        .tmp-epoch-000013-1a2b3c4d/ # only while a save is in progress (or left by a killed process)

Atomicity guarantees:

* A checkpoint is written into a temporary sibling directory ``.tmp-epoch-<epoch>-<random>``; every file is
  fsynced, ``meta.json`` is written (and fsynced) last, then the directory is renamed into place with
  ``os.replace`` and the parent directory is fsynced. A process killed at any moment therefore leaves either
  no ``epoch-*`` directory for that epoch or a complete one, never a partial one.
* Re-saving an existing epoch (e.g. after a resume) moves the old directory aside (to a ``.tmp-*`` name),
  renames the new one in, then deletes the old one.
* ``latest`` is updated only after the checkpoint is in place, via a temporary file + fsync + ``os.replace``.
* Old checkpoints are pruned only after that, by renaming them to ``.tmp-*`` names before deleting them,
  so a half-deleted directory never looks like a checkpoint.
* Stale ``.tmp-*`` entries left by a killed process are removed at the start of the next save. A run
  directory must therefore have a single writer at a time (one training process).
* Readers (:func:`latest_checkpoint`) only accept *complete* checkpoints: ``meta.json`` parses and every
  file it lists exists with the recorded size; :func:`load_checkpoint` and :func:`verify_checkpoint` also
  check every sha256 and raise :class:`CheckpointError` naming the corrupt or missing file.
* Readers never fall back silently: when ``checkpoints/latest`` names a checkpoint that is missing,
  incomplete or corrupt, :func:`load_checkpoint` (and :func:`latest_checkpoint`, unless ``strict=False``)
  raise :class:`CheckpointError` naming the broken checkpoint and file and the newest complete checkpoint,
  which the user may then pass explicitly (e.g. ``.../checkpoints/epoch-000011``).

Security: loading a checkpoint never unpickles. The trainer state is stored with
:func:`agents.common.state_io.encode_state` (``json`` + ``safetensors``; the supported types are listed there,
anything else is refused by :func:`save_checkpoint` with a ``TypeError`` before anything is written), the
weights are safetensors. Checkpoints of the previous format (version 1, a pickled ``trainer_state.pt``) are
refused by :func:`load_checkpoint`, because unpickling a crafted file runs arbitrary code and the sha256 in
``meta.json`` sits in the same directory, so it proves nothing about who wrote the file. To load such a
checkpoint you trust (one you wrote yourself), opt in explicitly with ``load_checkpoint(path,
allow_pickle=True)`` or with the environment variable ``DIFFUSION_GYM_ALLOW_PICKLE_CHECKPOINTS=1`` (e.g. for
``diffusion-gym train --resume``); the checkpoints saved after that resume use the new format.

Resume is exact when the trainer stores :func:`capture_rng_state` (Python ``random``, NumPy's global
generator, torch CPU and all CUDA generators) in ``state`` and calls :func:`restore_rng_state` on resume;
generators the trainer owns (``torch.Generator``, ``numpy.random.Generator``) must be stored in ``state``
by the trainer itself (``generator.get_state()``, ``rng.bit_generator.state``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from .state_io import STATE_JSON, STATE_TENSORS, StateDecodeError, encode_state, read_state, write_state

if TYPE_CHECKING:  # importing diffusers takes seconds; only needed for the annotation
    from diffusers import ModelMixin

__all__ = [
    "ALLOW_PICKLE_ENV",
    "CHECKPOINTS_DIR",
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # format version 1: a pickle, only loaded when explicitly allowed
UNET_DIR = "unet"
PIPELINE_CLASS_NAME = "ClassConditionalPipeline"  # model_index.json's _class_name: diffusion_gym.pipeline
TMP_PREFIX = ".tmp-"
FORMAT_NAME = "diffusion-gym-checkpoint"
FORMAT_VERSION = 2
ALLOW_PICKLE_ENV = "DIFFUSION_GYM_ALLOW_PICKLE_CHECKPOINTS"

_EPOCH_RE = re.compile(r"epoch-(\d{6,})")
_EXTRA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    Attributes:
        path: The checkpoint directory (``.../checkpoints/epoch-000012``).
        epoch: The epoch recorded in ``meta.json``.
        unet_dir: Directory for ``UNet2DModel.from_pretrained`` (diffusers format).
        state: The trainer state dict passed to :func:`save_checkpoint`.
        extra_weights: ``{name: state_dict}`` for every ``extra_weights`` entry that was saved.
    """

    path: Path
    epoch: int
    unet_dir: Path
    state: dict[str, Any]
    extra_weights: dict[str, dict[str, Tensor]]


def checkpoint_name(epoch: int) -> str:
    """Directory name of the checkpoint for ``epoch``.

    Args:
        epoch: Non-negative epoch number.

    Returns:
        ``"epoch-{epoch:06d}"``.
    """
    return f"epoch-{epoch:06d}"


# --------------------------------------------------------------------------------------------- filesystem helpers


def _fsync_dir(path: Path) -> None:
    """Fsync a directory so renames inside it are durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_and_fsync(path: Path) -> tuple[int, str]:
    """Return ``(size, sha256)`` of a file and fsync it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _new_tmp_path(root: Path, label: str) -> Path:
    return root / f"{TMP_PREFIX}{label}-{secrets.token_hex(4)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _delete_dir(root: Path, path: Path) -> None:
    """Delete a directory so that a killed deletion never leaves something that looks like a checkpoint."""
    doomed = _new_tmp_path(root, f"del-{path.name}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_stale_tmp(root: Path) -> None:
    """Remove ``.tmp-*`` entries left by a killed writer (one run directory has one writer)."""
    for entry in root.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            _remove(entry)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _new_tmp_path(path.parent, path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _epoch_of(name: str) -> int | None:
    match = _EPOCH_RE.fullmatch(name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------- saving


def _prepare_tensors(name: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detach, make contiguous, and un-share storage (safetensors refuses tensors that share memory)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"extra_weights[{name!r}] must be a dict of tensors, got {type(tensors).__name__}")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"extra_weights[{name!r}][{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        tensor = value.detach()
        ptr = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (ptr in seen and tensor.numel() > 0):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(ptr)
        out[str(key)] = tensor
    return out


def _prune(root: Path, current: str, keep: int) -> None:
    """Keep ``current`` plus the ``keep - 1`` highest-epoch other complete checkpoints; delete the rest."""
    others = sorted(
        ((epoch, entry) for entry in root.iterdir() if (epoch := _epoch_of(entry.name)) is not None),
        reverse=True,
    )
    kept = 1
    for _, entry in others:
        if entry.name == current:
            continue
        if kept < keep and _is_complete(entry):
            kept += 1
            continue
        _delete_dir(root, entry)


def _write_contents(
    tmp: Path,
    unet: ModelMixin | None,
    scheduler: Any | None,
    encoded: Any,
    extra: dict[str, dict[str, Tensor]],
    exports: dict[str, Callable[[Path], None]],
) -> None:
    """The UNet (diffusers format), the scheduler and pipeline index, the trainer state, the extra weights, exports."""
    if unet is not None:
        unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
    for folder, write in exports.items():
        write(tmp / folder)
    if scheduler is not None and unet is not None:
        scheduler.save_pretrained(tmp / "scheduler")
        # diffusion_gym.ClassConditionalPipeline samples class-conditional UNets (DDPMPipeline cannot); an explicit
        # class still loads the folder whatever it names: DDPMPipeline.from_pretrained(ckpt) works as before
        index = {
            "_class_name": PIPELINE_CLASS_NAME,
            "_diffusers_version": getattr(unet.config, "_diffusers_version", ""),
            "unet": ["diffusers", type(unet).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_state(tmp, encoded)
    for extra_name, tensors in extra.items():
        safetensors.torch.save_file(tensors, str(tmp / f"{extra_name}.safetensors"))


def _write_meta(tmp: Path, epoch: int, extra_names: list[str]) -> None:
    """Fsync every file and directory, then write ``meta.json`` (sizes and sha256 of every file) last."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        size, sha = _hash_and_fsync(path)
        files[path.relative_to(tmp).as_posix()] = {"size": size, "sha256": sha}
    for directory in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(directory)
    now = time.time()
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "epoch": epoch,
        "time": now,
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "torch_version": torch.__version__,
        "extra_weights": extra_names,
        "files": files,
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _move_into_place(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` (an existing one is moved aside first, then deleted)."""
    if final.exists():
        old = _new_tmp_path(root, f"old-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(root)


def _check_save_args(
    epoch: int, keep: int, extra_weights: dict[str, Any], exports: dict[str, Callable[[Path], None]]
) -> None:
    """Raise ``ValueError`` for a bad epoch, ``keep``, extra-weights name or export folder name."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    for name in extra_weights:
        if not isinstance(name, str) or not _EXTRA_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid extra_weights name {name!r}: use letters, digits, '_', '.' and '-'")
    for folder in exports:
        if not isinstance(folder, str) or not _EXTRA_NAME_RE.fullmatch(folder) or folder in (UNET_DIR, "scheduler"):
            raise ValueError(f"invalid export folder {folder!r}: use letters, digits, '_', '.' and '-' (not unet)")


def save_checkpoint(
    run_dir: str | Path,
    epoch: int,
    unet: ModelMixin | None,
    state: dict[str, Any],
    keep: int = 2,
    extra_weights: dict[str, dict[str, Tensor]] | None = None,
    scheduler: Any | None = None,
    exports: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoints/epoch-{epoch:06d}/`` and point ``checkpoints/latest`` at it.

    See the module docstring for the layout and the guarantees. Stale ``.tmp-*`` entries from a killed
    writer are removed first; after the new checkpoint is in place, all but the newest ``keep`` complete
    checkpoints are deleted (the one just written is always kept, plus the ``keep - 1`` highest other epochs).
    Incomplete ``epoch-*`` directories are deleted too.

    Args:
        run_dir: The run directory; checkpoints go into its ``checkpoints/`` subdirectory.
        epoch: Non-negative epoch number (names the directory). Re-saving an existing epoch replaces it.
        unet: A diffusers ``ModelMixin`` (e.g. ``UNet2DModel``); saved with
            ``save_pretrained(..., safe_serialization=True)``. A ``torch.compile`` wrapper is unwrapped.
            ``None``: no ``unet/`` folder (a LoRA run of a large model keeps only its adapters).
        state: Trainer state (optimizer and lr-scheduler state dicts, :func:`capture_rng_state`, epoch,
            window and stat-tracker state, config, ...), saved without pickle: see
            :mod:`agents.common.state_io` for the supported types (nested dicts, lists, tuples, scalars,
            tensors, numpy arrays and scalars); :func:`load_checkpoint` returns an equal dict.
        keep: How many complete checkpoints to keep (at least 1).
        extra_weights: ``{name: state_dict}`` saved as ``<name>.safetensors`` (EMA weights, LoRA adapters).
            Names may use letters, digits, ``_``, ``.`` and ``-``.
        scheduler: A diffusers scheduler; when given, it is saved in ``scheduler/`` with a
            ``model_index.json`` naming :class:`diffusion_gym.ClassConditionalPipeline`, so the checkpoint is a
            pipeline folder (``ClassConditionalPipeline.from_pretrained(ckpt)``, also
            ``DDPMPipeline.from_pretrained(ckpt)``, ``load_model(ckpt)``).
        exports: ``{folder: write}``: each ``write(path)`` fills ``<checkpoint>/<folder>/`` (e.g. a LoRA
            folder in diffusers' format), inside the atomic write.

    Returns:
        The path of the new checkpoint directory.

    Raises:
        ValueError: ``epoch`` is negative, ``keep < 1``, or an ``extra_weights`` name is invalid.
        TypeError: ``state`` is not a dict or holds an unsupported value (the message names its key path and
            type), or an ``extra_weights`` entry is not a dict of tensors. Nothing is written then.
    """
    extra_weights, exports = dict(extra_weights or {}), dict(exports or {})
    _check_save_args(epoch, keep, extra_weights, exports)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    encoded = encode_state(state)  # refuses unsupported values before anything is written
    prepared = {name: _prepare_tensors(name, tensors) for name, tensors in extra_weights.items()}
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile wrapper

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)

    name = checkpoint_name(epoch)
    final = root / name
    tmp = _new_tmp_path(root, name)
    tmp.mkdir()
    try:
        _write_contents(tmp, unet, scheduler, encoded, prepared, exports)
        _write_meta(tmp, epoch, sorted(extra_weights))
        _move_into_place(root, tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _write_text_atomic(root / LATEST_FILE, name + "\n")
    _prune(root, name, keep)
    return final


# --------------------------------------------------------------------------------------------- finding & loading


def _read_meta(ckpt: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((ckpt / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not isinstance(meta.get("epoch"), int):
        return None
    return meta


def _safe_relpath(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _is_legacy(meta: dict[str, Any]) -> bool:
    """Whether ``meta`` describes a format-version-1 checkpoint (a pickled ``trainer_state.pt``)."""
    return LEGACY_STATE_FILE in meta["files"] and STATE_JSON not in meta["files"]


def _files_problem(ckpt: Path, meta: dict[str, Any], hashes: bool) -> str | None:
    """What is wrong with the files ``meta.json`` lists (naming the file), or None when all are in place.

    Args:
        ckpt: The checkpoint directory.
        meta: Its parsed ``meta.json``.
        hashes: Also compare every file's sha256 (reads every byte); otherwise only existence and sizes.
    """
    listed = meta["files"]
    extra = meta.get("extra_weights", [])
    if not isinstance(extra, list) or not all(isinstance(name, str) for name in extra):
        return f"{META_FILE} has an invalid extra_weights entry {extra!r}"
    state_files = [LEGACY_STATE_FILE] if _is_legacy(meta) else [STATE_JSON, STATE_TENSORS]
    for rel in [*state_files, *(f"{name}.safetensors" for name in extra)]:
        if rel not in listed:
            return f"{META_FILE} does not list {rel}"
    for rel, info in listed.items():
        if not isinstance(rel, str) or not _safe_relpath(rel) or not isinstance(info, dict):
            return f"{META_FILE} has an invalid entry {rel!r}"
        file = ckpt / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != info.get("size"):
            return f"{rel} has {size} bytes, {META_FILE} records {info.get('size')}"
        if hashes and _sha256(file) != info.get("sha256"):
            return f"{rel} does not match the sha256 recorded in {META_FILE}"
    return None


def _problem(ckpt: Path) -> str | None:
    """What makes ``ckpt`` incomplete (naming the file), or None when it is complete (sizes only, no hashing)."""
    if not ckpt.is_dir():
        return "the directory does not exist"
    meta = _read_meta(ckpt)
    if meta is None:
        return f"{META_FILE} is missing" if not (ckpt / META_FILE).exists() else f"{META_FILE} is unreadable"
    return _files_problem(ckpt, meta, hashes=False)


def _is_complete(ckpt: Path) -> bool:
    """``meta.json`` parses and every file it lists exists with the recorded size (no hashing)."""
    return _problem(ckpt) is None


def _checkpoints_root(path: Path) -> Path:
    sub = path / CHECKPOINTS_DIR
    return sub if sub.is_dir() else path


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() or (_epoch_of(path.name) is not None and path.is_dir())


def _epoch_dirs(root: Path) -> list[Path]:
    """The ``epoch-*`` directories in ``root``, highest epoch first (``.tmp-*`` entries are never included)."""
    found = [(epoch, entry) for entry in root.iterdir() if (epoch := _epoch_of(entry.name)) is not None]
    return [entry for _, entry in sorted(found, reverse=True) if entry.is_dir()]


def _how_to_proceed(root: Path, broken: Path | None) -> str:
    """Tell the user which complete checkpoint to pass explicitly instead of a broken latest one."""
    older = next((entry for entry in _epoch_dirs(root) if entry != broken and _is_complete(entry)), None)
    if older is None:
        return (
            f"There is no other complete checkpoint in {root}: restore the broken files from a backup, or start "
            "the run again."
        )
    return (
        f"To continue from the newest complete checkpoint instead, pass its directory explicitly: {older} "
        "(e.g. --resume that path); the next save in this run directory replaces or deletes the broken checkpoint."
    )


def latest_checkpoint(path: str | Path, *, strict: bool = True) -> Path | None:
    """Find the newest checkpoint of a run.

    A checkpoint is complete when its ``meta.json`` parses and every file it lists exists with the
    recorded size (checksums are only checked by :func:`load_checkpoint` and :func:`verify_checkpoint`).
    The newest checkpoint is the one named by ``checkpoints/latest`` (or, without that file, the one with
    the highest epoch). ``.tmp-*`` directories (saves in progress or killed) are ignored.

    Args:
        path: A run directory, its ``checkpoints/`` directory, or a checkpoint directory itself (returned
            if complete, else None).
        strict: When the newest checkpoint is missing or incomplete (or ``latest`` is malformed), raise
            :class:`CheckpointError` naming it, the wrong file and the newest complete checkpoint. With
            ``strict=False``, silently return the newest complete checkpoint instead (the behaviour before
            format version 2; only for callers that only need some checkpoint, never for resuming).

    Returns:
        The checkpoint directory, or None if ``path`` holds no checkpoint (no ``latest`` file and no
        complete ``epoch-*`` directory), or, with ``strict=False``, no complete one.

    Raises:
        CheckpointError: With ``strict=True``: ``latest`` names a missing, incomplete or corrupt checkpoint,
            or is malformed.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if _is_checkpoint_dir(path):
        return path if _is_complete(path) else None
    root = _checkpoints_root(path)
    latest_file = root / LATEST_FILE
    newest: Path | None = None  # the checkpoint the run considers its newest, if `latest` names one
    try:
        named = latest_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        epochs = _epoch_dirs(root)
        if not epochs:
            return None
        newest = epochs[0]
        what, problem = f"the newest checkpoint {newest}", _problem(newest)
    except (OSError, UnicodeDecodeError) as err:
        what, problem = str(latest_file), f"it cannot be read ({err}); it should name the newest checkpoint"
    else:
        if _epoch_of(named) is None:
            what = str(latest_file)
            problem = f"it contains {named[:60]!r}, not a checkpoint name like 'epoch-000012'"
        else:
            newest = root / named
            what, problem = f"the latest checkpoint {newest} (named by {latest_file})", _problem(newest)
    if problem is None:
        return newest
    if strict:
        raise CheckpointError(
            f"{what} is broken: {problem}. Not falling back to an older checkpoint silently. "
            + _how_to_proceed(root, newest)
        )
    return next((entry for entry in _epoch_dirs(root) if entry != newest and _is_complete(entry)), None)


def _resolve(path: Path) -> Path:
    """The checkpoint directory ``path`` designates (see :func:`load_checkpoint`), or CheckpointError."""
    if (path / META_FILE).is_file():
        return path  # explicit checkpoint directory: verify it and report exactly what is wrong
    if path.is_dir() and _epoch_of(path.name) is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {META_FILE} is missing")
    found = latest_checkpoint(path, strict=True)
    if found is None:
        where = "does not exist" if not path.exists() else "contains no complete checkpoint"
        raise CheckpointError(
            f"no checkpoint found: {path} {where} (expected a run directory, its {CHECKPOINTS_DIR}/ "
            f"directory, or a checkpoint directory with {META_FILE})"
        )
    return found


def _verified_meta(ckpt: Path) -> dict[str, Any]:
    """Parse ``meta.json`` and check every listed file's size and sha256; raise CheckpointError naming a bad one."""
    meta = _read_meta(ckpt)
    if meta is None:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {META_FILE} is unreadable or malformed")
    problem = _files_problem(ckpt, meta, hashes=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupt: {problem}")
    return meta


def verify_checkpoint(path: str | Path) -> Path:
    """Check a checkpoint's files (sizes and sha256) without loading anything.

    For commands that read only the weights (``sample``, ``evaluate``): call it before
    ``UNet2DModel.from_pretrained(ckpt / "unet")`` or ``DDPMPipeline.from_pretrained(ckpt)``. A checkpoint
    of the old pickle-based format passes when its files are intact (its trainer state is not read).

    Args:
        path: Run directory, ``checkpoints/`` directory, or checkpoint directory; resolved like
            :func:`load_checkpoint` (a broken ``latest`` is an error, never skipped).

    Returns:
        The verified checkpoint directory.

    Raises:
        CheckpointError: No checkpoint at ``path``, or a listed file is missing or corrupt (the message names
            the file).
    """
    ckpt = _resolve(Path(path))
    _verified_meta(ckpt)
    return ckpt


def _pickle_allowed(allow_pickle: bool | None) -> bool:
    if allow_pickle is not None:
        return bool(allow_pickle)
    value = os.environ.get(ALLOW_PICKLE_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise CheckpointError(
        f"invalid {ALLOW_PICKLE_ENV}={value!r}: set it to '1' to allow loading old pickle-based checkpoints you "
        "trust, or to '0' (or leave it unset) to refuse them"
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, allow_pickle: bool | None = None
) -> Checkpoint:
    """Load and verify a checkpoint, without unpickling anything (unless explicitly allowed, see below).

    ``path`` is resolved with :func:`latest_checkpoint` (a run directory, its ``checkpoints/`` directory, or
    a checkpoint directory). When ``checkpoints/latest`` names a broken checkpoint this raises; it never
    falls back to an older one: pass the older checkpoint directory explicitly. Every file listed in
    ``meta.json`` is checked against its size and sha256 before anything is deserialised. The UNet is not
    loaded: use ``UNet2DModel.from_pretrained(ckpt.unet_dir)`` (or ``load_state_dict`` into an existing model).

    The trainer state is read with :func:`agents.common.state_io.read_state` (``json`` + ``safetensors``).
    Checkpoints of format version 1 hold a pickled ``trainer_state.pt``, which can run arbitrary code when
    loaded; they are refused unless ``allow_pickle=True`` or the environment variable
    ``DIFFUSION_GYM_ALLOW_PICKLE_CHECKPOINTS=1`` (only for checkpoints you trust).

    Args:
        path: Run directory, ``checkpoints/`` directory, or checkpoint directory.
        map_location: Device for the trainer-state tensors and the ``extra_weights`` tensors (numpy arrays
            in the state stay numpy arrays).
        allow_pickle: Load an old pickle-based checkpoint with ``torch.load(weights_only=False)``. None (the
            default) follows ``DIFFUSION_GYM_ALLOW_PICKLE_CHECKPOINTS`` (``1``: allow); False always refuses.

    Returns:
        The loaded :class:`Checkpoint`.

    Raises:
        CheckpointError: No complete checkpoint at ``path``, the latest one is broken, a listed file is
            missing or corrupt (the message names the file), or the checkpoint is an old pickle-based one
            and pickle is not allowed.
    """
    ckpt = _resolve(Path(path))
    meta = _read_meta(ckpt)
    if meta is None:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {META_FILE} is unreadable or malformed")
    version = meta.get("version")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {ckpt} has format version {version!r}; this code reads version {FORMAT_VERSION} (and "
            "version 1 on request): was it written by a newer diffusion-gym?"
        )
    legacy = _is_legacy(meta)
    if legacy and not _pickle_allowed(allow_pickle):
        raise CheckpointError(
            f"checkpoint {ckpt} is an old pickle-based checkpoint (format version {version}, its trainer state "
            f"is the pickle {LEGACY_STATE_FILE}). Loading it can run arbitrary code hidden in that file; the "
            f"sha256 in {META_FILE} does not tell who wrote it. If you trust this checkpoint (you wrote it "
            f"yourself), opt in explicitly: load_checkpoint(path, allow_pickle=True), or set the environment "
            f"variable {ALLOW_PICKLE_ENV}=1 (e.g. for 'diffusion-gym train --resume'). Checkpoints saved after "
            "that use the pickle-free format."
        )
    meta = _verified_meta(ckpt)
    if legacy:
        # Explicitly allowed by the caller: format version 1 pickled the trainer state.
        state = torch.load(ckpt / LEGACY_STATE_FILE, map_location=map_location, weights_only=False)
    else:
        try:
            state = read_state(ckpt, map_location)
        except StateDecodeError as err:
            raise CheckpointError(f"checkpoint {ckpt} has an unreadable trainer state: {err}") from None
    extra = {
        name: safetensors.torch.load_file(str(ckpt / f"{name}.safetensors"), device=str(map_location))
        for name in meta.get("extra_weights", [])
    }
    return Checkpoint(path=ckpt, epoch=meta["epoch"], unet_dir=ckpt / UNET_DIR, state=state, extra_weights=extra)


# --------------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global random number generators.

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor, ...] | None}`` covering
        Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's
        generator (None when CUDA is unavailable). Store it in the trainer state.
    """
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state` exactly.

    Keys that are missing are left untouched. CUDA states are restored on as many devices as both the
    snapshot and this machine have; a mismatch (or CUDA states without CUDA) only warns, since such a
    resume cannot be bit-identical anyway.

    Args:
        state: The dict returned by :func:`capture_rng_state` (possibly after a :func:`save_checkpoint` /
            :func:`load_checkpoint` round trip with any ``map_location``).
    """
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; not restored", stacklevel=2)
            return
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this machine has {count}",
                stacklevel=2,
            )
        for device, rng in enumerate(list(cuda_states)[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(rng, dtype=torch.uint8).cpu(), device)
