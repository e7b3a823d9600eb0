"""Submit a dist_mtl run through submitit: the same as `dist-mtl launch` (see its --help).

python launch/submit.py CONFIG [section.key=value ...] --executor slurm --nodes 2 --gpus-per-node 8
python launch/submit.py configs/multidigits_mgda.yaml --executor local      # no SLURM needed
"""

import sys

from dist_mtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))
