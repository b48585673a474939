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
    rms = x.float().pow(2).mean(dim=-1).sqrt()
    return rms.clamp(max=FP16_MAX).to(torch.float16)


def quantise(x: torch.Tensor, scales: torch.Tensor, b: int) -> torch.Tensor:
    """b-bit mid-rise codes of ``x`` (R, D) with per-row ``scales`` (R,) -> uint8 (R, D)."""
    step = scales.float().unsqueeze(-1) * GAUSSIAN_STEP[b]  # (R, 1)
    # 1 / step, and 0 for an all-zero row (its codes are then the middle code, 0 decoded as ±step/2)
    inverse = torch.where(step > 0, 1.0 / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = torch.mul(x.float(), inverse).floor_().add_(2 ** (b - 1))
    return codes.clamp_(0, 2**b - 1).to(torch.uint8)


def dequantise(codes: torch.Tensor, scales: torch.Tensor, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantise` (to the cell centres): uint8 (R, D) -> fp32 (R, D), written
    into ``out`` when given."""
    step = scales.float().unsqueeze(-1) * GAUSSIAN_STEP[b]
    return torch.mul(codes.float().sub_(2 ** (b - 1) - 0.5), step, out=out)


# -- bit packing ----------------------------------------------------------------------------
# The wire format is a plain bit stream: code n holds bits n*b .. n*b + b - 1, LSB first, and
# byte m is bits 8m .. 8m + 7. Eight b-bit codes are exactly b bytes, so both directions work
# on groups of eight codes held in one int64 (its little-endian bytes are the group's bytes):
# a few whole-tensor ops instead of one per bit.
_LITTLE = torch.tensor([1], dtype=torch.int64).view(torch.uint8)[0].item() == 1


def pack(codes: torch.Tensor, b: int) -> torch.Tensor:
    """Pack b-bit ``codes`` (any shape, uint8 < 2^b) into ``ceil(numel * b / 8)`` bytes, LSB first."""
    flat = codes.reshape(-1)
    count = flat.numel()
    if 8 % b == 0:  # whole codes per byte (b = 1, 2, 4, 8): bytes of uint8 shifts, no int64 groups
        return _pack_whole(flat, b)
    pad = (-count) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8 * b, b, dtype=torch.int64, device=flat.device)  # (8,)
    groups = (flat.view(-1, 8).to(torch.int64) << shifts).sum(dim=-1)  # (G,) int64, disjoint bits
    as_bytes = groups.view(torch.uint8).view(-1, 8) if _LITTLE else _le_bytes(groups)
    return as_bytes[:, :b].reshape(-1)[: math.ceil(count * b / 8)]


def unpack(packed: torch.Tensor, b: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` b-bit codes, uint8 (count,)."""
    flat = packed.reshape(-1)
    if 8 % b == 0:
        return _unpack_whole(flat, b, count)
    pad = (-flat.numel()) % b
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, b)  # (G, b): a group's bytes, least significant first
    if _LITTLE:  # each group's b bytes are the low bytes of one little-endian int64
        wide = groups.new_zeros(groups.shape[0], 8)
        wide[:, :b] = groups
        words = wide.view(torch.int64)  # (G, 1)
    else:
        weights = torch.arange(0, 8 * b, 8, dtype=torch.int64, device=flat.device)  # (b,)
        words = (groups.to(torch.int64) << weights).sum(dim=-1, keepdim=True)  # (G, 1) int64
    shifts = torch.arange(0, 8 * b, b, dtype=torch.int64, device=flat.device)  # (8,)
    codes = (words >> shifts) & (2**b - 1)  # (G, 8)
    return codes.reshape(-1)[:count].to(torch.uint8)


def _pack_whole(flat: torch.Tensor, b: int) -> torch.Tensor:
    """:func:`pack` for b dividing 8: each byte holds 8 / b codes, the first in its low bits."""
    per = 8 // b
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if per == 1:
        return flat.clone()
    lanes = flat.view(-1, per)  # (bytes, per) uint8
    out = lanes[:, 0].clone()
    for j in range(1, per):  # codes < 2^b, so shifted lanes never overlap: OR is a sum
        out |= lanes[:, j] << (j * b)
    return out


def _unpack_whole(flat: torch.Tensor, b: int, count: int) -> torch.Tensor:
    """:func:`unpack` for b dividing 8."""
    per = 8 // b
    if per == 1:
        return flat[:count].clone()
    shifts = torch.arange(0, 8, b, dtype=torch.uint8, device=flat.device)  # (per,)
    codes = (flat.unsqueeze(-1) >> shifts) & (2**b - 1)  # (bytes, per) uint8
    return codes.reshape(-1)[:count]


def _le_bytes(words: torch.Tensor) -> torch.Tensor:
    """(G,) int64 -> (G, 8) uint8, least significant byte first (for big-endian hosts)."""
    shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


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
