"""FeatureCache: batches come back in order, equal and with the same layout,
whether they stayed in memory or were spilled to files."""

import os

import pytest
import sklearn
import torch

from skpadim._cache import FeatureCache, cache_budget, working_memory_bytes


def batches():
    g = torch.Generator().manual_seed(0)
    positions_first = torch.randn(5, 6, 3, 4, generator=g).permute(2, 3, 0, 1)
    taps = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 2, 2, 2, generator=g)]
    channels_last = torch.randn(2, 3, 4, 5, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    sliced = torch.randn(4, 7, generator=g)[:, 2:5]  # not a permuted view
    return [positions_first, taps, [taps, [channels_last]], channels_last, sliced]


def assert_same(got, expected):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
        assert got.dtype == expected.dtype
        if (
            expected.is_contiguous()
            or expected.permute(
                *sorted(range(expected.ndim), key=lambda d: -expected.stride(d))
            ).is_contiguous()
        ):
            assert got.stride() == expected.stride()
        return
    assert isinstance(got, list) and len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_same(g, e)


@pytest.mark.parametrize("budget", [0, 200, 10**9])
def test_round_trip_in_order_with_layouts(budget):
    expected = batches()
    with FeatureCache(budget=budget) as cache:
        for features in expected:
            cache.append(features)
        assert len(cache) == len(expected)
        for _ in range(2):  # read twice: spilled files are not consumed
            for got, want in zip(cache, expected, strict=True):
                assert_same(got, want)
        if budget == 0:
            assert cache.spilled_bytes > 0
        if budget == 10**9:
            assert cache.spilled_bytes == 0


def test_close_deletes_the_spill_files():
    cache = FeatureCache(budget=0)
    cache.append(torch.ones(3, 3))
    directory = cache._directory.name
    assert os.listdir(directory)
    cache.close()
    assert not os.path.exists(directory)
    assert len(cache) == 0


def test_budget_follows_working_memory():
    with sklearn.config_context(working_memory=160):
        assert working_memory_bytes() == 160 * 2**20
        assert cache_budget() == 10 * 2**20
        assert FeatureCache().budget == 10 * 2**20
