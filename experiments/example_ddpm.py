"""A two-run sweep on the seconds-long DDPM config: the example in experiments/README.md and the tests' sweep.

  python -m experiments.sweep experiments/example_ddpm.py --out /tmp/example_sweep --launch local --parallel 2
  python -m experiments.report /tmp/example_sweep

Epsilon against v-prediction on configs/shapes_ddpm.py:runlocal (6 steps of a tiny U-Net on 16x16 shapes), with the
held-out loss evaluated at the end.
"""

from experiments.sweep import Sweep, grid

SWEEP = Sweep(
    config="configs/shapes_ddpm.py",
    arg="runlocal",
    fixed={"log_every_steps": 1, "eval_every_steps": 0, "optim.schedule": "constant"},
    runs=grid("diffusion.prediction_type", ["epsilon", "v_prediction"]),
    name="{prediction_type}",
    description="epsilon vs v-prediction, pixel-space DDPM, runlocal size",
)
