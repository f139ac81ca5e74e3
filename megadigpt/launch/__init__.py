"""Launching jobs: ``megadigpt submit`` for SLURM (sbatch scripts, job chains, requeue after SLURM's warning signal)
and the code snapshots jobs run from. The launcher environment a running process reads is ``distributed/env.py``."""
