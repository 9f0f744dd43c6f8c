"""The conditional normalizing flow of CFLOW-AD, in plain torch.

CFLOW-AD (Gudovskiy et al., WACV 2022) models the distribution of each
feature-map "fiber" (the C channels at one position) with a normalizing flow
conditioned on a 2-D sinusoidal encoding of the position. The reference builds
it from FrEIA's ``AllInOneBlock``; this module re-implements the parts that
reference uses, so that the checkpoint is a plain dict of tensors and every
random choice comes from a local generator:

- :func:`positional_encoding`, cflow-ad's ``positionalencoding2d``;
- :class:`CouplingBlock`, an affine coupling with soft clamping, a learned
  global affine and a fixed channel permutation;
- :class:`ConditionalFlow`, a stack of such blocks with a standard normal base;
- :class:`FlowPyramid`, one flow per tapped feature level.

Departures from the reference (cflow-ad with FrEIA):

- the permutation is a hard channel permutation stored as an index vector, as
  in anomalib's default (``permute_soft=False``), not a random rotation stored
  as a C x C matrix (FrEIA's ``permute_soft=True``, which is slow to draw and
  doubles the checkpoint at 2048 channels);
- the first ``C // 2`` channels condition the rest (FrEIA conditions on the
  first ``C - C // 2``);
- the last layer of each subnet starts at zero, so a new flow is the identity;
  FrEIA keeps PyTorch's default initialisation there.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -1/2 ln(2 pi): the log-density of a standard normal at 0, per dimension.
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def positional_encoding(
    condition_dim, height, width, *, dtype=torch.float32, device="cpu"
):
    """2-D sinusoidal positional encoding of CFLOW-AD.

    The first half of the channels encodes the column (x), the second half the
    row (y); within each half, even channels hold sines and odd channels
    cosines of the position times ``10000 ** (-2k / (condition_dim / 2))``.
    This is cflow-ad's ``positionalencoding2d``.

    Parameters
    ----------
    condition_dim : int
        Number of channels, a positive multiple of 4.
    height, width : int
        Size of the feature map.
    dtype : torch.dtype, default=torch.float32
        Dtype of the result.
    device : str or torch.device, default="cpu"
        Device of the result.

    Returns
    -------
    encoding : tensor of shape (condition_dim, height, width)

    Raises
    ------
    ValueError
        If ``condition_dim`` is not a positive multiple of 4.
    """
    if condition_dim <= 0 or condition_dim % 4 != 0:
        raise ValueError(
            f"condition_dim must be a positive multiple of 4, got {condition_dim}."
        )
    half = condition_dim // 2
    # float64 for the angles: at large positions a float32 product already
    # moves the sine by ~1e-6, more than the final float32 rounding.
    frequencies = torch.exp(
        torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half)
    )
    angle_x = torch.arange(width, dtype=torch.float64)[None, :] * frequencies[:, None]
    angle_y = torch.arange(height, dtype=torch.float64)[None, :] * frequencies[:, None]
    encoding = torch.empty(condition_dim, height, width, dtype=torch.float64)
    encoding[0:half:2] = torch.sin(angle_x)[:, None, :]
    encoding[1:half:2] = torch.cos(angle_x)[:, None, :]
    encoding[half::2] = torch.sin(angle_y)[:, :, None]
    encoding[half + 1 :: 2] = torch.cos(angle_y)[:, :, None]
    return encoding.to(dtype=dtype, device=device)


def _as_generator(seed):
    """A CPU torch.Generator from a Generator, an int, a RandomState or None."""
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    elif isinstance(seed, numbers.Integral):
        generator.manual_seed(int(seed))
    elif isinstance(seed, np.random.RandomState):
        generator.manual_seed(int(seed.randint(np.iinfo(np.int32).max)))
    else:
        raise ValueError(
            "generator must be a torch.Generator, an int, a numpy RandomState "
            f"or None, got {seed!r}."
        )
    return generator


class _Linear(nn.Linear):
    """nn.Linear that leaves its initialisation to the caller.

    nn.Linear's own initialisation draws from the global RNG, which a flow must
    neither consume nor depend on.
    """

    def reset_parameters(self):
        pass


def _linear(in_features, out_features, generator, *, zero=False):
    """A linear layer initialised from ``generator``.

    Non-zero layers get PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    layer = _Linear(in_features, out_features)
    with torch.no_grad():
        if zero:
            layer.weight.zero_()
            layer.bias.zero_()
            return layer
        bound = 1 / math.sqrt(in_features)
        for parameter in (layer.weight, layer.bias):
            nn.init.uniform_(parameter, -bound, bound, generator=generator)
    return layer


def _check_inputs(x, cond, n_features, condition_dim):
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(
            f"Expected x of shape (N, {n_features}), got {tuple(x.shape)}."
        )
    if cond.shape != (x.shape[0], condition_dim):
        raise ValueError(
            f"Expected cond of shape ({x.shape[0]}, {condition_dim}), "
            f"got {tuple(cond.shape)}."
        )


class CouplingBlock(nn.Module):
    """Conditional affine coupling, global affine and channel permutation.

    The block of CFLOW-AD (FrEIA's ``AllInOneBlock`` with a condition, a soft
    clamp, a softplus global scale and a hard permutation). On x of shape
    (N, C) with x1 = the first ``C // 2`` channels and x2 the rest:

    1. ``(s_raw, t_raw) = subnet([x1, cond])``, ``s = clamp * tanh(0.1 s_raw)``,
       ``t = 0.1 t_raw``, ``y2 = x2 * exp(s) + t`` (the 0.1 factors follow
       FrEIA: they slow down the coupling relative to the global affine);
    2. ``u = [x1, y2] * scale + offset`` with ``scale = 0.1 softplus_{beta=0.5}
       (a) > 0`` per channel (FrEIA's ``SOFTPLUS``), initialised to 1;
    3. ``y = u[:, permutation]``.

    The log-determinant is ``sum(s) + sum(log scale)``.

    Parameters
    ----------
    n_features : int
        Number of channels C (at least 1; odd C is fine).
    condition_dim : int
        Number of condition channels P.
    hidden_features : int or None, default=None
        Width of the subnet's hidden layer; None means ``2 * (C // 2 + P)``,
        as in cflow-ad's ``subnet_fc``.
    clamp : float, default=1.9
        Bound of the log-scale ``s`` (cflow-ad's ``clamp_alpha``).
    generator : torch.Generator, int, numpy RandomState or None, default=None
        Source of the initial weights and of the permutation.

    Notes
    -----
    The subnet's last layer is initialised to zero, so a new block is the
    identity up to its permutation: the first steps then train from the base
    density itself rather than from an arbitrary random warp of the features,
    which keeps early losses (and their gradients) moderate on high-dimensional
    features. Its first layer still has random weights, so the gradient reaches
    it after one step.
    """

    def __init__(
        self,
        n_features,
        condition_dim,
        *,
        hidden_features=None,
        clamp=1.9,
        generator=None,
    ):
        super().__init__()
        generator = _as_generator(generator)
        self.n_features = n_features
        self.condition_dim = condition_dim
        self.clamp = float(clamp)
        self.split = n_features // 2
        in_features = self.split + condition_dim
        if hidden_features is None:
            hidden_features = 2 * in_features
        self.subnet = nn.Sequential(
            _linear(in_features, hidden_features, generator),
            nn.ReLU(),
            _linear(
                hidden_features, 2 * (n_features - self.split), generator, zero=True
            ),
        )
        # softplus_{beta=0.5}(a) * 0.1 = 1 at a = 2 ln(exp(5) - 1).
        initial = 2 * math.log(math.expm1(5.0))
        self.global_scale = nn.Parameter(torch.full((n_features,), initial))
        self.global_offset = nn.Parameter(torch.zeros(n_features))
        self.register_buffer(
            "permutation", torch.randperm(n_features, generator=generator)
        )

    def _scale_shift(self, x1, cond):
        """Clamped log-scale s and shift t of x2, from x1 and the condition."""
        raw = 0.1 * self.subnet(torch.cat([x1, cond], dim=1))
        raw_s, t = raw.chunk(2, dim=1)
        return self.clamp * torch.tanh(raw_s), t

    def _global_scale(self):
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def forward(self, x, cond):
        """Map x to y and return the log-determinant of the Jacobian.

        Parameters
        ----------
        x : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        y : tensor of shape (N, C)
        log_det : tensor of shape (N,)
            ``log |det dy/dx|`` per sample.
        """
        _check_inputs(x, cond, self.n_features, self.condition_dim)
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(x1, cond)
        u = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        scale = self._global_scale()
        y = (u * scale + self.global_offset)[:, self.permutation]
        log_det = s.sum(dim=1) + torch.log(scale).sum()
        return y, log_det

    def inverse(self, y, cond):
        """Map y back to x (the inverse of :meth:`forward`).

        Parameters
        ----------
        y : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        x : tensor of shape (N, C)
        """
        _check_inputs(y, cond, self.n_features, self.condition_dim)
        # y[:, j] = u[:, permutation[j]], so u = y[:, argsort(permutation)].
        u = y[:, torch.argsort(self.permutation)]
        u = (u - self.global_offset) / self._global_scale()
        x1, y2 = u[:, : self.split], u[:, self.split :]
        s, t = self._scale_shift(x1, cond)
        return torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=1)


class ConditionalFlow(nn.Module):
    """A stack of :class:`CouplingBlock` with a standard normal base density.

    Parameters
    ----------
    n_features : int
        Number of channels C of the modelled vectors.
    condition_dim : int
        Number of condition channels P.
    n_coupling_blocks : int, default=8
        Number of blocks.
    clamp : float, default=1.9
        Bound of each block's log-scale.
    generator : torch.Generator, int, numpy RandomState or None, default=None
        Source of the initial weights and permutations, drawn block by block.

    Notes
    -----
    The state dict holds only tensors: the parameters and each block's
    ``permutation`` index buffer. A flow rebuilt with the same constructor
    arguments (any generator) and given that state dict computes the same
    outputs.
    """

    def __init__(
        self,
        n_features,
        condition_dim,
        *,
        n_coupling_blocks=8,
        clamp=1.9,
        generator=None,
    ):
        super().__init__()
        generator = _as_generator(generator)
        self.n_features = n_features
        self.condition_dim = condition_dim
        self.blocks = nn.ModuleList(
            CouplingBlock(n_features, condition_dim, clamp=clamp, generator=generator)
            for _ in range(n_coupling_blocks)
        )

    def forward(self, x, cond):
        """Map x to the latent z.

        Parameters
        ----------
        x : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        z : tensor of shape (N, C)
        log_det : tensor of shape (N,)
            ``log |det dz/dx|`` per sample.
        """
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, cond)
            log_det = log_det + block_log_det
        return x, log_det

    def inverse(self, z, cond):
        """Map the latent z back to x.

        Parameters
        ----------
        z : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        x : tensor of shape (N, C)
        """
        for block in reversed(self.blocks):
            z = block.inverse(z, cond)
        return z

    def log_prob(self, x, cond):
        """Log-likelihood of x per dimension, as CFLOW-AD uses it.

        Parameters
        ----------
        x : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        log_prob : tensor of shape (N,)
            ``(-||z||^2 / 2 - C ln(2 pi) / 2 + log_det) / C``: the log-density
            of x divided by C, so levels with different C are comparable.
        """
        z, log_det = self(x, cond)
        n_features = x.shape[1]
        log_density = -0.5 * z.square().sum(dim=1) + log_det
        return log_density / n_features - _HALF_LOG_2PI


class FlowPyramid(nn.Module):
    """One :class:`ConditionalFlow` per tapped feature level, as in CFLOW-AD.

    Parameters
    ----------
    level_channels : list of int
        Number of channels of each level.
    condition_dim : int, default=128
        Channels of the positional encoding, a multiple of 4.
    n_coupling_blocks : int, default=8
        Blocks per flow.
    clamp : float, default=1.9
        Bound of each block's log-scale.
    random_state : int, numpy RandomState, torch.Generator or None, default=None
        Source of the initial weights and permutations of every flow, drawn
        level by level from one generator.

    Attributes
    ----------
    flows : nn.ModuleList of ConditionalFlow
        The flow of each level.
    """

    def __init__(
        self,
        level_channels,
        condition_dim=128,
        n_coupling_blocks=8,
        clamp=1.9,
        random_state=None,
    ):
        super().__init__()
        # Fails early, before any weight is drawn, on a bad condition_dim.
        positional_encoding(condition_dim, 1, 1)
        generator = _as_generator(random_state)
        self.level_channels = [int(c) for c in level_channels]
        self.condition_dim = condition_dim
        self.flows = nn.ModuleList(
            ConditionalFlow(
                channels,
                condition_dim,
                n_coupling_blocks=n_coupling_blocks,
                clamp=clamp,
                generator=generator,
            )
            for channels in self.level_channels
        )
        # Flattened encodings by (height, width, device, dtype); a plain dict,
        # so it stays out of the state dict.
        self._encodings = {}

    def position_conditions(self, height, width, *, dtype, device):
        """Flattened positional encoding, cached.

        Returns
        -------
        conds : tensor of shape (height * width, condition_dim)
            Row ``i * width + j`` is the encoding of position (i, j).
        """
        key = (height, width, torch.device(device), dtype)
        if key not in self._encodings:
            encoding = positional_encoding(
                self.condition_dim, height, width, dtype=dtype, device=device
            )
            self._encodings[key] = encoding.flatten(1).T.contiguous()
        return self._encodings[key]

    def to_fibers(self, features):
        """Fibers of a feature map and their conditions.

        Parameters
        ----------
        features : tensor of shape (B, C, h, w)

        Returns
        -------
        fibers : tensor of shape (B * h * w, C)
            Row ``(b * h + i) * w + j`` is ``features[b, :, i, j]``.
        conds : tensor of shape (B * h * w, condition_dim)
            The positional encoding of each fiber.
        """
        n_images, n_channels, height, width = features.shape
        fibers = features.permute(0, 2, 3, 1).reshape(-1, n_channels)
        conds = self.position_conditions(
            height, width, dtype=features.dtype, device=features.device
        )
        return fibers, conds.repeat(n_images, 1)

    def level_log_prob(self, level, features):
        """Per-position log-likelihood per dimension of one level's features.

        Parameters
        ----------
        level : int
            Index of the level in ``level_channels``.
        features : tensor of shape (B, C, h, w)

        Returns
        -------
        log_prob : tensor of shape (B, h, w)
        """
        fibers, conds = self.to_fibers(features)
        log_prob = self.flows[level].log_prob(fibers, conds)
        n_images, _, height, width = features.shape
        return log_prob.reshape(n_images, height, width)

    def fiber_loss(self, level, fibers, conds):
        """Training loss of CFLOW-AD on a batch of fibers.

        Parameters
        ----------
        level : int
            Index of the level.
        fibers : tensor of shape (N, C)
        conds : tensor of shape (N, condition_dim)

        Returns
        -------
        loss : scalar tensor
            Mean of ``-logsigmoid(log_prob)`` = ``softplus(-log_prob)``.

        Notes
        -----
        This is cflow-ad's loss, kept for fidelity. For badly fit fibers
        (per-dimension log p well below 0) it equals the negative
        log-likelihood; for fibers already fit well it tends to 0, so their
        gradient fades. The plain NLL has no lower bound on real features:
        near-constant channels (dead ReLUs are exactly 0) let the flow push
        their density to infinity, and that term would dominate the loss.
        """
        log_prob = self.flows[level].log_prob(fibers, conds)
        return -F.logsigmoid(log_prob).mean()
