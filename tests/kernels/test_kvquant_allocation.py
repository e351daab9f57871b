"""Per-layer bit allocation of KVQuant: exact budget, optimal, monotone, clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from kvpack.kernels.kvquant_calibration import allocate_bits

BITS = [2, 3, 4]


def _tables(layers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    falls = torch.tensor([1.0, 0.25, 0.06])
    keys = torch.rand(layers, 1, generator=g) ** 3 * falls * (1 + 0.3 * torch.rand(layers, 3,
                                                                                   generator=g))
    values = torch.rand(layers, 1, generator=g) ** 3 * falls
    return keys, values


@pytest.mark.parametrize("avg_bits", [2.0, 2.3, 2.5, 3.0, 3.3, 3.65, 4.0])
def test_allocation_respects_the_budget_and_is_optimal(avg_bits):
    keys, values = _tables(3, seed=int(avg_bits * 10))
    key_bits, value_bits = allocate_bits(keys, values, BITS, avg_bits)
    chosen = key_bits + value_bits
    budget = int(avg_bits * 6 + 1e-6)
    assert sum(chosen) <= budget and all(b in BITS for b in chosen)
    losses = [table[i, BITS.index(b)] for table, bits in ((keys, key_bits), (values, value_bits))
              for i, b in enumerate(bits)]
    best = min(
        sum(float(t[i, BITS.index(b)]) for (t, i), b in
            zip([(keys, 0), (keys, 1), (keys, 2), (values, 0), (values, 1), (values, 2)], combo,
                strict=True))
        for combo in itertools.product(BITS, repeat=6) if sum(combo) <= budget
    )
    assert float(sum(losses)) == pytest.approx(best, rel=1e-6)


def test_more_budget_never_costs_more_and_spends_where_sensitive():
    keys, values = _tables(30, seed=1)
    keys[7] *= 1000  # one very sensitive layer's keys
    previous = None
    for avg_bits in (2.0, 2.5, 3.0, 3.5, 4.0):
        key_bits, value_bits = allocate_bits(keys, values, BITS, avg_bits)
        assert sum(key_bits) + sum(value_bits) <= avg_bits * 60 + 1e-9
        loss = sum(float(keys[i, BITS.index(b)]) for i, b in enumerate(key_bits)) + \
            sum(float(values[i, BITS.index(b)]) for i, b in enumerate(value_bits))
        assert previous is None or loss <= previous
        previous = loss
        if avg_bits > 2.0:
            assert key_bits[7] == 4
    assert allocate_bits(keys, values, BITS, 2.0) == ([2] * 30, [2] * 30)
    assert allocate_bits(keys, values, BITS, 4.0) == ([4] * 30, [4] * 30)


def test_measured_noise_cannot_buy_fewer_bits_a_lower_loss():
    keys = torch.tensor([[1.0, 0.5, 0.6]])  # 4 bits "measured" worse than 3: treated as equal
    values = torch.tensor([[1.0, 0.1, 0.01]])
    assert allocate_bits(keys, values, BITS, 3.5) == ([3], [4])


def test_allocation_errors():
    keys, values = _tables(2, seed=0)
    with pytest.raises(ValueError, match="avg_bits must be in"):
        allocate_bits(keys, values, BITS, 1.5)
    with pytest.raises(ValueError, match="sensitivities must both be"):
        allocate_bits(keys, values[:, :2], BITS, 3.0)
    with pytest.raises(ValueError, match="bits must be one of"):
        allocate_bits(keys, values, [2, 3, 5], 3.0)
