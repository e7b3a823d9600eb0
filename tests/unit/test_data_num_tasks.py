"""``dataset_num_tasks``: the task count of a configured data set, known without building it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_mtl.data import (
    BINARY_TASK_NAMES,
    CELEBA_ATTRIBUTES,
    DATASET_NAMES,
    STREAMED_NAMES,
    build_dataset,
    convert_celeba,
    dataset_num_tasks,
    make_celeba_miniature,
)
from dist_mtl.errors import ConfigError

SMALL = {"train_size": 20, "test_size": 5}


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("multidigits", {}, 2),
        ("multidigits", {"tasks": "pair"}, 2),
        ("multidigits", {"tasks": "binary"}, len(BINARY_TASK_NAMES)),
        ("multidigits", {"tasks": "binary", "num_tasks": 7}, 7),
        ("synthetic", {}, 16),
        ("synthetic", {"num_tasks": 300}, 300),
    ],
)
def test_count_matches_the_built_data_set(name, options, expected):
    train, test = build_dataset(name, seed=0, **options, **SMALL)
    assert dataset_num_tasks(name, **options) == expected == train.y.shape[1] == len(test.tasks)


def test_celeba_count_is_the_manifest_attribute_count(tmp_path: Path):
    root = make_celeba_miniature(tmp_path / "celeba", num_images=10, seed=0)
    shards = tmp_path / "shards"
    convert_celeba(root, shards, image_size=8, progress=False)
    source = build_dataset("celeba", seed=0, path=str(shards), image_size=8)
    # A config always carries data.tasks, so the launcher passes it; celeba ignores it.
    count = dataset_num_tasks("celeba", tasks="pair", path=str(shards))
    assert count == len(CELEBA_ATTRIBUTES) == len(source.tasks)
    assert dataset_num_tasks("shards", path=shards) == count
    assert dataset_num_tasks("celeba", path=shards) == count


def test_every_data_set_has_a_count():
    for name in DATASET_NAMES:
        if name not in STREAMED_NAMES:  # those need a shard directory (the test above)
            assert dataset_num_tasks(name) >= 1


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mnist", {}, "^data.name: unknown data set 'mnist'"),
        (
            "multidigits",
            {"num_tasks": 2},
            "^data.num_tasks: multidigits with tasks 'pair' .*applies only to tasks 'binary' \\(1..43\\)",
        ),
        (
            "multidigits",
            {"tasks": "binary", "num_tasks": 50},
            "^data.num_tasks: multidigits with tasks 'binary': expected an integer in \\[1, 43\\], got 50$",
        ),
        ("multidigits", {"tasks": "triple"}, "^data.tasks: expected one of 'pair', 'binary'"),
        ("synthetic", {"num_tasks": 0}, "^data.num_tasks: expected an integer >= 1, got 0$"),
        ("celeba", {}, "^data.path: celeba needs the directory of shards"),
        ("celeba", {"path": "/nonexistent/shards"}, "^data.path: no such directory: /nonexistent/shards$"),
        ("celeba", {"num_tasks": 3, "path": "."}, "^data.num_tasks: not an option of celeba; valid options"),
    ],
)
def test_count_rejects_what_the_builder_rejects(name, options, message):
    with pytest.raises(ConfigError, match=message):
        dataset_num_tasks(name, **options)
    build_options = {k: v for k, v in options.items() if k != "path"}
    if name == "celeba":
        build_options["path"] = options.get("path")
    with pytest.raises(ConfigError, match=message):
        build_dataset(name, seed=0, **build_options)
