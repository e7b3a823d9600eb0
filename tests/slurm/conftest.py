"""The `slurm_cluster` fixture: one real single-node SLURM for the whole session (tests/slurm/cluster.py).

Missing SLURM packages are installed with apt-get when the tests run as root (CI), and a failure to
install or start is an error there; without root the SLURM tests are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable, ensure_installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        ensure_installed()
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as reason:
        pytest.skip(str(reason))
    try:
        yield cluster
    finally:
        cluster.stop()
