"""The codes exchange's pure pieces: rotation, step sizes, budget -> bits, quantise, pack."""

from __future__ import annotations

import math

import pytest
import torch

from engine import codec
from engine.codec import MAX_BITS, Bits, bits_for_budget, layer_budget
from engine.errors import BadRequest


def hidden_like(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few outlier dimensions, as real hidden states have (|x| ~ 10 vs RMS ~ 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen)
    x[:, 3] *= 15.0
    x[:, d // 2] += 10.0
    return x


def rel_error(x: torch.Tensor, b: int) -> float:
    """Mean per-row relative error of b-bit codes of ``x``."""
    scales = codec.row_scales(x)
    recon = codec.dequantise(codec.quantise(x, scales, b), scales, b)
    return float(((recon - x).norm(dim=-1) / x.norm(dim=-1)).mean())


def test_rotation_is_orthogonal_and_the_same_every_time() -> None:
    r = codec.rotation(96)
    assert r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(96), atol=1e-5)
    codec._rotation_cpu.cache_clear()
    assert torch.equal(codec.rotation(96), r)  # rebuilt from the seed, not just cached
    assert not torch.allclose(codec.rotation(96, seed=1), r)


@pytest.mark.parametrize("b", range(1, MAX_BITS + 1))
def test_tabulated_step_is_the_mse_optimum_for_gaussians(b: int) -> None:
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(2000, 256, generator=gen)
    ones = torch.ones(2000, dtype=torch.float16)

    def mse(scale: float) -> float:
        s = ones * scale
        return float((codec.dequantise(codec.quantise(x, s, b), s, b) - x).pow(2).mean())

    assert mse(1.0) < mse(0.95)
    assert mse(1.0) < mse(1.05)
    assert math.sqrt(mse(1.0)) == pytest.approx(codec.GAUSSIAN_REL_ERROR[b], rel=0.03)


@pytest.mark.parametrize("b", range(1, MAX_BITS + 1))
def test_rotated_rows_with_outliers_reconstruct_to_the_gaussian_error(b: int) -> None:
    x = hidden_like(200, 384)
    rotated = x @ codec.rotation(384)
    err = rel_error(rotated, b)
    assert err <= 1.05 * codec.GAUSSIAN_REL_ERROR[b]
    if b >= 2:  # without rotation the outliers stretch every row's scale
        assert rel_error(x, b) > 1.5 * err


def test_zero_rows_and_huge_rows_stay_finite() -> None:
    x = torch.zeros(3, 64)
    x[1] = 1e6
    scales = codec.row_scales(x)
    recon = codec.dequantise(codec.quantise(x, scales, 4), scales, 4)
    assert torch.isfinite(recon).all()
    assert torch.equal(recon[0], torch.zeros(64))


@pytest.mark.parametrize("b", range(1, MAX_BITS + 1))
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(b: int, count: int) -> None:
    gen = torch.Generator().manual_seed(count * 10 + b)
    codes = torch.randint(0, 2**b, (count,), generator=gen, dtype=torch.uint8)
    packed = codec.pack(codes, b)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * b / 8)
    assert torch.equal(codec.unpack(packed, b, count), codes)


def _bit_serial_pack(codes: list[int], b: int) -> list[int]:
    """The wire format spelled out: code n's bits at n*b.., LSB first; 8 bits a byte, LSB first."""
    stream = [(code >> j) & 1 for code in codes for j in range(b)]
    stream += [0] * (-len(stream) % 8)
    return [sum(bit << j for j, bit in enumerate(stream[m : m + 8])) for m in range(0, len(stream), 8)]


@pytest.mark.parametrize("little_endian", [True, False], ids=["words", "big-endian-path"])
@pytest.mark.parametrize("b", range(1, MAX_BITS + 1))
def test_pack_writes_the_bit_serial_wire_format(b: int, little_endian: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths (whole words on little-endian hosts, the plain one big-endian hosts take)
    write the same bytes and read them back."""
    monkeypatch.setattr(codec, "_LITTLE", little_endian)
    gen = torch.Generator().manual_seed(b)
    codes = torch.randint(0, 2**b, (77,), generator=gen, dtype=torch.uint8)
    packed = codec.pack(codes, b)
    assert packed.tolist() == _bit_serial_pack(codes.tolist(), b)
    assert torch.equal(codec.unpack(packed, b, 77), codes)


def test_pack_is_lsb_first() -> None:
    assert codec.pack(torch.tensor([1, 0, 1], dtype=torch.uint8), 1).tolist() == [0b101]
    assert codec.pack(torch.tensor([3, 1], dtype=torch.uint8), 2).tolist() == [0b0111]


@pytest.mark.parametrize(
    ("rows", "d", "budget"),
    [(100, 384, 23040), (64, 96, 4000), (37, 64, 37 * 66), (10, 128, 10**6), (5, 384, 5 * 384 // 8 * 3 + 10)],
)
def test_budget_picks_the_widest_codes_that_fit(rows: int, d: int, budget: int) -> None:
    bits = bits_for_budget(rows, d, budget)
    assert bits.nbytes <= budget
    if bits.b < MAX_BITS:
        assert Bits(rows, d, bits.b + 1, 0).nbytes > budget  # b is the largest that fits
        if bits.k < rows:
            assert Bits(rows, d, bits.b, bits.k + 1).nbytes > budget  # and so is k
    else:
        assert bits.k == 0


def test_budget_worked_example() -> None:
    """100 rows of 384 at 1/8 of fp32 with layer 0's share spread over 5 layers: 4.8 bits."""
    budget = layer_budget(100 * 384 * 4, 8, 6)
    assert budget == 23040
    bits = bits_for_budget(100, 384, budget)
    assert (bits.b, bits.k) == (4, 75)
    assert bits.nbytes == 200 + 75 * 384 * 5 // 8 + 25 * 384 * 4 // 8


def test_layer_budget_keeps_the_total() -> None:
    full = 3 * 37 * 64 * 4
    for layers in (2, 4, 6, 12):
        for cr in (2.0, 8.0, 9.9, 32.0):
            assert (layers - 1) * layer_budget(full, cr, layers) <= full * layers / cr
    assert layer_budget(full, 8, 1) == 0  # nothing is sent: layer 0 is rebuilt


def test_a_budget_below_one_bit_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="1 bit"):
        bits_for_budget(10, 384, 10 * (2 + 48) - 1)


@pytest.mark.parametrize("budget", [23040, 9000, 40000])
def test_encode_decode(budget: int) -> None:
    rows = hidden_like(100, 384) @ codec.rotation(384)
    bits = bits_for_budget(100, 384, budget)
    payload, recon = codec.encode(rows, bits)
    assert payload.dtype == torch.uint8
    assert payload.numel() == bits.nbytes
    assert torch.equal(codec.decode(payload, bits), recon)
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8), payload])[1:]  # a piece at an odd offset
    assert torch.equal(codec.decode(odd, bits), recon)
    assert rel_error(rows, bits.b) >= float(((recon - rows).norm(dim=-1) / rows.norm(dim=-1)).mean()) * 0.95
