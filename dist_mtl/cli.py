"""`dist-mtl` command line: train, profile, data."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from dist_mtl.config import load_config, split_config_and_overrides
from dist_mtl.errors import UserError
from dist_mtl.train import run


def _train(ns: argparse.Namespace) -> int:
    config, overrides = split_config_and_overrides(ns.args)
    if ns.nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ns.nproc}",
            "-m",
            "dist_mtl.train",
            *([config] if config else []),
            *overrides,
            *(["--resume"] if ns.resume else []),
        ]
        return subprocess.call(
            cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        )
    cfg = load_config(config, overrides)
    return run(cfg, resume=ns.resume)


def _profile(ns: argparse.Namespace) -> int:
    from dist_mtl.observe import profile_report

    print(profile_report(ns.run_dir, warmup=ns.warmup))
    return 0


def _data_celeba(ns: argparse.Namespace) -> int:
    from dist_mtl.data import convert_celeba

    manifest = convert_celeba(ns.root, ns.out, image_size=ns.image_size, shard_size=ns.shard_size)
    print(f"wrote {manifest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-mtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train; CONFIG is a YAML file, then section.key=value overrides")
    p.add_argument("args", nargs="*", metavar="CONFIG|OVERRIDE")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--nproc", type=int, default=1, help="launch this many local ranks with torchrun")
    p.set_defaults(func=_train)

    p = sub.add_parser("profile", help="per-phase p50/p95 times, shares and bytes of a run")
    p.add_argument("run_dir")
    p.add_argument("--warmup", type=int, default=2, help="steps skipped at the start of each rank's log")
    p.set_defaults(func=_profile)

    p = sub.add_parser("data", help="data preparation")
    dsub = p.add_subparsers(dest="dataset", required=True)
    c = dsub.add_parser("celeba", help="convert a local CelebA copy into webdataset shards")
    c.add_argument("root", help="CelebA root (official layout or torchvision's)")
    c.add_argument("out", help="output directory for shards and manifest.json")
    c.add_argument("--image-size", type=int, default=None, help="resize to this square size (default: keep)")
    c.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    c.set_defaults(func=_data_celeba)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (UserError, FileNotFoundError) as exc:  # a missing input file is the user's error too
        print(f"dist-mtl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
