"""Data: the bundled sets in memory, shard directories (CelebA or any arrays) streamed, and their writers."""

from dist_mtl.data.base import Batch, BatchSource, MultiTaskDataset, TaskSpec
from dist_mtl.data.celeba_convert import DEFAULT_SHARD_SIZE, convert_celeba
from dist_mtl.data.celeba_layout import (
    CELEBA_ATTRIBUTES,
    CELEBA_SPLITS,
    CelebAFormatError,
    find_celeba_layout,
    load_celeba_index,
)
from dist_mtl.data.celeba_miniature import make_celeba_miniature
from dist_mtl.data.manifest import ShardManifest, read_manifest, write_manifest
from dist_mtl.data.memory import MemorySource
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.data.multidigits import BINARY_TASK_NAMES
from dist_mtl.data.plan import replica_shards
from dist_mtl.data.registry import (
    DATASET_NAMES,
    STREAMED_NAMES,
    build_dataset,
    dataset_num_tasks,
    dataset_options,
)
from dist_mtl.data.stream import ShardSource

__all__ = [
    "BINARY_TASK_NAMES",
    "CELEBA_ATTRIBUTES",
    "CELEBA_SPLITS",
    "DATASET_NAMES",
    "DEFAULT_SHARD_SIZE",
    "STREAMED_NAMES",
    "Batch",
    "BatchSource",
    "CelebAFormatError",
    "DataFileNotFoundError",
    "MemorySource",
    "MultiTaskDataset",
    "ShardManifest",
    "ShardSource",
    "TaskSpec",
    "build_dataset",
    "convert_celeba",
    "dataset_num_tasks",
    "dataset_options",
    "find_celeba_layout",
    "load_celeba_index",
    "make_celeba_miniature",
    "read_manifest",
    "replica_shards",
    "write_manifest",
]
