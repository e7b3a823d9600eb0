"""The samples of one webdataset tar shard, read with ``tarfile`` so that every failure names shard and key.

webdataset's own reader turns damage into errors that name neither (a bare ``DecodingError``, a
``KeyError: 'jpg'``) or into silence (a shard cut off between samples just ends early). Here the
members are grouped into samples exactly as webdataset groups them (key = path up to the first dot of
the file name, field = the rest), and an unreadable tar is a DataError naming the shard and the key
of the sample being read. A shard that merely ends early cannot be told from a complete one by the
tar format; the reader compares the sample count with the manifest for that.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from dist_mtl.errors import DataError

_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) for each sample of the shard at ``path``, in file order.

    Members of one sample are contiguous in a webdataset shard; a key seen again later starts a new
    sample, as in webdataset. Members that are not regular files, or whose names have no field
    (no dot), are skipped, as webdataset skips them.
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    reading: str | None = None  # the member whose data is being read, if any
    last: str | None = None  # the last member read completely
    try:
        with tarfile.open(path, mode="r|") as tar:  # streaming: sequential reads, as webdataset does
            for member in tar:
                match = _KEY_AND_FIELD.match(member.name)
                if not member.isfile() or match is None:
                    continue
                member_key, field = match.group(1), match.group(2).lower()
                if key is not None and member_key != key:
                    yield key, fields
                    fields = {}
                key, reading = member_key, member.name
                handle = tar.extractfile(member)
                fields[field] = handle.read() if handle is not None else b""
                last, reading = member.name, None
    except (tarfile.TarError, OSError, EOFError) as exc:
        if reading is not None:
            where = f"in member {reading!r} of sample {key!r}"
        elif last is not None:
            where = f"after member {last!r} of sample {key!r}"
        else:
            where = "before its first sample"
        raise DataError(f"{path}: damaged tar {where} ({exc}); convert again") from exc
    if key is not None:
        yield key, fields
