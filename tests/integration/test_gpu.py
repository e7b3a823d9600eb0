"""The CUDA path: the same run on the GPU and on the CPU ends at the same parameters (float32 noise)."""

from pathlib import Path

import pytest
import torch

from dist_mtl.checkpoint import load_checkpoint
from dist_mtl.config import load_config
from dist_mtl.trainer import train

SMALL = [
    "data.train_size=512",
    "data.test_size=128",
    "data.batch_size=64",
    "model.encoder=lenet",
    "train.steps=5",
    "train.progress=false",
    "optim.name=sgd",
    "optim.lr=0.05",
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_cuda_run_matches_cpu_run(tmp_path: Path, mode: str) -> None:
    finals = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(
            None, [f"run_dir={tmp_path / device}", f"train.device={device}", f"train.mode={mode}", *SMALL]
        )
        train(cfg)
        finals[device] = load_checkpoint(tmp_path / device / "checkpoints" / "last.pt")["model"]
    for key, value in finals["cpu"].items():
        torch.testing.assert_close(finals["cuda"][key], value, rtol=1e-3, atol=1e-4, msg=key)
