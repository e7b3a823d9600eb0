"""The CelebA converter: unreadable source images, argument errors, progress bar and the shard size."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

from dist_mtl.data import (
    DEFAULT_SHARD_SIZE,
    celeba_convert,
    convert_celeba,
    make_celeba_miniature,
    read_manifest,
)
from dist_mtl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return make_celeba_miniature(tmp_path_factory.mktemp("celeba"), num_images=20, seed=5)


@pytest.fixture
def copy_root(mini_root, tmp_path) -> Path:
    """A private copy of the miniature that a test may damage."""
    return Path(shutil.copytree(mini_root, tmp_path / "copy"))


def _image(root: Path, number: int) -> Path:
    return root / "Img" / "img_align_celeba" / f"{number:06d}.jpg"


@pytest.mark.parametrize("image_size", [None, 8])
@pytest.mark.parametrize(
    ("number", "damage"),
    [
        (3, lambda data: b"not a jpeg"),  # a train image: unreadable header
        (18, lambda data: data[: len(data) // 2]),  # a val image, copied as is: valid header, cut-off scan
    ],
)
def test_unreadable_source_image_is_a_data_error_and_writes_nothing(
    copy_root, tmp_path, image_size, number, damage
):
    path = _image(copy_root, number)
    path.write_bytes(damage(path.read_bytes()))
    out = tmp_path / "out" / "wds"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: not a readable image \\("):
        convert_celeba(copy_root, out, image_size=image_size, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []  # atomic: no output, no staging left


def test_default_shard_size_is_one_constant(mini_root, tmp_path):
    assert inspect.signature(convert_celeba).parameters["shard_size"].default == DEFAULT_SHARD_SIZE
    assert celeba_convert.DEFAULT_SHARD_SIZE == DEFAULT_SHARD_SIZE == 2000
    convert_celeba(mini_root, tmp_path / "wds", progress=False)
    assert len(read_manifest(tmp_path / "wds").shards("train")) == 1


def test_progress_bar_on_by_default_and_off_on_request(mini_root, tmp_path, capsys):
    convert_celeba(mini_root, tmp_path / "a", image_size=8)
    err = capsys.readouterr().err
    assert "celeba train" in err and "16/16" in err and "celeba test" in err
    convert_celeba(mini_root, tmp_path / "b", image_size=8, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard_size": 0}, "shard_size: expected an integer >= 1, got 0"),
        ({"image_size": True}, "image_size: expected None (keep the original JPEGs) or an integer >= 1"),
        ({"splits": ("train", "dev")}, "splits: expected distinct names among train, val, test"),
    ],
)
def test_argument_errors_are_config_errors(mini_root, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        convert_celeba(mini_root, tmp_path / "wds", progress=False, **kwargs)


def test_unusable_output_directory_is_a_data_error(mini_root, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no manifest.json; refusing to replace it"):
        convert_celeba(mini_root, tmp_path, progress=False)
    with pytest.raises(DataError, match="keep.txt: output exists and is not a directory"):
        convert_celeba(mini_root, tmp_path / "keep.txt", progress=False)
