"""Ablation sweeps, launchers (local, Cloud TPU pods, SLURM) and reports: see experiments/README.md."""
