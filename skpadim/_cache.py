"""A bounded cache of a fit's embeddings, so the backbone runs once per image.

Fitting needs the training embeddings twice: once to fit the head, once to
score the training images for the threshold. Running the backbone again costs
as much as the first pass; keeping every embedding in RAM is what makes peers'
fits die on large training sets. This cache keeps batches in memory up to a
byte budget and spills the rest to a temporary directory, deleted on close.
"""

from __future__ import annotations

import os
import tempfile

import sklearn
import torch


def working_memory_bytes():
    """scikit-learn's ``working_memory`` in bytes: the bound on a fit's large
    working arrays (PatchCore's patch buffers, CFLOW's epoch cache)."""
    return int(sklearn.get_config()["working_memory"] * 2**20)


def cache_budget():
    """Bytes of a one-pass fit's embeddings kept in RAM before the rest spills.

    A sixteenth of scikit-learn's ``working_memory``: 64 MiB by default,
    enough for about 50 PaDiM images at 224 px, so that a fit's resident
    memory stays flat as the number of images grows (files in the temporary
    directory are written through the page cache, not held by the process).
    Change it with ``sklearn.set_config(working_memory=16 * MiB)`` or, for
    one fit, ``with sklearn.config_context(working_memory=16 * MiB): ...``.
    """
    return working_memory_bytes() // 16


def _nbytes(features):
    if isinstance(features, torch.Tensor):
        return features.numel() * features.element_size()
    return sum(_nbytes(part) for part in features)


def _write(features, file):
    """Write the tensors of ``features`` to ``file``; return how to read them.

    Raw bytes, not ``torch.save``: its zip format checksums every byte, which
    made spilling cost a fifth of a fit. A tensor that is a permuted view of
    a contiguous one (the positions-first embeddings) is written in its
    memory order and read back with the same strides.
    """
    if not isinstance(features, torch.Tensor):
        return [_write(part, file) for part in features]
    tensor = features.detach().cpu()
    order = sorted(range(tensor.ndim), key=lambda dim: -tensor.stride(dim))
    stored = tensor.permute(order).contiguous()  # no copy for a permuted view
    file.write(stored.reshape(-1).view(torch.uint8).numpy().data)
    return tuple(stored.shape), stored.dtype, tuple(order)


def _read(spec, file, device):
    """Read back what :func:`_write` wrote, on ``device``."""
    if isinstance(spec, list):
        return [_read(part, file, device) for part in spec]
    shape, dtype, order = spec
    stored = torch.empty(shape, dtype=dtype)
    file.readinto(stored.reshape(-1).view(torch.uint8).numpy().data)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    tensor = stored.permute(inverse)
    return tensor if device is None else tensor.to(device)


class FeatureCache:
    """Batches of features (tensors or lists of tensors) in order, bounded in RAM.

    Parameters
    ----------
    budget : int or None, default=None
        Bytes kept in memory; None uses :func:`cache_budget`. Batches beyond
        it go to files in a private temporary directory.
    device : torch.device or None, default=None
        Where batches read back from files are put (None: the CPU).
    """

    def __init__(self, budget=None, device=None):
        self.budget = cache_budget() if budget is None else budget
        self.device = device
        self._entries = []  # ("mem", features) or ("file", path)
        self._in_memory = 0
        self._directory = None
        self.spilled_bytes = 0

    def append(self, features):
        """Store one batch (moved to the CPU when spilled)."""
        size = _nbytes(features)
        if self._in_memory + size <= self.budget:
            self._entries.append(("mem", features))
            self._in_memory += size
            return
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix="skpadim_cache_")
        path = os.path.join(self._directory.name, f"{len(self._entries)}.bin")
        with open(path, "wb") as file:
            spec = _write(features, file)
        self._entries.append(("file", (path, spec)))
        self.spilled_bytes += size

    def __iter__(self):
        for where, item in self._entries:
            if where == "mem":
                yield item
            else:
                path, spec = item
                with open(path, "rb") as file:
                    features = _read(spec, file, self.device)
                yield features

    def __len__(self):
        return len(self._entries)

    def close(self):
        """Drop the batches and delete the spill files."""
        self._entries = []
        self._in_memory = 0
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
