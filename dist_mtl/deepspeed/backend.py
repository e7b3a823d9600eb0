"""The engine with DeepSpeed owning the shared encoder's optimizer step (engine.backend deepspeed).

Every protocol runs unchanged: it forwards and back-propagates the trainer's model, exchanges, and
leaves the full-batch direction d in the shared parameters' `.grad`, then calls `optimizer.step()`.
The optimizer it is handed is `SharedStep`: the heads step with the trainer's own optimizer (shared
gradients detached for that call, so it neither updates them nor allocates their state), and the
encoder steps through a DeepSpeed engine over `Surrogate`, DeepSpeed's own copy of the encoder's
parameters, whose forward is sum_i <theta_i, v_i> with v detached: its gradient is v. Each rank
back-propagates it with v = d through `engine.backward`, DeepSpeed averages the W identical gradients
(exactly d for W a power of two) into its ZeRO partitions, and `engine.step()` runs the trainer's
optimizer class on them (ZeRO 1: state sharded, 2: + gradients, 3: + parameters; bf16; CPU offload).
With ZeRO 0-2 in float32 the model's shared parameters are views of DeepSpeed's, so its step updates
them in place; under ZeRO 3 (partitioned) and bf16 (bfloat16) the model keeps a float32 copy that the
updated parameters are gathered / cast into after each step.

What this costs against the torch backend (bench/deepspeed_step.py measures it): DeepSpeed's own
gradient reduction (reduce-scatter or all-reduce, about P values per rank) and parameter all-gather
after the step (P; one more gather for the copy under ZeRO 3), on top of the protocol's exchange that
already made d whole; DeepSpeed's float32 master partition (P/W) next to the parameters, and under
ZeRO 3 the model's whole copy next to DeepSpeed's 1/W. The surrogate backward itself is one multiply
per parameter. A seam where the protocol hands DeepSpeed its shard of d before the
all-gather (gramian: v_k = K x shard k, zero elsewhere) would drop the protocol's all-gather.

Checkpoints stay in the single-process format: the model is whole on every rank; the shared
parameters' optimizer state is assembled from DeepSpeed's partitions on save (`safe_get_full_*`,
collectives every rank joins) and written into the trainer optimizer's slots, and on load pushed
back into the partitions, so a run resumes on either backend.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from dist_mtl.backend import Step
from dist_mtl.balancers import Balancer
from dist_mtl.config import RunConfig
from dist_mtl.deepspeed_settings import deepspeed_settings
from dist_mtl.engine.checksum import ReplicaChecksum
from dist_mtl.engine.runtime import Engine
from dist_mtl.models import MultiTaskModel


class Surrogate(nn.Module):
    """DeepSpeed's copy of the shared parameters; forward(v) = sum_i <theta_i, v_i>, gradient v.

    The parameters are this module's own (not the encoder's submodules'), so ZeRO 3 gathers them all
    in this module's forward."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", nn.Parameter(p.detach().clone()))

    def forward(self, directions: Sequence[torch.Tensor]) -> torch.Tensor:
        terms = [(p * v.to(p.dtype)).sum() for p, v in zip(self.parameters(), directions, strict=True)]
        return torch.stack(terms).sum()


class SharedStep:
    """What the protocols call `optimizer.step()` on: the heads by the trainer's optimizer, the shared
    encoder through DeepSpeed (module docstring). Learning rates are read from the trainer's optimizer,
    which the trainer sets every step."""

    def __init__(
        self,
        engine: Any,
        shared: Sequence[nn.Parameter],
        heads: torch.optim.Optimizer,
        stage: int,
        aliased: bool,
    ) -> None:
        """`aliased`: the model's shared parameters are views of DeepSpeed's (nothing to copy back)."""
        self.engine, self.shared, self.heads, self.stage = engine, list(shared), heads, stage
        self.aliased = aliased
        self.ds_params = list(engine.module.parameters())

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.heads.param_groups

    @property
    def state(self) -> Any:
        return self.heads.state

    def step(self) -> None:
        directions = [p.grad for p in self.shared]
        if any(d is None for d in directions):
            raise RuntimeError("SharedStep.step: a shared parameter has no gradient (the protocol left no d)")
        for p in self.shared:  # the trainer's optimizer steps the heads only
            p.grad = None
        try:
            self.heads.step()
        finally:
            for p, d in zip(self.shared, directions, strict=True):
                p.grad = d  # the protocol's views into its flat buffer, reattached
        lr = self.heads.param_groups[0]["lr"]
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss = self.engine(directions)
        self.engine.backward(loss)
        self.engine.step()
        if not self.aliased:
            self.copy_back()

    @torch.no_grad()
    def copy_back(self) -> None:
        """DeepSpeed's updated parameters into the model the protocols compute with: a gather first
        under ZeRO 3, where each rank holds 1/W of them; a cast from bfloat16 with bf16."""
        if self.stage == 3:
            with deepspeed.zero.GatheredParameters(self.ds_params):
                torch._foreach_copy_(self.shared, self.ds_params)
        else:
            torch._foreach_copy_(self.shared, self.ds_params)


class _LiveChecksum(ReplicaChecksum):
    """The replica checksum over the shared parameters as they are when it runs (their storage is
    DeepSpeed's, or refreshed by a copy, not one flat tensor the torch engine would own)."""

    def __init__(self, params: Sequence[nn.Parameter], *args: Any) -> None:
        self.params = list(params)
        super().__init__(self.params[0].detach().reshape(-1), *args)

    @property  # type: ignore[override]
    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @flat.setter
    def flat(self, value: torch.Tensor) -> None:
        """Set by the base class's constructor; the live parameters are read instead."""


class DeepSpeedBackend(Engine):
    """One rank of a D x K layout whose shared encoder steps through DeepSpeed; implements
    `dist_mtl.backend.Backend` like `Engine`, whose groups, data part and stop vote it keeps."""

    def make_step(
        self, cfg: RunConfig, model: MultiTaskModel, balancer: Balancer, optimizer: torch.optim.Optimizer
    ) -> Step:
        world = self.groups.world
        shared = model.shared_parameters()
        settings, notes = deepspeed_settings(cfg.engine, self.world_size)
        if notes and self.rank == 0:
            print("dist_mtl.deepspeed: " + "; ".join(notes), file=sys.stderr, flush=True)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        surrogate = Surrogate(shared).to(self.device)
        inner = type(optimizer)(surrogate.parameters(), **optimizer.defaults)
        self.ds_engine, *_ = deepspeed.initialize(
            model=surrogate, optimizer=inner, config=settings, dist_init_required=False
        )
        self.stage = cfg.engine.zero_stage
        self.heads_optimizer = optimizer
        self.shared = shared
        # ZeRO 0-2 in float32 keep whole float32 parameters on every rank: the model's become views of
        # DeepSpeed's (one copy, updated in place by its step). ZeRO 3 partitions them and bf16 holds
        # them in bfloat16, so there the model keeps its own float32 copy, refreshed after each step.
        self.aliased = self.stage < 3 and not cfg.engine.bf16
        if self.aliased:
            for q, p in zip(shared, self.ds_engine.module.parameters(), strict=True):
                q.data = p.data
        self.shared_step = SharedStep(self.ds_engine, shared, optimizer, self.stage, self.aliased)
        checksum = _LiveChecksum(shared, self.comm, world, cfg.engine.checksum_every)
        self.state = self.plain_state(cfg, model, optimizer, balancer)
        return self.build_protocol(cfg, model, balancer, self.shared_step, checksum)

    # -- checkpoints in the single-process format -------------------------------------------------

    def _slots(self) -> list[int]:
        """Index of each shared parameter in the trainer optimizer's state_dict numbering."""
        order = [p for g in self.heads_optimizer.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(order)}
        return [index[id(p)] for p in self.shared]

    def _inner(self) -> torch.optim.Optimizer:
        """The torch optimizer DeepSpeed runs (inside its ZeRO / bf16 wrapper, if any)."""
        opt = self.ds_engine.optimizer
        return getattr(opt, "optimizer", opt)

    def _masters(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps and keys its state by: the flat float32 partitions
        of ZeRO 3, of ZeRO 1/2, of the bf16 optimizer, or (stage 0, float32) the surrogate's parameters."""
        opt = self.ds_engine.optimizer
        for name in (
            "fp32_partitioned_groups_flat",
            "single_partition_of_fp32_groups",
            "fp32_groups_flat_partition",
        ):
            if hasattr(opt, name):
                return list(getattr(opt, name))
        return list(self.ds_engine.module.parameters())

    def _partitioned(self) -> bool:
        """Whether DeepSpeed keeps a separate float32 master (read and written with safe_*_full_*)."""
        p = next(self.ds_engine.module.parameters())
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def _shared_optimizer_state(self) -> dict[int, dict[str, Any]]:
        """Each shared parameter's optimizer state, whole, in the trainer optimizer's format (every
        rank must call: assembling the ZeRO partitions is a collective per tensor)."""
        inner = self._inner()
        states = [inner.state[t] for t in self._masters() if t in inner.state]
        if not states:
            return {}  # no DeepSpeed step yet
        keys = [k for k, v in states[0].items() if _is_array(v)]
        scalars = {k: v for k, v in states[0].items() if k not in keys}
        partitioned = self._partitioned()
        out: dict[int, dict[str, Any]] = {}
        params = self.ds_engine.module.parameters()
        for slot, p, q in zip(self._slots(), params, self.shared, strict=True):
            entry = {
                k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in scalars.items()
            }
            for k in keys:
                value = safe_get_full_optimizer_state(p, k) if partitioned else inner.state[p][k]
                entry[k] = value.detach().float().cpu().reshape(q.shape).clone()
            out[slot] = entry
        return out

    def state_dict(self) -> dict[str, Any]:
        shared = self._shared_optimizer_state()
        ckpt = super().state_dict()
        if ckpt:
            state = ckpt["optimizer"]["state"]
            state.update(shared)
            ckpt["optimizer"]["state"] = dict(sorted(state.items()))
        return ckpt

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        super().load_state_dict(ckpt)  # model (the whole encoder on every rank), heads, balancer
        for q in self.shared:  # the shared parameters' state lives in DeepSpeed only
            self.heads_optimizer.state.pop(q, None)
        params = list(self.ds_engine.module.parameters())
        partitioned = self._partitioned()
        with torch.no_grad():
            if partitioned:  # the float32 master; DeepSpeed's own copy follows at its next step
                for p, q in zip(params, self.shared, strict=True):
                    safe_set_full_fp32_param(p, q.detach().float())
            elif not self.aliased:
                torch._foreach_copy_(params, self.shared)
        saved = ckpt["optimizer"]["state"]
        slots = self._slots()
        if not any(s in saved for s in slots):
            return  # a checkpoint before the first step: nothing to restore
        self._ensure_inner_state({k: v for k, v in saved[slots[0]].items() if not _is_array(v)})
        inner = self._inner()
        for slot, p in zip(slots, params, strict=True):
            for key, value in saved[slot].items():
                if not _is_array(value):
                    continue
                if partitioned:
                    safe_set_full_optimizer_state(p, value.to(self.device).float().reshape(-1), key)
                else:
                    inner.state[p][key].copy_(value)

    def _ensure_inner_state(self, scalars: dict[str, Any]) -> None:
        """The inner optimizer's state with the saved step and zeros for the rest, ready to be
        overwritten (torch creates it only at the first step), and linked to the parameters' views."""
        inner = self._inner()
        for t in self._masters():
            state = inner.state[t]
            for key, value in scalars.items():
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
            if isinstance(inner, torch.optim.Adam):
                state.setdefault("exp_avg", torch.zeros_like(t))
                state.setdefault("exp_avg_sq", torch.zeros_like(t))
            elif isinstance(inner, torch.optim.SGD):
                state.setdefault("momentum_buffer", torch.zeros_like(t))
        link = getattr(self.ds_engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    def close(self) -> None:
        """Free DeepSpeed's engine after a barrier (ZeRO 3 ranks can abort at exit otherwise)."""
        if dist.is_initialized():
            dist.barrier()
        engine = getattr(self, "ds_engine", None)
        if engine is not None:
            engine.destroy()
            self.ds_engine = None


# Where DeepSpeed's ZeRO 3, ZeRO 1/2 and bf16 optimizers keep the flat float32 tensors they step.
_MASTER_ATTRIBUTES = (
    "fp32_partitioned_groups_flat",
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
)


def _host(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0
