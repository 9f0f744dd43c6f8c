"""Torch modules that re-implement a fitted detector for ONNX export.

:func:`skpadim.export.to_onnx` does not trace the detectors themselves: their
scoring code is written for speed and bounded memory (blocked kNN, stable
tie-breaking sorts, float64 accumulations, caches on the device), not for a
static graph. Instead, this module builds a small :class:`torch.nn.Module`
from the fitted arrays, made only of operators with a plain ONNX
counterpart, and that module is what ``torch.onnx.export`` traces:

``uint8 images -> /255, normalise -> fused backbone -> reduce taps ->
local averaging -> upsampling -> head -> maps = A_y @ patch @ A_x^T -> score``

Each head mirrors the detector's ``score_batch`` on the same arrays, so the
tests can compare ONNX Runtime with the Python detector as two independent
implementations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Candidates proposed beyond the neighbours asked for, before the exact
# re-ranking: the same margin as skpadim._knn, for the same reason (the
# matrix-product distances get close calls wrong; the exact ones do not).
KNN_MARGIN = 8


def _buffer(module, name, array, dtype=torch.float32):
    """Register ``array`` as a buffer: it becomes one initializer of the graph."""
    module.register_buffer(name, torch.as_tensor(np.asarray(array), dtype=dtype))


def squared_norms(rows, block=2**16):
    """Row norms squared, summed in float64 a block of rows at a time (a
    float64 copy of a multi-GiB bank at once would double its memory)."""
    flat = rows.reshape(-1, rows.shape[-1])
    out = np.empty(len(flat), dtype=np.float64)
    for start in range(0, len(flat), block):
        part = flat[start : start + block].astype(np.float64)
        out[start : start + block] = np.einsum("ij,ij->i", part, part)
    return out.reshape(rows.shape[:-1])


def knn(queries, bank, bank_half_sq, n_neighbors, n_candidates):
    """Exact ``n_neighbors`` nearest bank rows, in a static graph.

    The ``|q|^2 + |b|^2 - 2 q.b`` form (a matrix product; ``cdist`` has no
    ONNX export) proposes ``n_candidates`` rows with TopK; their distances are
    then recomputed as ``||q - b||`` (Gather) and the nearest kept, as
    :func:`skpadim._knn.nearest_neighbors` does, so the distances are exact to
    float32 rounding.

    Parameters
    ----------
    queries : tensor of shape (Q, d) or (B, Q, d)
        Query rows, centred like the bank.
    bank : tensor of shape (M, d) or (B, M, d)
        Bank rows (a shared bank, or one per batch item), centred.
    bank_half_sq : tensor of shape (M,) or (B, M)
        Halves of the squared norms of the bank rows.
    n_neighbors, n_candidates : int
        Neighbours returned; candidates re-ranked (``n_neighbors`` <=
        ``n_candidates`` <= M).

    Returns
    -------
    distances : tensor of shape (..., Q, n_neighbors)
        Euclidean distances, ascending.
    indices : tensor of shape (..., Q, n_neighbors), int64
        Rows of the bank.
    """
    query_sq = queries.square().sum(dim=-1, keepdim=True)
    if bank.dim() == 2:
        # One Gemm (transB, with the half norms as its bias): the constant
        # bank is never transposed at run time, which ONNX Runtime would
        # not fold away above 1 GiB.
        products = F.linear(queries, bank, -bank_half_sq)
    else:
        products = queries @ bank.transpose(-1, -2) - bank_half_sq.unsqueeze(-2)
    approx = query_sq - 2 * products
    _, candidates = torch.topk(approx, n_candidates, dim=-1, largest=False)
    if bank.dim() == 2:
        rows = bank[candidates]  # (Q, c, d)
    else:
        # One bank per item: GatherElements along the bank axis, never a
        # broadcast copy of the bank per query.
        flat = candidates.flatten(1).unsqueeze(-1).expand(-1, -1, bank.shape[-1])
        rows = torch.gather(bank, 1, flat).view(candidates.shape + bank.shape[-1:])
    exact = (rows - queries.unsqueeze(-2)).square().sum(dim=-1).sqrt()
    distances, order = torch.topk(exact, n_neighbors, dim=-1, largest=False)
    return distances, torch.gather(candidates, -1, order)


class StaticPadConv(nn.Module):
    """A convolution after a constant zero padding.

    Replaces EfficientNet-Lite0's TF "SAME" convolutions, whose padding is
    computed from the input size in ``forward``: traced, that arithmetic
    becomes graph ops, and the exporter writes the floor division of a
    negative size as ONNX's truncating Div (one pixel of padding too few for
    odd sizes). The input size of the graph is fixed, so the padding is too.
    """

    def __init__(self, conv, pad):
        super().__init__()
        self.conv = conv
        self.pad = tuple(int(p) for p in pad)

    def forward(self, x):
        conv = self.conv
        return F.conv2d(
            F.pad(x, self.pad),
            conv.weight,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )


def static_padding(network, frame_shape):
    """Replace, in place, every size-dependent "SAME" convolution of
    ``network`` by a :class:`StaticPadConv` with the padding it computes for
    a ``frame_shape`` input (recorded by running the network once)."""
    from .backbones._efficientnet_lite import _SameConv2d

    pads, hooks = {}, []

    def record(module, args):
        x = args[0]
        pad = []
        # The same formula as _SameConv2d.forward, on plain ints.
        for size, k, s in zip(
            x.shape[:-3:-1], module.kernel_size[::-1], module.stride[::-1]
        ):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pad += [total // 2, total - total // 2]
        pads[module] = pad

    for module in network.modules():
        if type(module) is _SameConv2d and module.stride[0] != 1:
            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        network(torch.zeros(1, 3, *frame_shape))
    for hook in hooks:
        hook.remove()
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if child in pads:
                setattr(parent, name, StaticPadConv(child, pads[child]))
    return network


class Preprocess(nn.Module):
    """uint8 (N, H, W, 3) RGB -> normalised float (N, 3, H, W).

    The same float32 operations as :class:`skpadim._images.Preprocessing` on
    frames that need no resize: divide by 255, subtract the mean, divide by
    the standard deviation.
    """

    def __init__(self, mean, std):
        super().__init__()
        _buffer(self, "mean", np.reshape(mean, (1, 3, 1, 1)))
        _buffer(self, "std", np.reshape(std, (1, 3, 1, 1)))

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std


class Features(nn.Module):
    """Backbone taps -> reduced, locally averaged taps (-> one concatenation).

    Mirrors ``skpadim._features._Runtime.reduce_taps`` and ``concat`` (onto
    the grid of the first, finest tap).

    Parameters
    ----------
    network : nn.Module
        The fused, eval-mode feature network; returns the list of taps.
    reductions : list of (str, ndarray or None)
        Per tap: ("all", None) keeps it, ("index", indices) keeps those
        channels, ("pca", block) projects it with its block of the PCA
        components, ("skip", None) drops it (no kept channel).
    pca_shift : ndarray of shape (n_features,) or None
        ``components @ pca_mean``, subtracted after summing the PCA parts.
    patch_size : int
        Local average pooling (1: none).
    upsampling : {"nearest", "bilinear"}
        How coarser taps reach the finest grid.
    kind : {"concat", "taps"}
        What the head consumes.
    """

    def __init__(self, network, reductions, pca_shift, patch_size, upsampling, kind):
        super().__init__()
        self.network = network
        self.modes = [mode for mode, _ in reductions]
        for i, (mode, array) in enumerate(reductions):
            if mode == "index":
                _buffer(self, f"select_{i}", array, torch.int64)
            elif mode == "pca":
                _buffer(self, f"select_{i}", array)
        self.pca = pca_shift is not None
        if self.pca:
            _buffer(self, "pca_shift", np.reshape(pca_shift, (1, -1, 1, 1)))
        self.patch_size = int(patch_size)
        self.upsampling = upsampling
        self.kind = kind

    def forward(self, x):
        taps = self.network(x)
        parts = []
        for i, (tap, mode) in enumerate(zip(taps, self.modes)):
            if mode == "skip":
                continue
            if mode == "index":
                tap = tap.index_select(1, getattr(self, f"select_{i}"))
            elif mode == "pca":
                tap = torch.einsum("kc,bchw->bkhw", getattr(self, f"select_{i}"), tap)
            if self.patch_size > 1:
                tap = F.avg_pool2d(
                    tap, self.patch_size, stride=1, padding=self.patch_size // 2
                )
            parts.append(tap)
        if self.kind == "taps":
            return parts
        # The finest tap's grid, even when none of its channels is kept.
        size = taps[0].shape[-2:]
        parts = [self._upsample(part, size) for part in parts]
        if self.pca:
            return sum(parts) - self.pca_shift
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _upsample(self, tap, size):
        if tap.shape[-2:] == size:
            return tap
        if self.upsampling == "nearest":
            return F.interpolate(tap, size=size, mode="nearest")
        return F.interpolate(tap, size=size, mode="bilinear", align_corners=False)


class PadimHead(nn.Module):
    """Per-position Mahalanobis distances ``||W (x - mu)||`` of PaDiM.

    The whitening factors are stored packed (their lower triangles, as the
    joblib file stores them: half the bytes of the full matrices) and
    unpacked inside the graph by one Gather with a constant (d, d) index,
    straight into the transposed layout the batched MatMul needs. ONNX
    Runtime folds that Gather into a constant when it loads the model, so
    scoring pays nothing for the smaller file.
    """

    def __init__(self, location, packed, grid_shape):
        super().__init__()
        n_features = location.shape[1]
        _buffer(self, "location", location[:, None, :])  # (P, 1, d)
        _buffer(self, "packed", packed)  # (P, d(d+1)/2)
        # index[j, i] = where W[i, j] sits in the packed row (i >= j), or the
        # zero appended after it: Gather gives W^T directly.
        rows, cols = np.tril_indices(n_features)
        index = np.full((n_features, n_features), len(rows), dtype=np.int64)
        index[cols, rows] = np.arange(len(rows))
        _buffer(self, "index", index, torch.int64)
        self.grid_shape = tuple(int(s) for s in grid_shape)

    def forward(self, features):
        # (N, d, h, w) -> (P, N, d), the layout of the fitted statistics.
        x = features.flatten(2).permute(2, 0, 1)
        whitening_t = F.pad(self.packed, (0, 1))[:, self.index]  # (P, d, d)
        distances = torch.matmul(x - self.location, whitening_t).norm(dim=2)
        return distances.transpose(0, 1).reshape((-1, *self.grid_shape)), None


class PatchCoreHead(nn.Module):
    """Nearest-bank-entry patch distances and PatchCore's re-weighted score.

    Parameters
    ----------
    bank : ndarray of shape (M, d)
        The coreset.
    support : ndarray of shape (M, b) or None
        For each bank entry, its ``b`` nearest bank entries (itself first):
        the re-weighting neighbourhood of eq. 7, which depends on the bank
        alone and so is computed once, at export, with the detector's own
        kNN. None: ``n_neighbors == 1``, no re-weighting.
    grid_shape : (int, int)
        (h, w) of the patch grid.
    """

    def __init__(self, bank, support, grid_shape):
        super().__init__()
        bank = np.asarray(bank, dtype=np.float32)
        centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
        # Centred on their mean, the norms (hence the rounding error of the
        # matrix-product distances) shrink; the distances do not change.
        centred = bank - centre
        _buffer(self, "centre", centre)
        _buffer(self, "bank", centred)
        _buffer(self, "bank_half_sq", squared_norms(centred) / 2)
        self.reweight = support is not None
        if self.reweight:
            _buffer(self, "support", support, torch.int64)
        self.n_candidates = min(len(bank), 1 + KNN_MARGIN)
        self.grid_shape = tuple(int(s) for s in grid_shape)

    def forward(self, features):
        n_features = features.shape[1]
        n_patches = self.grid_shape[0] * self.grid_shape[1]
        queries = features.permute(0, 2, 3, 1).reshape(-1, n_features) - self.centre
        distances, nearest = knn(
            queries, self.bank, self.bank_half_sq, 1, self.n_candidates
        )
        patch_scores = distances.view(-1, n_patches)
        best_score, best = patch_scores.max(dim=1)
        if not self.reweight:
            return patch_scores.view((-1, *self.grid_shape)), best_score
        # s* = the largest patch score; m* = its nearest entry; the weight is
        # 1 - softmax of the test patch's distances to m*'s neighbourhood.
        best = best.unsqueeze(1)  # (N, 1)
        anchor = torch.gather(nearest.view(-1, n_patches), 1, best).squeeze(1)
        patches = queries.view(-1, n_patches, n_features)
        test_patch = torch.gather(
            patches, 1, best.unsqueeze(2).expand(-1, -1, n_features)
        )  # (N, 1, d)
        neighbourhood = self.bank[self.support[anchor]]  # (N, b, d)
        distances = (neighbourhood - test_patch).square().sum(dim=2).sqrt()
        weight = 1 - torch.softmax(distances, dim=1)[:, 0]
        return patch_scores.view((-1, *self.grid_shape)), weight * best_score


class SpadeHead(nn.Module):
    """SPADE's two stages: kNN over pooled images, then pixel kNN among the
    chosen images' pyramids, averaged over levels on the finest grid.

    The gallery (every training image's feature pyramid) is a constant of
    the graph, stored positions-first, (n_images, h_l * w_l, C_l) per level.
    """

    def __init__(self, pooled, levels, n_neighbors, n_pixel_neighbors):
        super().__init__()
        pooled = np.asarray(pooled, dtype=np.float32)
        self.n_levels = len(levels)
        self.n_neighbors = min(int(n_neighbors), len(pooled))
        self.n_image_candidates = min(len(pooled), self.n_neighbors + KNN_MARGIN)
        self._centred("pooled", pooled)
        self.level_shapes = []
        for i, level in enumerate(levels):
            n, c, h, w = level.shape
            self._centred(
                f"level_{i}",
                np.ascontiguousarray(level.reshape(n, c, h * w).swapaxes(1, 2)),
            )
            self.level_shapes.append((c, h, w))
        self.n_pixel_neighbors = int(n_pixel_neighbors)

    def _centred(self, name, rows):
        centre = rows.reshape(-1, rows.shape[-1]).mean(axis=0, dtype=np.float64)
        centred = rows - centre.astype(np.float32)
        _buffer(self, name, centred)
        _buffer(self, f"{name}_centre", centre)
        _buffer(self, f"{name}_half_sq", squared_norms(centred) / 2)

    def forward(self, taps):
        queries = taps[-1].mean(dim=(2, 3)) - self.pooled_centre
        distances, nearest = knn(
            queries,
            self.pooled,
            self.pooled_half_sq,
            self.n_neighbors,
            self.n_image_candidates,
        )
        image_scores = distances.mean(dim=1)
        size = taps[0].shape[-2:]
        maps = []
        for i, tap in enumerate(taps):
            c, h, w = self.level_shapes[i]
            gallery = getattr(self, f"level_{i}")[nearest]  # (N, K, hw, C)
            gallery = gallery.flatten(1, 2)  # (N, K hw, C)
            half_sq = getattr(self, f"level_{i}_half_sq")[nearest].flatten(1)
            n_gallery = self.n_neighbors * h * w
            kappa = min(self.n_pixel_neighbors, n_gallery)
            pixels = tap.flatten(2).transpose(1, 2) - getattr(self, f"level_{i}_centre")
            level_distances, _ = knn(
                pixels,
                gallery,
                half_sq,
                kappa,
                min(n_gallery, kappa + KNN_MARGIN),
            )
            level_map = level_distances.mean(dim=2).view(-1, 1, h, w)
            if (h, w) != tuple(size):
                level_map = F.interpolate(
                    level_map, size=size, mode="bilinear", align_corners=False
                )
            maps.append(level_map[:, 0])
        return torch.stack(maps).mean(dim=0), image_scores


class GaussianADHead(nn.Module):
    """Sum over levels of the Mahalanobis distances of pooled features.

    Each precision matrix is stored as a factor F with ``F F^T = precision``
    (from its eigendecomposition, in float64), so a distance is the norm
    ``||F^T (x - mu)||``: no float32 cancellation in a quadratic form,
    where the detector itself computes in float64.
    """

    def __init__(self, locations, precisions):
        super().__init__()
        self.n_levels = len(locations)
        for i, (location, precision) in enumerate(zip(locations, precisions)):
            values, vectors = np.linalg.eigh(np.asarray(precision, dtype=np.float64))
            factor = vectors * np.sqrt(np.clip(values, 0.0, None))
            _buffer(self, f"location_{i}", location)
            _buffer(self, f"factor_{i}", factor)

    def forward(self, taps):
        total = 0.0
        for i, tap in enumerate(taps):
            centred = tap.mean(dim=(2, 3)) - getattr(self, f"location_{i}")
            total = total + (centred @ getattr(self, f"factor_{i}")).norm(dim=1)
        return None, total


class CflowHead(nn.Module):
    """CFLOW-AD's patch scores: ``n_levels - sum_l exp(log p_l - c_l)``.

    The flows are rebuilt from the fitted head's state; the positional
    encodings of each level's grid are constants of the graph.
    """

    def __init__(self, head, level_shapes):
        super().__init__()
        pyramid = head.new_pyramid("cpu").eval().requires_grad_(False)
        self.flows = pyramid.flows
        self.log_prob_max = [float(c) for c in head.log_prob_max_]
        for i, (height, width) in enumerate(level_shapes):
            conds = pyramid.position_conditions(
                height, width, dtype=torch.float32, device="cpu"
            )
            _buffer(self, f"conds_{i}", conds)

    def forward(self, taps):
        size = taps[0].shape[-2:]
        total = None
        for level, tap in enumerate(taps):
            n_channels, height, width = tap.shape[1:]
            fibers = tap.permute(0, 2, 3, 1).reshape(-1, n_channels)
            conds = getattr(self, f"conds_{level}").repeat(tap.shape[0], 1)
            log_prob = self.flows[level].log_prob(fibers, conds)
            log_prob = log_prob.reshape(-1, height, width)
            likelihood = torch.exp(log_prob - self.log_prob_max[level])
            if likelihood.shape[-2:] != size:
                likelihood = F.interpolate(
                    likelihood[:, None], size=size, mode="bilinear", align_corners=False
                )[:, 0]
            total = likelihood if total is None else total + likelihood
        return len(taps) - total, None


class Pipeline(nn.Module):
    """The whole detector: uint8 frames in, (scores[, maps]) out.

    Parameters
    ----------
    preprocess, features, head : nn.Module
    rows, cols : ndarray of shape (H, h) and (W, w) or None
        The detector's axis operators (upsampling then Gaussian smoothing, see
        ``skpadim._maps.distances_to_maps``): maps = rows @ patch @ cols^T.
        None for a detector without maps.
    """

    def __init__(self, preprocess, features, head, rows=None, cols=None):
        super().__init__()
        self.preprocess = preprocess
        self.features = features
        self.head = head
        self.with_maps = rows is not None
        if self.with_maps:
            _buffer(self, "rows", rows)
            _buffer(self, "cols_t", np.ascontiguousarray(np.asarray(cols).T))

    def forward(self, images):
        patch, image = self.head(self.features(self.preprocess(images)))
        if not self.with_maps:
            return image
        maps = self.rows @ patch @ self.cols_t
        if image is None:
            image = maps.flatten(1).amax(dim=1)
        return image, maps
