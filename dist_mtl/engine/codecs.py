"""What a rank sends to the coordinator in `gather` / `sketch`: its losses and (compressed) task gradients.

A rank's payload is T_max encoded rows, one per owned task slot (rows beyond its own tasks are zero),
and every row ends with that task's loss, bit-exact: [code(g_t) | L_t]. So the K payloads the
coordinator gathers are one (K * T_max, width) matrix whose codes and losses are column slices,
views rather than copies. Lossless `none` sends the rank's (T_max, P + 1) block itself and the
coordinator forms G G^T and d = G c from views of what it received; the lossy codecs only feed the
Gramian, because the direction is then formed from exact local gradients (DESIGN section 2).
With engine.overlap a row is encoded on its own into a preallocated wire (`encode(rows, out=)`), and
the coordinator forms the Gramian a round of rows at a time (`gramian_rows`, the lower triangle) and
reads the losses with `losses`.

Memory the coordinator needs beyond the received rows is part of each codec's contract (README,
tests/distributed/test_engine_memory.py): none nothing of size P; fp16 / bf16 a float32 copy of the
received codes, CHUNK floats at a time; topk one densified row (P floats) and O(nnz); countsketch
nothing of size P (its hashes take 12 bytes per parameter on every rank).
"""

from __future__ import annotations

import math

import torch

from dist_mtl.engine.traffic import StepShape


class RawCodec:
    """`none`: the rows [g_t | L_t] in float32 as they are; no copy on either side."""

    dtype = torch.float32
    lossless = True

    def __init__(self, params: int) -> None:
        self.width = params + 1

    def encode(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return rows if out is None else out.copy_(rows)

    def decode(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, gradient rows) of the (R, P + 1) received rows: both views."""
        return wire[:, -1], wire[:, :-1]

    def gramian(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = self.decode(wire)
        return grads @ grads.T, losses

    def losses(self, wire: torch.Tensor) -> torch.Tensor:
        return wire[:, -1]

    def gramian_rows(self, wire: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """out[lo:hi, :hi] = rows lo..hi-1 of the Gramian against rows 0..hi-1 (the rows received so
        far: an overlapped gather forms its lower triangle a round at a time)."""
        _rows_mm(wire[:, :-1], lo, hi, out)


CHUNK = 1 << 22  # float32 elements (16 MiB) of 16-bit codes the coordinator widens at a time


class HalfCodec:
    """`fp16` / `bf16`: each row rounded to 16 bits, then its float32 loss as two 16-bit halves."""

    lossless = False

    def __init__(self, dtype: torch.dtype, params: int) -> None:
        self.dtype, self.params = dtype, params
        self.width = params + 2

    def encode(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        wire = (
            torch.empty(rows.shape[0], self.width, dtype=self.dtype, device=rows.device)
            if out is None
            else out
        )
        wire[:, : self.params].copy_(rows[:, :-1])  # rounds in place: no float32 temporary
        wire[:, self.params :].copy_(rows[:, -1:].contiguous().view(self.dtype))
        return wire

    def gramian(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gramian in float32, summed over column blocks widened CHUNK elements at a time, so the
        coordinator never holds a float32 copy of all R x P codes."""
        rows = wire.shape[0]
        columns = max(1, CHUNK // rows)
        gramian = torch.zeros(rows, rows, device=wire.device)
        for start in range(0, self.params, columns):  # P / columns blocks, not a loop over parameters
            block = wire[:, start : min(start + columns, self.params)].to(torch.float32)
            gramian.addmm_(block, block.T)
        return gramian, self.losses(wire)

    def losses(self, wire: torch.Tensor) -> torch.Tensor:
        return wire[:, self.params :].contiguous().view(torch.float32).view(-1)

    def gramian_rows(self, wire: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """`RawCodec.gramian_rows`, widening rows 0..hi-1 CHUNK elements at a time."""
        columns = max(1, CHUNK // hi)
        block = out[lo:hi, :hi]
        block.zero_()
        for start in range(0, self.params, columns):
            widened = wire[:hi, start : min(start + columns, self.params)].to(torch.float32)
            block.addmm_(widened[lo:hi], widened.T)


class TopKCodec:
    """The ceil(ratio * P) largest-magnitude coordinates of each row: values, int32 indices (as float32
    bits), loss."""

    dtype = torch.float32
    lossless = False

    def __init__(self, ratio: float, params: int) -> None:
        if params >= 2**31:
            raise ValueError(f"engine.compression 'topk' indexes with int32; P={params} is too large")
        self.params = params
        self.count = topk_count(params, ratio)
        self.width = 2 * self.count + 1

    def encode(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        c = self.count
        wire = torch.empty(rows.shape[0], self.width, device=rows.device) if out is None else out
        index = wire[:, c : 2 * c].view(torch.int32)
        for i, row in enumerate(rows[:, :-1]):  # one row at a time: |g| needs P floats, not T_max x P
            top = row.abs().topk(c, sorted=False).indices
            index[i].copy_(top)
            torch.index_select(row, 0, top, out=wire[i, :c])
        wire[:, -1].copy_(rows[:, -1])
        return wire

    def gramian(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M_ij = <g^_i, g^_j> from the sparse rows: densify one row at a time into a P-float scratch and
        read every row's coordinates from it (R gathers of R x k), never the R x P dense matrix."""
        c, rows = self.count, wire.shape[0]
        values = wire[:, :c]
        index = wire[:, c : 2 * c].view(torch.int32).long()
        scratch = torch.zeros(self.params, device=wire.device)
        gramian = torch.empty(rows, rows, device=wire.device)
        for i in range(rows):
            scratch.index_copy_(0, index[i], values[i])
            torch.sum(scratch[index] * values, dim=1, out=gramian[i])
            scratch.index_fill_(0, index[i], 0.0)
        upper = gramian.triu()  # each entry summed twice in different orders: keep one, exactly symmetric
        return upper + upper.triu(1).T, wire[:, -1]

    def losses(self, wire: torch.Tensor) -> torch.Tensor:
        return wire[:, -1]

    def gramian_rows(self, wire: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """`RawCodec.gramian_rows` from the sparse rows, one densified row at a time as `gramian`."""
        c = self.count
        values = wire[:hi, :c]
        index = wire[:hi, c : 2 * c].view(torch.int32).long()
        scratch = torch.zeros(self.params, device=wire.device)
        for i in range(lo, hi):
            scratch.index_copy_(0, index[i], values[i])
            torch.sum(scratch[index] * values, dim=1, out=out[i, :hi])
            scratch.index_fill_(0, index[i], 0.0)


class CountSketchCodec:
    """Count-sketch of width m with hashes shared by every rank: <S g, S h> is unbiased for <g, h>."""

    dtype = torch.float32
    lossless = False

    def __init__(self, size: int, seed: int, params: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.size = size
        self.width = size + 1
        # int64 buckets (index_add_ with int32 ones is 10x slower on CPU) and float32 signs (an int8
        # sign would be cast to a P-float temporary by every in-place multiply): 12 bytes per parameter.
        self.bucket = torch.randint(0, size, (params,), generator=gen).to(device)
        self.sign = (torch.randint(0, 2, (params,), generator=gen) * 2 - 1).to(device, torch.float32)

    def encode(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sketch every row into the wire. The signs are applied to the rows in place and undone
        afterwards (multiplying by +-1 twice is exact), so no T_max x P signed copy is made."""
        wire = torch.zeros(rows.shape[0], self.width, device=rows.device) if out is None else out.zero_()
        grads = rows[:, :-1]
        grads.mul_(self.sign)
        wire[:, :-1].index_add_(1, self.bucket, grads)
        grads.mul_(self.sign)
        wire[:, -1].copy_(rows[:, -1])
        return wire

    def gramian(self, wire: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sketches = wire[:, :-1]
        return sketches @ sketches.T, wire[:, -1]

    def losses(self, wire: torch.Tensor) -> torch.Tensor:
        return wire[:, -1]

    def gramian_rows(self, wire: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        """`RawCodec.gramian_rows` on the sketches."""
        _rows_mm(wire[:, :-1], lo, hi, out)


Codec = RawCodec | HalfCodec | TopKCodec | CountSketchCodec


def build_codec(
    name: str, *, params: int, topk_ratio: float, sketch_size: int, sketch_seed: int, device: torch.device
) -> Codec:
    """The codec of engine.compression `name` (protocol `sketch` uses `countsketch`)."""
    if name == "none":
        return RawCodec(params)
    if name == "fp16":
        return HalfCodec(torch.float16, params)
    if name == "bf16":
        return HalfCodec(torch.bfloat16, params)
    if name == "topk":
        return TopKCodec(topk_ratio, params)
    if name == "countsketch":
        return CountSketchCodec(sketch_size, sketch_seed, params, device)
    raise ValueError(f"engine.compression must be one of none, fp16, bf16, topk, countsketch; got {name!r}")


def _rows_mm(rows: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
    out[lo:hi, :hi] = rows[lo:hi] @ rows[:hi].T


def topk_count(params: int, ratio: float) -> int:
    """Coordinates kept per row by `topk`."""
    return max(1, math.ceil(ratio * params))


def payload_bytes(compression: str, s: StepShape) -> int:
    """Bytes one rank sends to the coordinator per step: T_max rows of the codec's width."""
    return max(s.split) * row_bytes(compression, s)


def row_bytes(compression: str, s: StepShape) -> int:
    """Bytes of one encoded row [code(g_t) | L_t] (an overlapped gather sends one per round)."""
    p = s.params
    if compression == "none":
        return 4 * (p + 1)
    if compression in ("fp16", "bf16"):
        return 2 * (p + 2)  # the float32 loss travels bit-exact as two 16-bit halves
    if compression == "topk":
        return 4 * (2 * topk_count(p, s.topk_ratio) + 1)
    return 4 * (s.sketch_size + 1)
