"""The error for a data file or directory that is not there."""

from __future__ import annotations

from dist_mtl.errors import DataError


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or directory (CelebA root, image, manifest, shard) is missing; the message names it.

    A DataError, so entry points report it in one line with exit code 2; also a FileNotFoundError, so
    code that catches the builtin for a missing file keeps working.
    """
