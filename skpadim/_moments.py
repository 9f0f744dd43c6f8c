"""Mergeable streaming statistics: per-position count, mean and centred scatter.

The statistics of a Gaussian are a sum over samples, so they are accumulated
batch by batch and never need more than one batch of embeddings at a time. Each
batch is reduced to its (count, mean, centred scatter) with one batched matrix
product and merged into the running totals with Chan et al.'s pairwise update,
which stays exact when the values share a large common offset (the naive
``sum(x x^T) - n mu mu^T`` loses every digit there).

float32 batches (the backbone's output) take a faster road: they are centred
on a fixed reference (the first batch's mean, so the values stay small), and
their outer products are summed by float32 matrix products into a pending
block, which is merged into the float64 totals every ``FLUSH_SAMPLES``
samples and whenever the totals are read. The float32 sums then never run
over more than a few hundred terms of similar size, so they keep about six
significant digits, far below the float32 rounding the features came with;
the float64 work (the scatter is 3136 x 100 x 100 at PaDiM's defaults) is
paid once per flush instead of once per batch.
"""

from __future__ import annotations

import torch


class PatchMoments:
    """Mergeable per-position sample statistics: count, mean and centred scatter.

    ``fit`` on a data set equals :meth:`merge` of the moments of any partition
    of it, which is what makes fitting a map-reduce.

    Parameters
    ----------
    count : int
        Number of samples seen.
    mean : tensor of shape (n_positions, n_features), float64
        Per-position means.
    scatter : tensor of shape (n_positions, n_features, n_features), float64
        Sum over samples of the centred outer products (x - mean)(x - mean)^T;
        None for zeros, allocated when first needed.
    """

    # float32 samples summed in float32 before a merge into the float64 totals.
    FLUSH_SAMPLES = 512

    def __init__(self, count, mean, scatter):
        self._count = int(count)
        self._mean = torch.as_tensor(mean, dtype=torch.float64)
        # None stands for zeros not allocated yet (see the scatter property).
        self._scatter = (
            None if scatter is None else torch.as_tensor(scatter, dtype=torch.float64)
        )
        self._pending = None  # float32 sums not merged yet (see _accumulate)

    @property
    def count(self):
        """Number of samples seen."""
        return self._count + (0 if self._pending is None else self._pending.count)

    @property
    def mean(self):
        """Per-position means, (n_positions, n_features) float64."""
        self._flush()
        return self._mean

    @property
    def scatter(self):
        """Per-position centred scatters, float64, (n_positions, d, d)."""
        self._flush()
        if self._scatter is None:
            self._scatter = torch.zeros(
                self._mean.shape + self._mean.shape[-1:],
                dtype=torch.float64,
                device=self._mean.device,
            )
        return self._scatter

    @classmethod
    def empty(cls, n_positions, n_features, device="cpu"):
        """Moments of no samples, ready for :meth:`update`.

        Parameters
        ----------
        n_positions : int
            Number of positions (1 for a plain table of samples).
        n_features : int
            Dimension of each sample.
        device : str or torch.device, default="cpu"
            Where the statistics live.

        Returns
        -------
        moments : PatchMoments
            Zero count, mean and scatter.
        """
        mean = torch.zeros(n_positions, n_features, dtype=torch.float64, device=device)
        # The scatter's zeros are made when first needed.
        return cls(0, mean, None)

    @classmethod
    def from_batch(cls, x):
        """Moments of one batch of samples.

        Parameters
        ----------
        x : tensor of shape (n_positions, n_samples, n_features)
            The samples, positions first.

        Returns
        -------
        moments : PatchMoments
            Their count, means and centred scatters, in float64.
        """
        return cls.empty(x.shape[0], x.shape[2], device=x.device).update(x)

    @property
    def shape(self):
        """(n_positions, n_features)."""
        return tuple(self._mean.shape)

    def update(self, x):
        """Add a batch of samples in place.

        A float64 batch is centred on its own mean and merged at once with
        Chan's update; a float32 batch is summed in float32 and merged later
        (see the module's docstring). Both accumulate the outer products by
        in-place batched matmuls into existing arrays.

        Parameters
        ----------
        x : tensor of shape (n_positions, n_samples, n_features)
            The new samples, positions first.

        Returns
        -------
        self : PatchMoments
            The updated moments.
        """
        if x.shape[1] == 0:
            return self
        if x.dtype == torch.float32:
            return self._accumulate(x)
        self._flush()
        scatter = self.scatter
        x = x.to(torch.float64)
        n_new = x.shape[1]
        batch_mean = x.mean(dim=1)
        centred = x - batch_mean.unsqueeze(1)
        total = self._count + n_new
        delta = batch_mean - self._mean
        scatter.baddbmm_(centred.transpose(1, 2), centred)
        scatter.baddbmm_(
            delta.unsqueeze(2), delta.unsqueeze(1), alpha=self._count * n_new / total
        )
        self._mean.add_(delta, alpha=n_new / total)
        self._count = total
        return self

    def _accumulate(self, x):
        """Add a float32 batch to the pending float32 sums."""
        pending = self._pending
        if pending is None:
            pending = self._pending = _PendingSums(x.mean(dim=1))
        if self._scatter is None:
            # Allocated and touched (zeros) now, not at the first merge, so
            # that the memory a fit holds is the same from its first batch to
            # its last, however many images it sees.
            self._scatter = torch.zeros(
                pending.scatter.shape, dtype=torch.float64, device=x.device
            )
        centred = x - pending.reference.unsqueeze(1)
        # beta=0 on the first batch: the buffer is uninitialised memory.
        first = 0.0 if pending.count == 0 else 1.0
        pending.scatter.baddbmm_(centred.transpose(1, 2), centred, beta=first)
        # A float32 sum over one batch, accumulated in float64.
        pending.total.add_(centred.sum(dim=1))
        pending.count += x.shape[1]
        if pending.count >= self.FLUSH_SAMPLES:
            self._flush()
        return self

    def _flush(self):
        """Merge the pending float32 sums into the float64 totals (Chan).

        The float32 buffers are kept for the next batches (reused, not
        reallocated); :meth:`release` frees them.
        """
        pending = self._pending
        if pending is None or pending.count == 0:
            return
        m = pending.count
        # The pending samples' mean is reference + shift, and their centred
        # scatter is the sum around the reference minus m shift shift^T.
        shift = pending.total / m
        batch_mean = pending.reference.double() + shift
        total = self._count + m
        delta = batch_mean - self._mean
        # By blocks of positions: a float64 += float32 sum makes a float64
        # copy of its float32 operand, which must stay small.
        for start in range(0, len(self._scatter), _ADD_BLOCK):
            block = slice(start, start + _ADD_BLOCK)
            self._scatter[block].add_(pending.scatter[block])
        # Both rank-one corrections in one batched product.
        left = torch.stack([shift, delta], dim=2)
        right = torch.stack([-m * shift, (self._count * m / total) * delta], dim=1)
        self._scatter.baddbmm_(left, right)
        self._mean.add_(delta, alpha=m / total)
        self._count = total
        pending.count = 0
        pending.total.zero_()

    def release(self):
        """Merge pending sums and free the float32 buffers (end of a fit).

        Returns
        -------
        self : PatchMoments
            The same moments, all samples in the float64 totals.
        """
        self._flush()
        self._pending = None
        return self

    def merge(self, other):
        """Return the moments of the union of two disjoint sample sets (Chan).

        Parameters
        ----------
        other : PatchMoments
            Moments of other samples, of the same ``shape``.

        Returns
        -------
        moments : PatchMoments
            New moments of both sets; neither input is modified.

        Raises
        ------
        ValueError
            If the shapes differ.
        """
        if self.shape != other.shape:
            raise ValueError(
                "Cannot merge moments of different shapes (n_positions, "
                f"n_features): {self.shape} and {other.shape}."
            )
        total = self.count + other.count
        if total == 0:
            return PatchMoments(0, self.mean.clone(), self.scatter.clone())
        device = self.mean.device
        other_mean = other.mean.to(device)
        delta = other_mean - self.mean
        scatter = self.scatter + other.scatter.to(device)
        scatter.baddbmm_(
            delta.unsqueeze(2),
            delta.unsqueeze(1),
            alpha=self.count * other.count / total,
        )
        mean = self.mean + delta * (other.count / total)
        return PatchMoments(total, mean, scatter)

    def covariance(self, epsilon, positions=slice(None)):
        """Unbiased covariance plus ``epsilon`` on the diagonal, float64.

        Parameters
        ----------
        epsilon : float
            Added to the diagonal.
        positions : slice or index, default=slice(None)
            The positions wanted; all by default.

        Returns
        -------
        covariance : tensor of shape (n_selected, n_features, n_features)
            ``scatter / (count - 1) + epsilon * I`` at each selected position.

        Raises
        ------
        ValueError
            If fewer than two samples were seen.
        """
        if self.count < 2:
            raise ValueError(
                f"At least 2 samples are needed to estimate a covariance; got "
                f"{self.count}."
            )
        covariance = self.scatter[positions] / (self.count - 1)
        covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
        return covariance

    def copy(self):
        """Return an independent copy.

        Returns
        -------
        moments : PatchMoments
            A copy whose tensors share no memory with these.
        """
        return PatchMoments(self.count, self.mean.clone(), self.scatter.clone())

    def to(self, device):
        """Return the same moments on another torch device.

        Parameters
        ----------
        device : str or torch.device
            The target device.

        Returns
        -------
        moments : PatchMoments
            The moments on ``device``.
        """
        return PatchMoments(self.count, self.mean.to(device), self.scatter.to(device))

    def __getstate__(self):
        self._flush()  # pickles (e.g. from Dask workers) carry float64 totals only
        state = self.__dict__.copy()
        state["_pending"] = None
        return state

    def __setstate__(self, state):
        if "_count" not in state:  # pickled before the float32 road existed
            state = {
                "_count": state["count"],
                "_mean": state["mean"],
                "_scatter": state["scatter"],
            }
        state.setdefault("_pending", None)
        self.__dict__.update(state)


# Positions per block when adding the float32 sums into the float64 ones.
_ADD_BLOCK = 64


class _PendingSums:
    """float32 sums of samples around a fixed reference, not merged yet."""

    def __init__(self, reference):
        n_positions, n_features = reference.shape
        self.reference = reference  # float32, (n_positions, n_features)
        self.count = 0
        self.total = torch.zeros(
            n_positions, n_features, dtype=torch.float64, device=reference.device
        )
        self.scatter = torch.empty(
            n_positions, n_features, n_features, device=reference.device
        )


def positions_first(embeddings):
    """(n, d, h, w) or (n, d) tensor -> contiguous (h*w, n, d), the statistics' layout.

    The copy matters: batched matmuls on the permuted view take a strided
    path that was 4x (scoring) to 13x (statistics) slower on CPU.
    """
    if embeddings.ndim == 2:
        return embeddings.unsqueeze(0)
    n, d = embeddings.shape[:2]
    return embeddings.reshape(n, d, -1).permute(2, 0, 1).contiguous()
