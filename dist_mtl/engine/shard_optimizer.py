"""ZeRO-1 for the `gramian` protocol (engine.shard_optimizer): each rank steps its slice of the shared
parameters only, and the updated slices are all-gathered instead of d.

After the gramian exchange rank (r, k) of a D x K layout holds shard k of d (S elements). With the
optimizer sharded, S is a multiple of D (S = D ceil(P / (K D)), the tail zero-padded) and the rank's
slice is sub-shard r of shard k: n = S / D elements at offset k S + r n of the flat shared
parameters, which `flatten_padded` lays out as views of one (K S) tensor. The rank's optimizer steps
that slice in place as one flat parameter (`mine`, a view; its gradient the same slice of the shared
gradient buffer, where the protocol leaves d) together with the rank's own heads, in one `step()` of the
trainer's optimizer class with the trainer's hyperparameters (the trainer sets the learning rate on
its own optimizer every step; they are copied over before each step). Adam and SGD update each
coordinate from its own gradient and state alone (config.ELEMENTWISE_OPTIMIZERS), so the slices
stepped apart equal the whole stepped at once, element for element.

The parameters are then made whole again by in-place all-gathers (each rank's input is its own chunk
of the output, as NCCL's in-place all-gather and ZeRO do; gloo stages the output and copies it back,
and the distributed tests hold it to the single-process trainer): D = 1, one all-gather of the slices
over the task group (the bytes of the all-gather of d it replaces); D > 1, first the slices of shard
k over the replica group, then the shards over the task group (a group of one moves nothing). Against
the unsharded step, D > 1 adds the replica all-gather, (D - 1) n floats each way: the price of 1/W of
the state instead of 1/K (`gather_bytes`). No copy of the slice is kept.

State: this rank's entries (its slice under the parameter `mine`, its heads) live in the trainer's
optimizer's own `state`, which the inner optimizer shares, so whoever measures `optimizer.state` on a
rank measures what that rank holds. Checkpoints keep the single-process format: `gather_state` (a
collective over the world) assembles every shared parameter's state on rank 0, and `load_full` slices
a loaded single-process state, so a run resumes on any layout, with sharding off or on one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from dist_mtl.engine.comm import Comm
from dist_mtl.engine.traffic import F32, StepShape, all_gather_bytes, total

if TYPE_CHECKING:
    from dist_mtl.engine.layout import Layout
    from dist_mtl.engine.protocols.base import Groups


def shard_numel(params: int, k_size: int, replicas: int, sharded: bool, chunks: int = 1) -> int:
    """S, the gramian shard: ceil(P / K), rounded up to a multiple of the overlap's chunks per shard
    (engine.overlap_chunks) times, with the sharded optimizer, D (each of the D ranks holding shard k
    steps S / D of it)."""
    per = (replicas if sharded else 1) * chunks
    return per * -(-params // (k_size * per))


def gather_bytes(shape: StepShape) -> tuple[int, int]:
    """The sharded step's parameter all-gathers: D = 1, S floats from each of the K ranks of the task
    group (the all-gather of d it replaces); D > 1, first S / D floats from each of the D ranks of the
    replica group, then S over the task group."""
    d, k_size = shape.replicas, shape.k
    s = shard_numel(shape.params, k_size, d, True, shape.chunks if shape.overlap else 1)
    return total(all_gather_bytes(F32 * (s // d), d), all_gather_bytes(F32 * s, k_size))


def flatten_padded(params: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
    """Move the parameters into the leading elements of one zeroed `numel`-element tensor and make
    each a view of it (as `gradients.flatten_parameters`, with a padded tail: an all-gather of equal
    slices writes into it directly). The tail stays zero: its gradient is zero, so is its update."""
    params = list(params)
    first = params[0]
    flat = torch.zeros(numel, dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset : offset + n].copy_(p.detach().reshape(-1))
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


class ShardedOptimizer:
    """What the gramian protocol calls `optimizer.step()` on when the optimizer is sharded (module
    docstring): the inner optimizer steps this rank's slice and heads, then the slices are gathered."""

    def __init__(
        self,
        main: torch.optim.Optimizer,
        shared: Sequence[torch.Tensor],
        flat: torch.Tensor,
        owned_heads: Sequence[torch.Tensor],
        layout: Layout,
        comm: Comm,
        groups: Groups,
    ) -> None:
        if len(main.param_groups) != 1:
            raise ValueError(
                f"engine.shard_optimizer needs the optimizer's parameters in one group; it has "
                f"{len(main.param_groups)} (set engine.shard_optimizer=false)"
            )
        self.main, self.shared, self.flat, self.comm, self.groups = main, list(shared), flat, comm, groups
        self.params = sum(p.numel() for p in self.shared)
        self.replicas, self.k_size = layout.replicas, layout.task_parallel
        self.replica, self.k = layout.coords(comm.rank)
        self.shard = flat.numel() // self.k_size  # S (`shard_numel`, as the protocol's)
        if flat.numel() != self.k_size * self.shard or self.shard % self.replicas:
            raise ValueError(f"the flat shared parameters hold {flat.numel()} elements, not K S with D | S")
        self.numel = self.shard // self.replicas  # n
        self.offset = self.k * self.shard + self.replica * self.numel
        self.mine = flat[self.offset : self.offset + self.numel]  # stepped in place
        self.mine.grad = torch.zeros_like(self.mine)  # until `attach` points it at the protocol's d
        self.own_shard = flat[self.k * self.shard : (self.k + 1) * self.shard]
        hyper = {key: value for key, value in main.param_groups[0].items() if key != "params"}
        self.inner = type(main)([{"params": [self.mine, *owned_heads], **hyper}], **main.defaults)
        self.inner.state = main.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The trainer's groups (their hyperparameters are what each step uses)."""
        return self.main.param_groups

    @property
    def state(self) -> Any:
        """This rank's optimizer state (the trainer's optimizer's `state`, shared)."""
        return self.main.state

    def attach(self, direction: torch.Tensor) -> None:
        """`direction`: the protocol's (K S) shared gradient buffer, which holds d (all of it, or at
        least shard k) when `step` runs; the slice's gradient is a view of it."""
        if direction.numel() != self.k_size * self.shard:
            raise ValueError(f"the shared gradient buffer holds {direction.numel()} elements, not K S")
        self.mine.grad = direction[self.offset : self.offset + self.numel]

    def step(self) -> None:
        """One step of the slice and the owned heads with the trainer's current hyperparameters, then
        the parameter all-gathers (accounted to the exchange phase of the step in progress)."""
        group = self.inner.param_groups[0]
        for key, value in self.main.param_groups[0].items():
            if key != "params":
                group[key] = value
        self.inner.step()
        rec = self.comm.rec
        with rec.phase("exchange") if rec is not None else nullcontext():
            self.gather()

    def gather(self) -> None:
        """Every rank's updated slice into the flat shared parameters, in place: the D slices of shard
        k over the replica group, then the K shards over the task group (`Comm.all_gather` skips a
        group of one, whose input already is its output)."""
        self.comm.all_gather(self.own_shard, self.mine, self.groups.replica)
        self.comm.all_gather(self.flat, self.own_shard, self.groups.task)

    # --- checkpoints in the single-process format --------------------------------------------------

    def gather_state(self, index: dict[torch.Tensor, int]) -> dict[int, dict[str, Any]]:
        """Every shared parameter's optimizer state, whole and on the CPU, keyed by its index in the
        trainer's optimizer (`index`), on world rank 0; an empty dict elsewhere. A collective over the
        world: every rank calls it."""
        state = self.main.state.get(self.mine)
        if not state:  # no step yet (the same on every rank: skipped steps are skipped everywhere)
            return {}
        keys = sorted(
            k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == self.mine.shape
        )
        scalars = {k: v for k, v in state.items() if k not in keys}
        world = self.groups.world
        root = world.index(self.comm.rank) == 0
        full = None
        if keys:
            local = torch.stack([state[k].detach() for k in keys])  # (keys, n)
            out = (
                torch.empty(world.size, *local.shape, dtype=local.dtype, device=local.device)
                if root
                else None
            )
            gathered = self.comm.gather(local, out, world, dst=0)
            if gathered is not None:  # rank r K + k holds the n elements at (k D + r) n
                d, k_size = self.replicas, self.k_size
                by_position = gathered.view(d, k_size, len(keys), self.numel).permute(2, 1, 0, 3)
                full = by_position.reshape(len(keys), -1)[:, : self.params].cpu()
        if not root:
            return {}
        entries: dict[int, dict[str, Any]] = {}
        offset = 0
        for p in self.shared:
            n = p.numel()
            entry = {
                k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()
            }
            for j, k in enumerate(keys):
                assert full is not None
                entry[k] = full[j, offset : offset + n].reshape(p.shape).clone()
            entries[index[p]] = entry
            offset += n
        return entries

    def load_full(self) -> None:
        """The trainer's optimizer has just loaded a single-process state (every parameter's): keep
        this rank's slice of the shared parameters' state under `mine` and drop the rest (the slice's
        values are the loaded parameters': it is a view of them)."""
        state = self.main.state
        found = [state.get(p) for p in self.shared]
        mine: dict[str, Any] = {}
        if any(found):
            if not all(found):
                raise ValueError("the checkpoint holds optimizer state for some shared parameters only")
            big = max(self.shared, key=lambda p: p.numel())
            reference = state[big]
            for key, value in reference.items():
                per_element = isinstance(value, torch.Tensor) and value.shape == big.shape and big.numel() > 1
                if per_element:
                    whole = torch.zeros(self.k_size * self.shard, dtype=value.dtype, device=value.device)
                    torch.cat([s[key].reshape(-1) for s in found], out=whole[: self.params])
                    mine[key] = whole[self.offset : self.offset + self.numel].clone()
                else:
                    mine[key] = value.clone() if isinstance(value, torch.Tensor) else value
        for p in self.shared:
            state.pop(p, None)
        state.pop(self.mine, None)
        if mine:
            state[self.mine] = mine
        self.inner.state = state


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | ShardedOptimizer) -> int:
    """numel x element size of every tensor in the optimizer's state on this rank."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
