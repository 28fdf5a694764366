"""Launching runs: the run plan, the run folder, and the engines that start a coordinator and
workers for it (local processes, Ray actors, a Slurm job array)."""
