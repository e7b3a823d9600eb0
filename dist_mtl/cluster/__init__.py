"""`dist-mtl launch`: submit a run to SLURM (or run it locally) through submitit, wait, report."""
