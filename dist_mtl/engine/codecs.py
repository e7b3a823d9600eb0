"""What a rank sends to the coordinator in `gather` / `sketch`: its losses and (compressed) task gradients.

A payload is one flat tensor per rank: the T_max owned losses, bit-exact, then the encoded rows of
the (T_max, P) task-gradient block (rows beyond the rank's own tasks are zero). The coordinator
stacks the K payloads and turns them into the padded Gramian of the K * T_max rows. Lossless
`none` sends the block itself (no copy); the lossy codecs only feed the Gramian, because the
direction is then formed from exact local gradients (DESIGN section 2).
"""

from __future__ import annotations

import math

import torch

from dist_mtl.engine.traffic import StepShape


class DenseCodec:
    """Rows in float32 (none: the block itself) or rounded to fp16 / bf16; losses bit-exact."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.loss_slots = 4 // torch.empty((), dtype=dtype).element_size()  # float32 loss in 16-bit halves

    @property
    def lossless(self) -> bool:
        return self.dtype == torch.float32

    def numel(self, rows: int, params: int) -> int:
        return rows * self.loss_slots + rows * params

    def encode(self, losses: torch.Tensor, block: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """`payload` is the float32 [losses, block] slice of the rank's buffer; returns what to send."""
        if self.lossless:
            return payload
        return torch.cat([losses.view(self.dtype), block.reshape(-1).to(self.dtype)])

    def decode(self, wire: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (K*rows,), gradient rows (K*rows, P) float32) from the stacked (K, numel) payloads."""
        k = wire.shape[0]
        head = rows * self.loss_slots
        losses = wire[:, :head].contiguous().view(torch.float32).reshape(k * rows)
        return losses, wire[:, head:].reshape(k * rows, -1).to(torch.float32)

    def gramian(self, wire: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = self.decode(wire, rows)
        return grads @ grads.T, losses


class TopKCodec:
    """The ceil(ratio * P) largest-magnitude coordinates of every row: values, then int32 indices as bits."""

    dtype = torch.float32
    lossless = False

    def __init__(self, ratio: float, params: int) -> None:
        if params >= 2**31:
            raise ValueError(f"engine.compression 'topk' indexes with int32; P={params} is too large")
        self.params = params
        self.count = topk_count(params, ratio)

    def numel(self, rows: int, params: int) -> int:
        return rows + 2 * rows * self.count

    def encode(self, losses: torch.Tensor, block: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        index = block.abs().topk(self.count, dim=1, sorted=False).indices
        values = block.gather(1, index)
        return torch.cat([losses, values.reshape(-1), index.to(torch.int32).view(torch.float32).reshape(-1)])

    def gramian(self, wire: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, n = wire.shape[0], rows * self.count
        losses = wire[:, :rows].reshape(k * rows)
        values = wire[:, rows : rows + n].reshape(k * rows, self.count)
        index = wire[:, rows + n :].contiguous().view(torch.int32).reshape(k * rows, self.count).long()
        dense = torch.zeros(k * rows, self.params, dtype=wire.dtype, device=wire.device)
        dense.scatter_(1, index, values)
        return dense @ dense.T, losses


class CountSketchCodec:
    """Count-sketch of width m with hashes shared by every rank: <S g, S h> is unbiased for <g, h>."""

    dtype = torch.float32
    lossless = False

    def __init__(self, size: int, seed: int, params: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.size = size
        self.bucket = torch.randint(0, size, (params,), generator=gen).to(device)
        self.sign = (torch.randint(0, 2, (params,), generator=gen) * 2 - 1).to(device, torch.float32)

    def numel(self, rows: int, params: int) -> int:
        return rows + rows * self.size

    def sketch(self, block: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(block.shape[0], self.size, dtype=block.dtype, device=block.device)
        return out.index_add_(1, self.bucket, block * self.sign)

    def encode(self, losses: torch.Tensor, block: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        return torch.cat([losses, self.sketch(block).reshape(-1)])

    def gramian(self, wire: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = wire.shape[0]
        sketches = wire[:, rows:].reshape(k * rows, self.size)
        return sketches @ sketches.T, wire[:, :rows].reshape(k * rows)


Codec = DenseCodec | TopKCodec | CountSketchCodec


def topk_count(params: int, ratio: float) -> int:
    """Coordinates kept per row by `topk`."""
    return max(1, math.ceil(ratio * params))


def payload_bytes(compression: str, s: StepShape) -> int:
    """Bytes one rank sends to the coordinator per step: `numel` of the codec times its element size."""
    rows, p = max(s.split), s.params
    if compression == "none":
        return 4 * (rows + rows * p)
    if compression in ("fp16", "bf16"):
        return 2 * (2 * rows + rows * p)  # losses travel bit-exact as two 16-bit halves
    if compression == "topk":
        return 4 * (rows + 2 * rows * topk_count(p, s.topk_ratio))
    return 4 * (rows + rows * s.sketch_size)


def build_codec(
    name: str, *, params: int, topk_ratio: float, sketch_size: int, sketch_seed: int, device: torch.device
) -> Codec:
    """The codec of engine.compression `name` (protocol `sketch` uses `countsketch`)."""
    if name == "none":
        return DenseCodec(torch.float32)
    if name == "fp16":
        return DenseCodec(torch.float16)
    if name == "bf16":
        return DenseCodec(torch.bfloat16)
    if name == "topk":
        return TopKCodec(topk_ratio, params)
    if name == "countsketch":
        return CountSketchCodec(sketch_size, sketch_seed, params, device)
    raise ValueError(f"engine.compression must be one of none, fp16, bf16, topk, countsketch; got {name!r}")
