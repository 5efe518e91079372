"""Calibration hidden states kept on disk between forwards (``oneshot(offload_folder=...)``).

The sequential engine's one cost that grows with the calibration set is the hidden
states it keeps at the current block's input, ``batches x tokens x width`` floats (and
twice that with dense targets, which run the dense model's stream beside the pruned
one). ``OffloadedInputs`` keeps them in one file per batch instead and loads each only
while a forward uses it, so memory holds a batch or two of them, however many batches
calibrate. It reads and writes them whole (``torch.save``/``torch.load``, never a memory
map, whose pages would count as resident) and leaves the other block inputs (masks,
positions, rotary embeddings, kept once for all batches) in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunekit.errors import ConfigError, ConfigTypeError

if TYPE_CHECKING:
    from prunekit.oneshot.engine import BlockInput

__all__ = ["OffloadedInputs", "check_folder", "offload_directory"]


class OffloadedInputs:
    """A list of ``BlockInput`` records whose hidden states wait in ``folder``.

    Indexing or iterating gives a record with its hidden states loaded (a fresh copy
    each time, freed once dropped); assigning or appending a record stores its hidden
    states and keeps the rest, so ``records[i] = record`` after ``record.advance(...)``
    is how a record moves on to the next block, as with a plain list."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self._records: list[BlockInput] = []  # hidden states None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> BlockInput:
        index = range(len(self))[index]  # -1 is the last, as in a list
        record = self._records[index].copy()
        record.replace_hidden(torch.load(self._path(index), weights_only=True))
        return record

    def __iter__(self) -> Iterator[BlockInput]:
        return (self[index] for index in range(len(self)))

    def __setitem__(self, index: int, record: BlockInput) -> None:
        index = range(len(self))[index]
        self._records[index] = self._store(index, record)

    def append(self, record: BlockInput) -> None:
        self._records.append(self._store(len(self._records), record))

    def copy_to(self, folder: Path) -> OffloadedInputs:
        """An independent copy whose files are in ``folder`` (made here)."""
        other = OffloadedInputs(folder)
        for index, record in enumerate(self._records):
            shutil.copyfile(self._path(index), other._path(index))
            other._records.append(record.copy())
        return other

    def _path(self, index: int) -> Path:
        return self.folder / f"{index}.pt"

    def _store(self, index: int, record: BlockInput) -> BlockInput:
        hidden = record.hidden
        if not isinstance(hidden, torch.Tensor):
            raise ConfigError(
                "offload_folder: the blocks get no hidden states to offload (a tensor as "
                f"first argument or hidden_states=); got {len(record.args)} positional "
                f"argument(s) and keywords {sorted(record.kwargs)}; call without it")
        if hidden.untyped_storage().nbytes() != hidden.nbytes:
            hidden = hidden.clone()  # a view would save its whole storage
        torch.save(hidden, self._path(index))
        return record.without_hidden()


def check_folder(folder: object) -> None:
    """Refuse an ``offload_folder`` that is neither None nor an existing directory."""
    if folder is None:
        return
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigTypeError(f"oneshot: offload_folder must be a path, got "
                              f"{type(folder).__name__} {folder!r}")
    if not Path(folder).is_dir():
        raise ConfigError(f"oneshot: offload_folder {str(folder)!r} is not a directory")


@contextmanager
def offload_directory(folder: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """A fresh directory inside ``folder`` (checked by ``check_folder``; None: no
    offloading, yields None), removed with everything in it on the way out, also on
    failure. A ``folder`` it cannot make one in is refused before anything is written."""
    if folder is None:
        yield None
        return
    try:
        path = Path(tempfile.mkdtemp(prefix="prunekit-offload-", dir=folder))
    except OSError as err:
        raise ConfigError(f"oneshot: cannot write in offload_folder {str(folder)!r}: "
                          f"{err}") from err
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
