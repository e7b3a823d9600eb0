"""``ShardSource``: a shard directory streamed in batches, so memory per rank does not grow with the data.

What crosses the DataLoader queue is a CPU batch as stored (uint8 images or the float32 arrays) plus
int64 labels; the main process moves it to the device and normalises there. Which samples form a
batch is a pure function of (seed, step, part) computed from the manifest alone (``plan``), and a
batch is decoded from exactly those samples by random access into the shards (``shard_index``), so:

- the output does not depend on the number of workers (bit-identical for 0, 1 or more);
- ranks that pass the same part and seed get identical batches (ranks of one task group share one);
- a run resumed at step k gets exactly the batches an uninterrupted run got from step k on, and
  opens no shard that those batches do not need.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dist_mtl.data.base import Batch, TaskSpec
from dist_mtl.data.manifest import MANIFEST_NAME, ShardManifest, read_manifest
from dist_mtl.data.options import require_choice, require_int
from dist_mtl.data.plan import SplitView, epoch_order, local_batch, part_shards, split_view, steps_per_epoch
from dist_mtl.data.samples import SampleDecoder
from dist_mtl.data.shard_index import read_fields, shard_index
from dist_mtl.errors import ConfigError, DataError

ON_ERROR = ("raise", "skip")
TRAIN_SPLIT = "train"
PREFETCH_FACTOR = 2  # batches each worker keeps ready: enough to hide decode jitter, bounded memory


def require_shard_path(path: str | os.PathLike[str] | None, name: str = "shards") -> Path:
    """``data.path`` as a Path if it names an existing directory; a ConfigError (naming data set
    ``name``) otherwise."""
    if path is None or str(path) == "":
        raise ConfigError(
            f"data.path: {name} needs the directory of shards written by `dist-mtl data celeba ROOT OUT` "
            "or `dist-mtl data arrays`"
        )
    if not Path(path).is_dir():
        raise ConfigError(f"data.path: no such directory: {path}")
    return Path(path)


@dataclass(frozen=True)
class _Failed:
    """A DataError raised while reading, carried across the worker queue as a value.

    A worker exception re-raised by the DataLoader gets the worker's traceback glued into its
    message; carrying the message keeps the one-line "shard: sample 'key': problem" intact.
    """

    kind: type[DataError]
    message: str


_Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x as stored, y int64, skipped bool (B,)


class _Reader:
    """Decodes samples of one split by ordinal; a sample that fails to decode is masked or raised."""

    def __init__(self, directory: Path, view: SplitView, decoder: SampleDecoder, on_error: str) -> None:
        self.directory = directory
        self.view = view
        self.decoder = decoder
        self.skip = on_error == "skip"

    def read(self, ordinals: np.ndarray) -> _Item:
        decoder = self.decoder
        x = np.zeros((len(ordinals), *decoder.shape), dtype=decoder.dtype)
        y = np.full((len(ordinals), len(decoder.tasks)), -1, dtype=np.int64)
        bad = np.zeros(len(ordinals), dtype=bool)
        shards, offsets = self.view.locate(ordinals)
        for shard in np.unique(shards).tolist():
            rows = np.flatnonzero(shards == shard)
            rows = rows[np.argsort(offsets[rows])]  # read each shard front to back
            row_of = dict(zip(offsets[rows].tolist(), rows.tolist(), strict=True))
            path = self.directory / self.view.names[shard]
            index = shard_index(path, decoder.fields, self.view.listed[shard])
            for i, data in read_fields(index, list(row_of)):
                row = row_of[i]
                try:
                    x[row], y[row] = decoder.decode(data, f"{path}: sample {index.key(i)!r}")
                except DataError:
                    if not self.skip:
                        raise
                    x[row], y[row], bad[row] = 0, -1, True
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(bad)

    def guarded(self, ordinals: np.ndarray) -> _Item | _Failed:
        try:
            return self.read(ordinals)
        except DataError as exc:
            return _Failed(type(exc), str(exc))


class _TrainSteps(Dataset):
    """Map-style data set whose index is the step: item s is the part's batch of step s."""

    def __init__(
        self,
        reader: _Reader,
        *,
        seed: int,
        part: tuple[int, int],
        local: int,
        per_epoch: int,
        buffer_size: int,
        total_steps: int,
    ) -> None:
        self.reader = reader
        self.seed = seed
        self.part = part
        self.local = local
        self.per_epoch = per_epoch
        self.buffer_size = buffer_size
        self.total_steps = total_steps
        self._epoch: int | None = None  # one epoch's order cached per process (workers hold their own)
        self._order = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.total_steps

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            index, parts = self.part
            self._order = epoch_order(
                self.reader.view,
                seed=self.seed,
                epoch=epoch,
                index=index,
                parts=parts,
                buffer_size=self.buffer_size,
            )
            self._epoch = epoch
        return self._order

    def __getitem__(self, step: int) -> _Item | _Failed:
        epoch, batch = divmod(step, self.per_epoch)
        order = self.order(epoch)
        return self.reader.guarded(order[batch * self.local : (batch + 1) * self.local])


class _EvalBatches(Dataset):
    """Map-style data set of consecutive ordinals [lo, hi) in batches of ``batch_size``."""

    def __init__(self, reader: _Reader, lo: int, hi: int, batch_size: int) -> None:
        self.reader = reader
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)

    def __getitem__(self, j: int) -> _Item | _Failed:
        start = self.lo + j * self.batch_size
        return self.reader.guarded(np.arange(start, min(start + self.batch_size, self.hi), dtype=np.int64))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode with PIL/NumPy; torch threads would only oversubscribe


def _require_part(part: tuple[int, int]) -> tuple[int, int]:
    index, parts = part
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in part) and 0 <= index < parts
    if not ok:
        raise ValueError(f"part: expected (index, parts) with 0 <= index < parts, got {part!r}")
    return index, parts


def _no_batches() -> Iterator[Batch]:
    """An empty generator: like every stream it has `close()`, which the trainer calls."""
    yield from ()


class ShardSource:
    """The train and test splits of a shard directory (``manifest.json`` format ``dist_mtl-shards/1``).

    Construction reads and checks the manifest only (every shard exists with its listed size);
    shards are opened when a batch needs them. See the module docstring for the guarantees.

    A ``Batch`` holds x float32 (B, C, H, W) normalised on the device, y int64 (B, T) with -1 for
    "no label", and ``skipped``: with ``on_error="skip"`` a sample that fails to decode keeps its
    place in the batch with x = 0 (the mean input, after normalisation) and y = -1 for every task,
    so the order of the other samples and every rank's view of the batch are unchanged. Damage to a
    shard itself (size, sample count, tar structure) raises in either mode.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        image_size: int = 64,
        workers: int = 0,
        shuffle_buffer: int = 2000,
        on_error: str = "raise",
        test_split: str = "test",
        max_samples: int | None = None,
    ) -> None:
        self.path = require_shard_path(path)
        self.image_size = require_int("image_size", image_size, minimum=1)
        self.workers = require_int("workers", workers, minimum=0)
        self.shuffle_buffer = require_int("shuffle_buffer", shuffle_buffer, minimum=1)
        self.on_error = require_choice("on_error", on_error, ON_ERROR)
        if max_samples is not None:
            require_int("max_samples", max_samples, minimum=1)
        self.manifest: ShardManifest = read_manifest(self.path)
        if not isinstance(test_split, str) or test_split not in self.manifest.splits:
            raise ConfigError(
                f"data.test_split: {test_split!r} is not a split of {self.path / MANIFEST_NAME}; "
                f"its splits: {', '.join(self.manifest.splits)}"
            )
        self.test_split = test_split
        self.decoder = SampleDecoder.for_manifest(self.manifest, image_size, str(self.path / MANIFEST_NAME))
        self._views = {
            TRAIN_SPLIT: split_view(self.manifest, TRAIN_SPLIT, max_samples),
            test_split: split_view(self.manifest, test_split, max_samples),
        }
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.manifest.tasks

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample as delivered."""
        return self.decoder.shape

    def train_count(self) -> int:
        """Samples of the train split this source uses (after ``max_samples``)."""
        return self._views[TRAIN_SPLIT].total

    def test_count(self) -> int:
        """Samples of the test split this source evaluates (after ``max_samples``)."""
        return self._views[self.test_split].total

    def steps_per_epoch(self, batch_size: int, parts: int) -> int:
        """Drop-last steps per epoch, equal for all parts; ConfigError if the batch does not split or fit."""
        return steps_per_epoch(self._views[TRAIN_SPLIT], batch_size, parts)

    def position(self, step: int, batch_size: int, parts: int) -> dict[str, int]:
        """Where ``step`` is: its epoch, its batch in the epoch, and the epoch's samples read before it."""
        epoch, batch = divmod(step, self.steps_per_epoch(batch_size, parts))
        return {"epoch": epoch, "batch": batch, "sample": batch * batch_size}

    def train_batches(
        self,
        *,
        seed: int,
        batch_size: int,
        part: tuple[int, int],
        start_step: int,
        total_steps: int,
        device: torch.device,
    ) -> Iterator[Batch]:
        """This part's batches (``batch_size // parts`` samples) of steps start_step .. total_steps - 1.

        Step s is batch s % spe of epoch s // spe. Arguments are checked here; the workers start at the
        first ``next``. One iterator serves the whole run (workers persist across epochs); ``close()`` it
        to stop them early.
        """
        index, parts = _require_part(part)
        view = self._views[TRAIN_SPLIT]
        part_shards(view, index, parts)
        per_epoch = self.steps_per_epoch(batch_size, parts)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"expected 0 <= start_step <= total_steps, got {start_step} and {total_steps}")
        steps = _TrainSteps(
            _Reader(self.path, view, self.decoder, self.on_error),
            seed=seed,
            part=(index, parts),
            local=local_batch(view, batch_size, parts),
            per_epoch=per_epoch,
            buffer_size=self.shuffle_buffer,
            total_steps=total_steps,
        )
        if start_step == total_steps:
            return _no_batches()  # nothing left: start no workers
        return self._deliver(steps, range(start_step, total_steps), torch.device(device))

    def eval_batches(
        self, *, batch_size: int, part: tuple[int, int], device: torch.device
    ) -> Iterator[Batch]:
        """Batches of this part's contiguous share of the test split: ordinals [n i // W, n (i+1) // W).

        Every sample of the split is evaluated by exactly one part, for any number of parts W; the
        last batch of a part may be short and a part may be empty.
        """
        index, parts = _require_part(part)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"eval.batch_size: expected an integer >= 1, got {batch_size!r}")
        view = self._views[self.test_split]
        n = view.total
        lo, hi = n * index // parts, n * (index + 1) // parts
        if lo == hi:
            return _no_batches()
        batches = _EvalBatches(_Reader(self.path, view, self.decoder, self.on_error), lo, hi, batch_size)
        return self._deliver(batches, range(len(batches)), torch.device(device))

    def _loader(self, data: Dataset, indices: Iterable[int], device: torch.device) -> DataLoader:
        options: dict[str, Any] = {}
        if self.workers:
            options = {
                "prefetch_factor": PREFETCH_FACTOR,
                "multiprocessing_context": "fork",
                "worker_init_fn": _worker_init,
            }
        return DataLoader(
            data,
            batch_size=None,
            sampler=indices,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            **options,
        )

    def _deliver(self, data: Dataset, indices: range, device: torch.device) -> Iterator[Batch]:
        iterator = iter(self._loader(data, indices, device))
        try:
            for item in iterator:
                if isinstance(item, _Failed):
                    raise item.kind(item.message)
                yield self._on_device(item, device)
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # stop workers now, not at collection
            if shutdown is not None:
                shutdown()

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm:
            mean = torch.tensor(self.manifest.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.manifest.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._norm[device] = (mean.to(device), std.to(device))
        return self._norm[device]

    def _on_device(self, item: _Item, device: torch.device) -> Batch:
        x, y, bad = item
        skipped = int(bad.sum())
        mean, std = self._normalisation(device)
        x = x.to(device, non_blocking=True).float()
        if self.decoder.dtype == "uint8":
            x = x / 255  # the manifest's statistics are of pixels in [0, 1]
        x = (x - mean) / std
        if skipped:
            x = x.masked_fill(bad.to(device, non_blocking=True).view(-1, 1, 1, 1), 0.0)
        return Batch(x=x, y=y.to(device, non_blocking=True), skipped=skipped)
