"""The job submitit runs on every task: export the torch.distributed environment, train.

A job stopped by the cluster (preemption, `scontrol requeue`, the pre-timeout signal) has written a
checkpoint at a step all ranks agreed on (`dist_mtl.stop`); it then exits without a result, so the
waiting `dist-mtl launch` keeps waiting, and the requeued attempt, started with the same pickled
arguments, resumes from that checkpoint (`dist_mtl.restart`).
"""

from __future__ import annotations

import submitit

from dist_mtl.stop import STOPPED_EXIT


def train_argv(config: str | None, overrides: list[str], resume: bool, overwrite: bool) -> list[str]:
    """The arguments of `python -m dist_mtl.train` for this job."""
    flags = ["--resume"] * resume + ["--overwrite"] * overwrite
    return [*([config] if config else []), *overrides, *flags]


class TrainJob(submitit.helpers.Checkpointable):
    """A picklable training job; every attempt after the first resumes the run."""

    def __call__(
        self, config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False
    ) -> int:
        from dist_mtl.train import main

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = main(train_argv(config, overrides, resume, overwrite))
        if code == STOPPED_EXIT:  # no result: the next attempt of this job writes it
            raise SystemExit(code)
        return code

    def checkpoint(
        self, config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False
    ) -> submitit.helpers.DelayedSubmission:
        """submitit's own requeue (its USR2 handler, before training installs ours): the same call;
        the restarted attempt decides to resume by itself (`dist_mtl.restart.attempt_flags`)."""
        return submitit.helpers.DelayedSubmission(TrainJob(), config, overrides, resume, overwrite)
