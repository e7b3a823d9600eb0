"""Data sets as in-memory multi-task splits, plus the CelebA layout parser and webdataset shards."""

from dist_mtl.data.base import MultiTaskDataset, TaskSpec
from dist_mtl.data.celeba_convert import DEFAULT_SHARD_SIZE, convert_celeba
from dist_mtl.data.celeba_layout import (
    CELEBA_ATTRIBUTES,
    CELEBA_SPLITS,
    CelebAFormatError,
    find_celeba_layout,
    load_celeba_index,
)
from dist_mtl.data.celeba_manifest import read_manifest
from dist_mtl.data.celeba_miniature import make_celeba_miniature
from dist_mtl.data.celeba_reader import iter_celeba_shards, load_celeba_split, replica_shards
from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.data.multidigits import BINARY_TASK_NAMES
from dist_mtl.data.registry import DATASET_NAMES, build_dataset, dataset_num_tasks, dataset_options

__all__ = [
    "BINARY_TASK_NAMES",
    "CELEBA_ATTRIBUTES",
    "CELEBA_SPLITS",
    "DATASET_NAMES",
    "DEFAULT_SHARD_SIZE",
    "CelebAFormatError",
    "DataFileNotFoundError",
    "MultiTaskDataset",
    "TaskSpec",
    "build_dataset",
    "convert_celeba",
    "dataset_num_tasks",
    "dataset_options",
    "find_celeba_layout",
    "iter_celeba_shards",
    "load_celeba_index",
    "load_celeba_split",
    "make_celeba_miniature",
    "read_manifest",
    "replica_shards",
]
