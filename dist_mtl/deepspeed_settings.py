"""The DeepSpeed JSON the backend runs with: the user's file (engine.deepspeed_config), then our fields.

Importable without DeepSpeed (config validation runs it before any process starts). Our fields always
win; where the file says otherwise, `deepspeed_settings` returns a note naming both values, which rank 0
prints. Sections that would make DeepSpeed train something else than the engine's other backend are
refused naming the key: the optimizer and its schedule come from optim.* (the trainer's optimizer class
and hyperparameters are handed to DeepSpeed), fp16 (loss scaling) and gradient clipping have no
counterpart in the trainer, and gradient accumulation would step every N surrogate backwards.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

from dist_mtl.errors import ConfigError


class EngineFields(Protocol):
    """The engine.* fields read here (config.EngineConfig; config imports this module, not the reverse)."""

    deepspeed_config: str
    zero_stage: int
    bf16: bool
    offload_optimizer: bool


# key of the JSON -> why the engine refuses it (the field that decides instead)
REFUSED = {
    "optimizer": "the optimizer is optim.name / optim.lr / optim.weight_decay (the trainer's own class)",
    "scheduler": "the learning-rate schedule is optim.lr_decay / optim.decay_every",
    "fp16": "fp16 with loss scaling is not supported; use engine.bf16",
    "gradient_clipping": "the trainer does not clip; a clipped step would differ from the torch backend",
    "gradient_accumulation_steps": "every engine step is one optimizer step",
}

BUCKET_ELEMENTS = 25 * 2**20 // 4  # 25 MiB of float32, engine.bucket_mb's default


def _refused(key: str, value: Any) -> bool:
    """Whether the file's `key` asks for something the engine cannot honour (disabled sections pass)."""
    if key == "fp16":
        return isinstance(value, dict) and bool(value.get("enabled", False))
    if key == "gradient_clipping":
        return bool(value)
    if key == "gradient_accumulation_steps":
        return value != 1
    return True


def load_user_settings(path: str) -> dict[str, Any]:
    """engine.deepspeed_config as a dict ({} when unset); ConfigError naming the field otherwise."""
    if not path:
        return {}
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path} as JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return loaded


def deepspeed_settings(engine: EngineFields, world_size: int) -> tuple[dict[str, Any], list[str]]:
    """(the DeepSpeed config dict, notes on the file's values our fields overrode)."""
    user = load_user_settings(engine.deepspeed_config)
    for key, why in REFUSED.items():
        if key in user and _refused(key, user[key]):
            raise ConfigError(
                f"engine.deepspeed_config: {key!r} is not accepted with engine.backend deepspeed: {why}"
            )
    out = copy.deepcopy(user)
    notes: list[str] = []

    def put(path: tuple[str, ...], value: Any, field: str) -> None:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        old = node.get(path[-1], value)
        if old != value:
            notes.append(
                f"{field}={value!r} overrides {'.'.join(path)}={old!r} from {engine.deepspeed_config}"
            )
        node[path[-1]] = value

    put(("zero_optimization", "stage"), engine.zero_stage, "engine.zero_stage")
    put(("bf16", "enabled"), engine.bf16, "engine.bf16")
    offload = "cpu" if engine.offload_optimizer else "none"
    put(("zero_optimization", "offload_optimizer", "device"), offload, "engine.offload_optimizer")
    # One surrogate backward per engine step on every rank: no accumulation, one "sample" per rank.
    out["train_micro_batch_size_per_gpu"] = 1
    out["gradient_accumulation_steps"] = 1
    out["train_batch_size"] = world_size
    # The trainer's optimizer class runs the step (the same Adam as the torch backend), also offloaded.
    out["zero_allow_untested_optimizer"] = True
    out["zero_force_ds_cpu_optimizer"] = False
    out.setdefault("steps_per_print", 2**31 - 1)
    # DeepSpeed's default buckets hold 5e8 elements (2 GB of float32 allocated at the first backward);
    # the engine's own 25 MiB unless the file sets them.
    zero = out["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, BUCKET_ELEMENTS)
    return out, notes


def check_bf16(device: str) -> None:
    """engine.bf16 needs a device with bfloat16 arithmetic (train.device: auto, cpu or cuda)."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        supported, where = torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "this GPU"
    else:
        supported, where = torch.ops.mkldnn._is_mkldnn_bf16_supported(), "this CPU (no AVX512-BF16/AMX)"
    if not supported:
        raise ConfigError(f"engine.bf16 true: {where} has no bfloat16 support; set engine.bf16=false")
