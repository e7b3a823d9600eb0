"""Parser for a local CelebA copy, official or torchvision layout, with errors that name file and line.

Official layout (as distributed by the authors, images unzipped)::

    ROOT/Img/img_align_celeba/000001.jpg ...
    ROOT/Anno/list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                                        then rows "000001.jpg -1  1 ..." (any whitespace)
    ROOT/Eval/list_eval_partition.txt   rows "000001.jpg 0" with 0/1/2 = train/val/test

torchvision layout: the same three items flat in ``ROOT/celeba/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_mtl.data.missing import DataFileNotFoundError
from dist_mtl.errors import DataError

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
CELEBA_SPLITS: tuple[str, ...] = ("train", "val", "test")  # partition codes 0, 1, 2
_LABEL_VALUES = frozenset(("-1", "1"))

CELEBA_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (  # (kind, images, attributes, partition)
    ("official", "Img/img_align_celeba", "Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"),
    (
        "torchvision",
        "celeba/img_align_celeba",
        "celeba/list_attr_celeba.txt",
        "celeba/list_eval_partition.txt",
    ),
)


class CelebAFormatError(DataError):
    """A CelebA annotation file does not have the official format; the message says FILE:LINE: what."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class CelebALayout:
    """Where the images and the two annotation files of one local copy are."""

    kind: str  # "official" or "torchvision"
    images_dir: Path
    attr_file: Path
    partition_file: Path


@dataclass(frozen=True)
class CelebAIndex:
    """Every image with its 40 labels (0/1, from -1/1) and its partition, in attribute-file order."""

    layout: CelebALayout
    filenames: tuple[str, ...]
    labels: np.ndarray  # uint8 (N, 40)
    partition: np.ndarray  # int64 (N,), index into CELEBA_SPLITS

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices of ``split`` ("train", "val" or "test") in file order."""
        if split not in CELEBA_SPLITS:
            raise ValueError(f"unknown CelebA split {split!r}; valid: {', '.join(CELEBA_SPLITS)}")
        return np.flatnonzero(self.partition == CELEBA_SPLITS.index(split))


def find_celeba_layout(root: str | os.PathLike[str]) -> CelebALayout:
    """Detect the official or torchvision layout under ``root``; the error names what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataFileNotFoundError(f"CelebA root {root} does not exist or is not a directory")
    for kind, images, attr, partition in CELEBA_LAYOUTS:
        if not (root / attr).is_file():
            continue
        layout = CelebALayout(kind, root / images, root / attr, root / partition)
        if not layout.partition_file.is_file():
            raise DataFileNotFoundError(
                f"{layout.partition_file}: missing ({kind} CelebA layout, found {attr})"
            )
        if not layout.images_dir.is_dir():
            hint = (
                " (unzip img_align_celeba.zip there)"
                if layout.images_dir.with_suffix(".zip").exists()
                else ""
            )
            raise DataFileNotFoundError(f"{layout.images_dir}: missing image directory{hint}")
        return layout
    expected = " or ".join(f"{root / attr} ({kind})" for kind, _, attr, _ in CELEBA_LAYOUTS)
    raise DataFileNotFoundError(f"no CelebA layout under {root}: expected {expected}")


def _read_lines(path: Path) -> list[str]:
    """The lines of an annotation file; bytes that are not UTF-8 are a CelebAFormatError at their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CelebAFormatError(path, line, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _numbered_rows(path: Path, first: int) -> list[tuple[int, list[str]]]:
    """Whitespace-split, non-blank lines from 1-based line ``first`` on, with their line numbers."""
    lines = _read_lines(path)
    return [(n, line.split()) for n, line in enumerate(lines[first - 1 :], start=first) if line.strip()]


def parse_attributes(path: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """Image names, labels (uint8, 0/1) and the line number of each row of ``list_attr_celeba.txt``."""
    lines = _read_lines(path)
    if len(lines) < 2:
        raise CelebAFormatError(path, len(lines) + 1, "expected an image count line and a line of 40 names")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise CelebAFormatError(path, 1, f"expected the number of images, got {lines[0].strip()!r}") from None
    names = tuple(lines[1].split())
    if names != CELEBA_ATTRIBUTES:
        if len(names) != len(CELEBA_ATTRIBUTES):
            raise CelebAFormatError(
                path, 2, f"expected the 40 CelebA attribute names, got {len(names)} names"
            )
        k = next(i for i, (a, b) in enumerate(zip(names, CELEBA_ATTRIBUTES, strict=True)) if a != b)
        raise CelebAFormatError(
            path, 2, f"attribute {k + 1} must be {CELEBA_ATTRIBUTES[k]!r}, got {names[k]!r}"
        )
    filenames: list[str] = []
    numbers: list[int] = []
    rows: list[list[str]] = []
    for n, fields in _numbered_rows(path, 3):
        if len(fields) != 41:
            raise CelebAFormatError(
                path, n, f"expected an image name and 40 values (41 columns), got {len(fields)}"
            )
        if not _LABEL_VALUES.issuperset(fields[1:]):
            column, value = next((c, v) for c, v in enumerate(fields[1:], start=2) if v not in _LABEL_VALUES)
            attribute = CELEBA_ATTRIBUTES[column - 2]
            raise CelebAFormatError(path, n, f"column {column} ({attribute}) must be -1 or 1, got {value!r}")
        filenames.append(fields[0])
        numbers.append(n)
        rows.append(fields[1:])
    if len(filenames) != count:
        raise CelebAFormatError(
            path, 1, f"the count line says {count} images but the file has {len(filenames)} rows"
        )
    labels = (np.array(rows, dtype=np.int8).reshape(-1, 40) > 0).astype(np.uint8)
    return filenames, labels, numbers


def parse_partition(path: Path) -> dict[str, tuple[int, int]]:
    """Map image name to (partition code, line number) from ``list_eval_partition.txt``."""
    result: dict[str, tuple[int, int]] = {}
    for n, fields in _numbered_rows(path, 1):
        if len(fields) != 2:
            raise CelebAFormatError(
                path, n, f"expected an image name and a partition (2 columns), got {len(fields)}"
            )
        name, code = fields
        if code not in ("0", "1", "2"):
            raise CelebAFormatError(
                path, n, f"partition must be 0 (train), 1 (val) or 2 (test), got {code!r}"
            )
        if name in result:
            raise CelebAFormatError(path, n, f"{name} is listed again (first on line {result[name][1]})")
        result[name] = (int(code), n)
    return result


def load_celeba_index(root: str | os.PathLike[str]) -> CelebAIndex:
    """Parse and cross-check a local copy: both files list the same images and every image exists."""
    layout = find_celeba_layout(root)
    filenames, labels, numbers = parse_attributes(layout.attr_file)
    partition = parse_partition(layout.partition_file)
    seen: dict[str, int] = {}
    for name, n in zip(filenames, numbers, strict=True):
        if name in seen:
            raise CelebAFormatError(
                layout.attr_file, n, f"{name} is listed again (first on line {seen[name]})"
            )
        if name not in partition:
            raise CelebAFormatError(layout.attr_file, n, f"{name} has no row in {layout.partition_file}")
        seen[name] = n
    for name, (_, n) in partition.items():
        if name not in seen:
            raise CelebAFormatError(layout.partition_file, n, f"{name} has no row in {layout.attr_file}")
    present = set(os.listdir(layout.images_dir))
    for name, n in zip(filenames, numbers, strict=True):
        if name not in present:
            raise DataFileNotFoundError(
                f"{layout.images_dir / name}: missing image (listed on line {n} of {layout.attr_file})"
            )
    codes = np.array([partition[name][0] for name in filenames], dtype=np.int64)
    return CelebAIndex(layout, tuple(filenames), labels, codes)
