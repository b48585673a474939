"""Low-bit codes of hidden-state rows: the pure pieces of the ``codes`` exchange method.

What a rank sends under ``method="codes"`` (research/codec.md): every row, rotated by a
fixed random orthogonal matrix, as b-bit mid-rise uniform codes with one fp16 scale per
row (row RMS x the Gaussian-optimal step for b bits), bit-packed into bytes. b and the
number k of rows that get one bit more follow from the row count and the byte budget
alone, so every rank computes them and nothing about them travels.

Payload of one sender for one layer (uint8): ``[R fp16 scales][k rows x (b+1) bits][R-k
rows x b bits]``, each part padded to whole bytes; rows in the order the caller gives.

Everything here is a pure function of its arguments (the rotation is cached because it
is a constant of ``(d, seed)``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from engine.errors import BadRequest

#: Seed of the shared rotation: part of the wire format (every rank must build the same R).
ROTATION_SEED = 0x5EED
#: Widest and narrowest codes.
MAX_BITS = 8
MIN_BITS = 1
#: Bytes of the per-row scale (fp16).
SCALE_BYTES = 2
#: Step, in units of the row RMS, of the MSE-optimal b-bit mid-rise uniform quantiser of
#: a unit Gaussian (2^b levels at ±(j + ½)·step, outer cells open; Max 1960, recomputed).
GAUSSIAN_STEP = {
    1: 1.595769,
    2: 0.995687,
    3: 0.586019,
    4: 0.335201,
    5: 0.188139,
    6: 0.104063,
    7: 0.056868,
    8: 0.030762,
}
#: Relative RMS error of that quantiser on Gaussian values (what a rotated row sees).
GAUSSIAN_REL_ERROR = {1: 0.6028, 2: 0.3447, 3: 0.1935, 4: 0.1074, 5: 0.0591, 6: 0.0322, 7: 0.0174, 8: 0.0094}
#: Largest finite fp16: row scales are clamped to it.
FP16_MAX = 65504.0


# -- the rotation -------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _rotation_cpu(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed, unique
    return q.to(torch.float32)


def rotation(d: int, seed: int = ROTATION_SEED, device: torch.device | None = None) -> torch.Tensor:
    """The shared random orthogonal (d, d) fp32 matrix R; rows rotate as ``y = x @ R``.

    Built on the CPU in float64 from a seeded generator, so every rank gets the same R
    (to float precision across BLAS builds, which is all the receivers need).
    """
    r = _rotation_cpu(d, seed)
    return r if device is None else r.to(device)


# -- how many bits --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bits:
    """Code widths of one payload: ``k`` rows of ``b + 1`` bits, then ``rows - k`` of ``b``."""

    rows: int
    d: int
    b: int
    k: int

    def __post_init__(self) -> None:
        assert MIN_BITS <= self.b <= MAX_BITS
        assert 0 <= self.k <= self.rows
        assert self.k == 0 or self.b < MAX_BITS

    @property
    def wide_bytes(self) -> int:
        """Bytes of the packed (b + 1)-bit rows."""
        return math.ceil(self.k * self.d * (self.b + 1) / 8)

    @property
    def narrow_bytes(self) -> int:
        """Bytes of the packed b-bit rows."""
        return math.ceil((self.rows - self.k) * self.d * self.b / 8)

    @property
    def nbytes(self) -> int:
        """Size of the whole payload: scales plus both packed groups."""
        return SCALE_BYTES * self.rows + self.wide_bytes + self.narrow_bytes


def bits_for_budget(rows: int, d: int, budget_bytes: int) -> Bits:
    """The widest codes for ``rows`` rows of ``d`` values within ``budget_bytes``.

    b is the largest value in 8..1 for which every row fits; leftover bytes give one
    more bit to as many leading rows as fit (none at 8 bits). Raises ``BadRequest``
    when even 1-bit codes do not fit.
    """
    for b in range(MAX_BITS, MIN_BITS - 1, -1):
        if Bits(rows, d, b, 0).nbytes <= budget_bytes:
            break
    else:
        need = Bits(rows, d, MIN_BITS, 0).nbytes
        raise BadRequest(f"a byte budget of {budget_bytes} cannot carry {rows} rows at 1 bit (needs {need})")
    if b == MAX_BITS or rows == 0:
        return Bits(rows, d, b, 0)
    spare_bits = 8 * (budget_bytes - Bits(rows, d, b, 0).nbytes)
    k = min(rows, spare_bits // d)
    while k > 0 and Bits(rows, d, b, k).nbytes > budget_bytes:  # byte rounding of two groups
        k -= 1
    return Bits(rows, d, b, k)


def layer_budget(full_bytes: int, cr: float, n_layers: int) -> int:
    """Byte budget of each coded layer (1..L-1) for a sender whose full exchange sends
    ``full_bytes`` per layer: 1/CR of the full bytes of all L layers, spread over the
    L - 1 layers that are sent (layer 0 is rebuilt from the inputs)."""
    coded = n_layers - 1
    if coded <= 0:
        return 0
    return math.floor(full_bytes * n_layers / (cr * coded))


# -- quantise -------------------------------------------------------------------------------
def row_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row RMS of ``x`` (R, D) as fp16 (R,): the scale that travels."""
    rms = torch.linalg.vector_norm(x.float(), dim=-1).mul_(x.shape[-1] ** -0.5)
    return rms.clamp_(max=FP16_MAX).to(torch.float16)


def quantise(x: torch.Tensor, scales: torch.Tensor, b: int) -> torch.Tensor:
    """b-bit mid-rise codes of ``x`` (R, D) with per-row ``scales`` (R,) -> uint8 (R, D)."""
    step = scales.float().unsqueeze(-1) * GAUSSIAN_STEP[b]  # (R, 1)
    # 1 / step, and 0 for an all-zero row (its codes are then the middle code, 0 decoded as ±step/2)
    inverse = torch.where(step > 0, 1.0 / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    # floor(x / step) + 2^(b-1), clamped: once clamped to >= 0, truncation is the floor. Through
    # int32, as float -> uint8 is a slow conversion in torch (3x int32's, then int32 -> uint8).
    codes = torch.mul(x.float(), inverse).add_(2 ** (b - 1)).clamp_(0, 2**b - 1)
    return codes.to(torch.int32).to(torch.uint8)


def dequantise(codes: torch.Tensor, scales: torch.Tensor, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantise` (to the cell centres): uint8 (R, D) -> fp32 (R, D), written
    into ``out`` when given."""
    step = scales.float().unsqueeze(-1) * GAUSSIAN_STEP[b]
    return torch.mul(codes.float().sub_(2 ** (b - 1) - 0.5), step, out=out)


# -- bit packing ----------------------------------------------------------------------------
# The wire format is a plain bit stream: code n holds bits n*b .. n*b + b - 1, LSB first, and
# byte m is bits 8m .. 8m + 7. Eight b-bit codes are exactly b bytes, so both directions work
# on whole machine words with shifts and masks ("SWAR"): eight codes, one a byte, are one
# int64 on a little-endian host, and three rounds of "move the odd lanes down next to the even
# ones" squeeze them into the word's low b bytes (unpacking runs the rounds backwards). That is
# a dozen whole-tensor ops on an eighth as many elements, against one op per code bit.
# 4-bit codes take two bytes as one int16 instead. Big-endian hosts take a plainer path.
_LITTLE = torch.tensor([1], dtype=torch.int64).view(torch.uint8)[0].item() == 1


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """``flat`` (uint8) zero-padded to a multiple of ``multiple`` elements, starting at an offset
    that is a multiple of it (so it can be viewed as wider words)."""
    pad = (-flat.numel()) % multiple
    if pad:
        return torch.cat([flat, flat.new_zeros(pad)])
    return flat if flat.storage_offset() % multiple == 0 else flat.clone()


@functools.lru_cache(maxsize=MAX_BITS)
def _lane_masks(b: int) -> tuple[tuple[int, int], ...]:
    """(lane width in bits, mask of the low b * lane / 8 bits of every lane) for the three
    rounds of packing eight b-bit codes in an int64: lanes of 16, 32 and 64 bits."""
    rounds = []
    for lane in (16, 32, 64):
        held = b * lane // 16  # bits each half-lane holds going into this round
        per_word = 64 // lane
        mask = sum(((1 << held) - 1) << (lane * j) for j in range(per_word))
        rounds.append((lane, mask if mask < 2**63 else mask - 2**64))
    return tuple(rounds)


def pack(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Pack b-bit ``codes`` (any shape, uint8 < 2^b) into ``ceil(numel * b / 8)`` bytes, LSB first."""
    flat = codes.reshape(-1)
    count = flat.numel()
    size = math.ceil(count * b / 8)
    if b == 8:
        return flat.clone()
    if not _LITTLE:
        return _pack_plain(flat, b)[:size]
    if b == 4:  # bytes (lo, hi) as one int16 lo + 256 hi: lo | hi << 4 is its low byte of w | w >> 4
        w = _padded(flat, 2).view(torch.int16)
        return (w | (w >> 4)).to(torch.uint8)[:size]
    x = _padded(flat, 8).view(torch.int64).clone()
    for lane, mask in _lane_masks(b):
        half = lane // 2
        high = x >> half  # each lane's upper half, moved down
        high &= mask
        high <<= b * half // 8  # ... to just above the lower half's codes
        x &= mask
        x |= high
    return x.view(torch.uint8).view(-1, 8)[:, :b].reshape(-1)[:size]


def unpack(packed: torch.Tensor, b: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` b-bit codes, uint8 (count,)."""
    flat = packed.reshape(-1)
    if b == 8:
        return flat[:count].clone()
    if not _LITTLE:
        return _unpack_plain(flat, b, count)
    if b == 4:  # byte m -> int16 m | m << 4, masked to its nibbles: bytes (lo, hi) of the int16
        w = flat.to(torch.int16)
        w |= w << 4
        w &= 0x0F0F
        return w.view(torch.uint8)[:count]
    words = math.ceil(count / 8)
    wide = flat.new_zeros(words, 8)  # each group's b bytes as the low bytes of an int64
    whole = min(flat.numel() // b, words)
    wide[:whole, :b] = flat[: whole * b].view(whole, b)
    if whole < words:
        rest = flat[whole * b :]
        wide[whole, : rest.numel()] = rest
    x = wide.view(torch.int64).view(-1)
    for lane, mask in reversed(_lane_masks(b)):
        half = lane // 2
        high = x >> (b * half // 8)  # the upper codes of each lane ...
        high &= mask
        high <<= half  # ... back up to their half-lane
        x &= mask
        x |= high
    return x.view(torch.uint8)[:count]


def _pack_plain(flat: torch.Tensor, b: int) -> torch.Tensor:
    """:func:`pack` without byte-order tricks: each group of eight codes summed into an int64."""
    flat = _padded(flat, 8)
    shifts = torch.arange(0, 8 * b, b, dtype=torch.int64, device=flat.device)  # (8,)
    groups = (flat.view(-1, 8).to(torch.int64) << shifts).sum(dim=-1)  # (G,) int64, disjoint bits
    byte_shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=flat.device)
    as_bytes = ((groups.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # (G, 8), low byte first
    return as_bytes[:, :b].reshape(-1)


def _unpack_plain(flat: torch.Tensor, b: int, count: int) -> torch.Tensor:
    """:func:`unpack` without byte-order tricks."""
    groups = _padded(flat, b).view(-1, b)  # (G, b): a group's bytes, least significant first
    weights = torch.arange(0, 8 * b, 8, dtype=torch.int64, device=flat.device)  # (b,)
    words = (groups.to(torch.int64) << weights).sum(dim=-1, keepdim=True)  # (G, 1) int64
    shifts = torch.arange(0, 8 * b, b, dtype=torch.int64, device=flat.device)  # (8,)
    codes = (words >> shifts) & (2**b - 1)  # (G, 8)
    return codes.reshape(-1)[:count].to(torch.uint8)


# -- one payload ----------------------------------------------------------------------------
def _groups(bits: Bits) -> list[tuple[int, int, int]]:
    """(first row, end row, width) of the payload's non-empty groups: the wide rows, then the rest."""
    return [(lo, hi, b) for lo, hi, b in ((0, bits.k, bits.b + 1), (bits.k, bits.rows, bits.b)) if hi > lo]


def _code(rows: torch.Tensor, bits: Bits) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(payload, scales, codes of each group) of ``rows`` (R, D)."""
    assert rows.shape == (bits.rows, bits.d), (tuple(rows.shape), bits)
    scales = row_scales(rows)  # (R,) fp16
    codes = [quantise(rows[lo:hi], scales[lo:hi], b) for lo, hi, b in _groups(bits)]
    parts = [scales.view(torch.uint8)] + [pack(c, b) for c, (_, _, b) in zip(codes, _groups(bits), strict=True)]
    payload = torch.cat(parts)
    assert payload.numel() == bits.nbytes
    return payload, scales, codes


def payload_of(rows: torch.Tensor, bits: Bits) -> torch.Tensor:
    """The payload uint8 (bits.nbytes,) of ``rows`` (R, D), for a sender that keeps no reconstruction."""
    return _code(rows, bits)[0]


def encode(rows: torch.Tensor, bits: Bits) -> tuple[torch.Tensor, torch.Tensor]:
    """Code ``rows`` (R, D) -> (payload uint8 (bits.nbytes,), the receivers' reconstruction fp32 (R, D))."""
    payload, scales, codes = _code(rows, bits)
    out = rows.new_empty(bits.rows, bits.d, dtype=torch.float32)
    for c, (lo, hi, b) in zip(codes, _groups(bits), strict=True):
        dequantise(c, scales[lo:hi], b, out=out[lo:hi])
    return payload, out


def decode(payload: torch.Tensor, bits: Bits) -> torch.Tensor:
    """The reconstruction of a payload built by :func:`encode`: fp32 (R, D)."""
    assert payload.numel() == bits.nbytes, (payload.numel(), bits)
    flat = payload.reshape(-1)
    head = SCALE_BYTES * bits.rows
    scales = flat[:head].clone().view(torch.float16)  # clone: the piece may start at an odd offset
    out = torch.empty(bits.rows, bits.d, device=payload.device)
    offset = head
    for lo, hi, b in _groups(bits):
        size = math.ceil((hi - lo) * bits.d * b / 8)
        codes = unpack(flat[offset : offset + size], b, (hi - lo) * bits.d).view(hi - lo, bits.d)
        dequantise(codes, scales[lo:hi], b, out=out[lo:hi])
        offset += size
    return out
