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

Speed: the modules' ``forward``, ``inverse`` and ``log_prob`` are the plain,
differentiable (and ONNX-exportable) definition, fibers as rows. Training and
scoring take two faster paths that compute the same up to float rounding:
:meth:`ConditionalFlow.loss` (:class:`_FlowLoss`, a hand-written backward)
and :meth:`ConditionalFlow.grid_log_prob` (image by image, in place). Both
hold the activations channels-major, (channels, fibers), so that the split
and the channel permutation are row slices and row copies, and run their
float32 CPU matmuls on oneDNN where torch has it (:func:`_mm`).
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


def _onednn_linear():
    """oneDNN's matmul (``X @ W.T``) if this torch has it and it works, else None.

    torch's float32 ``mm`` calls MKL, which runs AVX2 code on AMD processors;
    oneDNN dispatches on the instruction set, and its matmul is about twice
    as fast there on the flows' shapes (the same speed elsewhere). The op is
    the one torch's compiler uses for linear layers on CPU, not public API:
    it is tried once on a small product and left alone if it is missing or
    disagrees with ``mm``.
    """
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(5, 7, generator=generator)
        b = torch.randn(7, 3, generator=generator)
        if not torch.allclose(linear(a, b.T, None, "none", [], ""), a @ b, atol=1e-5):
            return None
    except Exception:  # noqa: BLE001 - any failure: fall back to torch.mm
        return None
    return linear


_LINEAR = _onednn_linear() if torch.backends.mkldnn.is_available() else None
# Whether the flows' matmuls may use oneDNN (tests switch it off to compare).
USE_ONEDNN = True


def _mm(a, b):
    """``a @ b`` for 2-D tensors, by oneDNN on float32 CPU tensors when it can."""
    if (
        USE_ONEDNN
        and _LINEAR is not None
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
    ):
        try:
            return _LINEAR(a, b.T, None, "none", [], "")
        except RuntimeError:  # a layout it has no kernel for (tiny or 1-wide)
            pass
    return torch.mm(a, b)


def _softplus_scale(raw):
    """The global scale ``0.1 softplus_{beta=0.5}(raw)`` (FrEIA's ``SOFTPLUS``)."""
    return 0.1 * F.softplus(raw, beta=0.5)


class _FlowLoss(torch.autograd.Function):
    """CFLOW-AD's loss on a batch of fibers, with a hand-written backward.

    Computes what :meth:`ConditionalFlow.log_prob` followed by ``-logsigmoid``
    and a mean computes, up to float rounding, but in a channels-major layout
    (activations of shape (channels, fibers)) where the channel permutation
    and the split are row operations, with the condition stored once per
    block next to ``x1`` so that the first subnet layer is one matmul of the
    stored weight, and without the autograd graph's per-op overhead: the
    backward is one pass over the blocks, with no gradient for the fibers or
    the condition.

    ``forward(ctx, x, cond, flow, *parameters)``: ``parameters`` are, block by
    block, the first layer's weight and bias, the last layer's weight and
    bias, the global scale and the global offset (see
    :meth:`ConditionalFlow._training_parameters`).
    """

    @staticmethod
    def forward(ctx, x, cond, flow, *parameters):
        n, n_features = x.shape
        k, n_cond = flow.split, cond.shape[1]
        c2 = n_features - k
        clamp = flow.clamp
        # Block input rows: [x1 (k), cond (P), x2 (C - k)].
        inp = x.new_empty(k + n_cond + c2, n)
        inp[:k].copy_(x[:, :k].T)
        inp[k : k + n_cond].copy_(cond.T)
        inp[k + n_cond :].copy_(x[:, k:].T)
        log_det, log_scale, saved = None, None, []
        n_blocks = len(flow.blocks)
        for b, block in enumerate(flow.blocks):
            w1, b1, w2, b2, raw_scale, offset = parameters[6 * b : 6 * b + 6]
            x1, x2 = inp[:k], inp[k + n_cond :]
            hidden = _mm(w1, inp[: k + n_cond]).add_(b1[:, None]).relu_()
            raw = torch.add(0.1 * b2[:, None], _mm(w2, hidden), alpha=0.1)
            s, t = raw[:c2], raw[c2:]
            s.tanh_().mul_(clamp)
            sums = s.sum(dim=0)
            log_det = sums if log_det is None else log_det.add_(sums)
            scale = _softplus_scale(raw_scale)
            scale_sum = torch.log(scale).sum()
            log_scale = scale_sum if log_scale is None else log_scale + scale_sum
            e = torch.exp(s)
            y2 = torch.addcmul(t, x2, e)
            v = x.new_empty(n_features, n)
            torch.addcmul(offset[:k, None], x1, scale[:k, None], out=v[:k])
            torch.addcmul(offset[k:, None], y2, scale[k:, None], out=v[k:])
            saved.append((inp, hidden, s, e, y2, scale))
            if b < n_blocks - 1:
                # z = v[permutation]; the last block's permutation is left out:
                # the loss only needs the sum of squares of z.
                nxt = x.new_empty(k + n_cond + c2, n)
                permutation = block.permutation
                torch.index_select(v, 0, permutation[:k], out=nxt[:k])
                nxt[k : k + n_cond].copy_(inp[k : k + n_cond])
                torch.index_select(v, 0, permutation[k:], out=nxt[k + n_cond :])
                inp = nxt
        log_density = -0.5 * v.square().sum(dim=0) + (log_det + log_scale)
        log_prob = log_density / n_features - _HALF_LOG_2PI
        ctx.flow = flow
        ctx.saved = saved
        ctx.parameters = parameters
        ctx.v, ctx.log_prob = v, log_prob
        return -F.logsigmoid(log_prob).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        flow, saved, parameters = ctx.flow, ctx.saved, ctx.parameters
        v, log_prob = ctx.v, ctx.log_prob
        n_features, n = v.shape
        k, clamp = flow.split, flow.clamp
        c2 = n_features - k
        n_cond = saved[0][0].shape[0] - n_features
        # d loss / d log_prob = -sigmoid(-log_prob) / n; per fiber, the
        # gradient of the log-determinant and of -|z|^2 / 2, over C.
        grad_log_det = torch.sigmoid(-log_prob).mul_(-grad_loss / (n * n_features))
        grad_log_det_sum = grad_log_det.sum()
        grad_v = v * -grad_log_det
        grads = [None] * len(parameters)
        n_blocks = len(flow.blocks)
        inverses = [torch.argsort(block.permutation) for block in flow.blocks]
        grad_input = None  # of the block after b: its rows [x1; x2]
        for b in reversed(range(n_blocks)):
            inp, hidden, s, e, y2, scale = saved[b]
            w1, b1, w2, b2, raw_scale, offset = parameters[6 * b : 6 * b + 6]
            if b < n_blocks - 1:
                # v[permutation[j]] feeds row j of the next block's input.
                grad_v = torch.index_select(grad_input, 0, inverses[b])
            x1, x2 = inp[:k], inp[k + n_cond :]
            grad_offset = grad_v.sum(dim=1)
            grad_scale = torch.cat(
                [(grad_v[:k] * x1).sum(dim=1), (grad_v[k:] * y2).sum(dim=1)]
            ).addcdiv_(grad_log_det_sum.expand(n_features), scale)
            grad_raw_scale = grad_scale.mul_(torch.sigmoid(0.5 * raw_scale)).mul_(0.1)
            grad_u = grad_v.mul_(scale[:, None])
            grad_y2 = grad_u[k:]
            grad_input = torch.empty_like(grad_u)
            grad_x2 = torch.mul(grad_y2, e, out=grad_input[k:])
            grad_s = torch.addcmul(grad_log_det[None, :], grad_x2, x2)
            # s = clamp tanh(r): ds/dr = clamp - s^2 / clamp; r = 0.1 (W2 h + b2).
            grad_raw = grad_u.new_empty(2 * c2, n)
            slope = s.square().mul_(-0.1 / clamp).add_(0.1 * clamp)
            torch.mul(slope, grad_s, out=grad_raw[:c2])
            torch.mul(grad_y2, 0.1, out=grad_raw[c2:])
            grad_w2 = _mm(grad_raw, hidden.T)
            grad_b2 = grad_raw.sum(dim=1)
            grad_hidden = torch.ops.aten.threshold_backward(
                _mm(w2.T, grad_raw), hidden, 0
            )
            grad_w1 = _mm(grad_hidden, inp[: k + n_cond].T)
            grad_b1 = grad_hidden.sum(dim=1)
            if b > 0:
                torch.add(grad_u[:k], _mm(w1[:, :k].T, grad_hidden), out=grad_input[:k])
            grads[6 * b : 6 * b + 6] = [
                grad_w1,
                grad_b1,
                grad_w2,
                grad_b2,
                grad_raw_scale,
                grad_offset,
            ]
        return (None, None, None, *grads)


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


class _ScoringPlan:
    """A frozen :class:`ConditionalFlow`'s weights, ready for scoring.

    Per block: the first layer's weight split into its ``x1`` columns and its
    condition columns (whose product with each position's condition, plus
    the bias, is cached per grid), the last layer's weight and bias times
    0.1, the global scale and offset as columns; and the sum over blocks of
    the log global scales.
    """

    def __init__(self, flow, key):
        self.key = key
        self.split = flow.split
        self.clamp = flow.clamp
        self.blocks = []
        self.log_scale = 0.0
        self._cond_bias = {}
        k = self.split
        with torch.no_grad():
            log_scale = None
            for block in flow.blocks:
                first, last = block.subnet[0], block.subnet[2]
                scale = _softplus_scale(block.global_scale)
                block_log_scale = torch.log(scale).sum()
                log_scale = (
                    block_log_scale
                    if log_scale is None
                    else log_scale + block_log_scale
                )
                self.blocks.append(
                    {
                        "w_x": first.weight[:, :k].contiguous(),
                        "w_cond": first.weight[:, k:].contiguous(),
                        "b_first": first.bias,
                        "w_last": (0.1 * last.weight).contiguous(),
                        "b_last": (0.1 * last.bias)[:, None],
                        "scale": scale[:, None].contiguous(),
                        "offset": block.global_offset[:, None].contiguous(),
                        "permutation": block.permutation,
                    }
                )
            self.log_scale = log_scale

    def cond_bias(self, conds):
        """Per block: first-layer bias plus the condition's share, (hidden, hw)."""
        key = (conds.data_ptr(), tuple(conds.shape))
        if key not in self._cond_bias:
            self._cond_bias[key] = (
                conds,  # keeps the pointer of the key alive
                [
                    torch.addmm(blk["b_first"][:, None], blk["w_cond"], conds.T)
                    for blk in self.blocks
                ],
            )
        return self._cond_bias[key][1]

    def log_prob(self, features, conds):
        """Per-dimension log p of each fiber of (B, C, h, w) features, (B, hw).

        One image at a time, channels-major: each product then has the same
        shapes whatever the batch, so an image's result does not depend on
        the others (matmul kernels may round differently for other shapes).
        """
        n_images, n_features, height, width = features.shape
        n_positions = height * width
        k, clamp, c2 = self.split, self.clamp, n_features - self.split
        biases = self.cond_bias(conds)
        x_buffer = features.new_empty(n_features, n_positions)
        y_buffer = torch.empty_like(x_buffer)
        out = features.new_empty(n_images, n_positions)
        source = features.reshape(n_images, n_features, n_positions)
        last = len(self.blocks) - 1
        for image in range(n_images):
            x, y = x_buffer, y_buffer
            x.copy_(source[image])
            log_det = None
            for b, blk in enumerate(self.blocks):
                hidden = _mm(blk["w_x"], x[:k]).add_(biases[b]).relu_()
                raw = _mm(blk["w_last"], hidden).add_(blk["b_last"])
                s, t = raw[:c2], raw[c2:]
                s.tanh_().mul_(clamp)
                sums = s.sum(dim=0)
                log_det = sums if log_det is None else log_det.add_(sums)
                s.exp_()
                x2 = x[k:]
                torch.addcmul(t, x2, s, out=x2)  # y2 = x2 exp(s) + t
                torch.addcmul(blk["offset"], x, blk["scale"], out=x)
                if b < last:
                    torch.index_select(x, 0, blk["permutation"], out=y)
                    x, y = y, x
            # The last permutation is left out: only |z|^2 is needed.
            log_density = x.square_().sum(dim=0).mul_(-0.5)
            log_density.add_(log_det.add_(self.log_scale))
            out[image] = log_density.div_(n_features).sub_(_HALF_LOG_2PI)
        return out


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
        self._plan = None  # scoring weights, rebuilt when a weight changes

    @property
    def split(self):
        """Channels ``x1`` that condition the others, ``C // 2``."""
        return self.n_features // 2

    @property
    def clamp(self):
        """Bound of each block's log-scale."""
        return self.blocks[0].clamp

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

    def _training_parameters(self):
        """The parameters in :class:`_FlowLoss`'s order, block by block."""
        out = []
        for block in self.blocks:
            first, last = block.subnet[0], block.subnet[2]
            out += [
                first.weight,
                first.bias,
                last.weight,
                last.bias,
                block.global_scale,
                block.global_offset,
            ]
        return out

    def loss(self, x, cond):
        """CFLOW-AD's training loss ``mean(-logsigmoid(log_prob(x, cond)))``.

        The same value as from :meth:`log_prob` (up to float rounding), with
        a hand-written backward (:class:`_FlowLoss`): gradients reach the
        flow's parameters, not ``x`` or ``cond``.

        Parameters
        ----------
        x : tensor of shape (N, C)
        cond : tensor of shape (N, P)

        Returns
        -------
        loss : scalar tensor
        """
        _check_inputs(x, cond, self.n_features, self.condition_dim)
        if x.requires_grad or cond.requires_grad:
            return -F.logsigmoid(self.log_prob(x, cond)).mean()
        return _FlowLoss.apply(x, cond, self, *self._training_parameters())

    def _scoring_plan(self):
        """The weights rearranged for :meth:`grid_log_prob`.

        Cached only for a frozen flow (no parameter requires grad), until a
        parameter or buffer is modified in place, moved or replaced: an
        optimizer can update trainable parameters without bumping their
        version counters (torch's fused Adam does), so a trainable flow gets
        a new plan at every call. Inference tensors (a flow built under
        ``torch.inference_mode``) have no version counter: such a frozen flow
        is taken as fixed once built, as the fitted detector's scoring flows
        are.
        """
        tensors = [*self._training_parameters()]
        if any(t.requires_grad for t in tensors):
            self._plan = None
            return _ScoringPlan(self, None)
        tensors += [block.permutation for block in self.blocks]
        key = tuple(
            (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)
            for t in tensors
        )
        plan = getattr(self, "_plan", None)
        if plan is None or plan.key != key:
            plan = self._plan = _ScoringPlan(self, key)
        return plan

    def grid_log_prob(self, features, conds):
        """:meth:`log_prob` of every fiber of a batch of feature maps.

        The scoring path, not differentiable, equal to :meth:`log_prob` up to
        float rounding: image by image, in a channels-major layout (the
        permutation and the split are then row operations), in place in
        buffers that stay in cache, with the condition's share of the first
        subnet layer computed once per position rather than once per fiber.
        An image's result does not depend on the others in its batch.

        Parameters
        ----------
        features : tensor of shape (B, C, h, w)
        conds : tensor of shape (h * w, P)
            The condition of each position, row ``i * w + j`` for (i, j).

        Returns
        -------
        log_prob : tensor of shape (B, h * w)
        """
        n_images, n_features, height, width = features.shape
        n_positions = height * width
        if n_features != self.n_features or conds.shape != (
            n_positions,
            self.condition_dim,
        ):
            raise ValueError(
                f"Expected features with {self.n_features} channels and conds of "
                f"shape ({n_positions}, {self.condition_dim}), got "
                f"{tuple(features.shape)} and {tuple(conds.shape)}."
            )
        with torch.no_grad():
            return self._scoring_plan().log_prob(features, conds)


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
        n_images, _, height, width = features.shape
        flow = self.flows[level]
        if torch.is_grad_enabled() and (
            features.requires_grad or any(p.requires_grad for p in flow.parameters())
        ):
            fibers, conds = self.to_fibers(features)
            log_prob = flow.log_prob(fibers, conds)
        else:
            conds = self.position_conditions(
                height, width, dtype=features.dtype, device=features.device
            )
            log_prob = flow.grid_log_prob(features, conds)
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
        return self.flows[level].loss(fibers, conds)
