"""Ablation: the diffusion objective of the shapes latent-diffusion model, then classifier-free guidance.

epsilon vs v-prediction × min-SNR-γ weighting off (γ = 0) / on (γ = 5, Hang et al. 2023), 2 seeds each: 8 runs of
configs/shapes_ldm.py:demo (1,000 steps; minutes each on a CPU). Each run logs the held-out loss and, with a shapes
evaluator, eval_shapes_acc_test / eval_shapes_acc_compositional (samples at sample.guidance_scale = 4 for held-out
captions, checked by sd_jax/eval/shapes_eval.py) at steps 500 and 1,000. Then, for the group (both seeds) with the best
mean final test-split accuracy, the `guidance` evaluation draws the same prompts at guidance scales 1..9
(experiments/shapes_accuracy.py) to plot accuracy against guidance.

Needs the demo stages and a shapes evaluator first (paths relative to the repository root; override with
SD_JAX_VAE_FROM / SD_JAX_TEXT_FROM / SD_JAX_SHAPES_EVALUATOR):

  python -m sd_jax.main --config=configs/shapes_vae.py:demo --workdir=workdirs/vae_demo
  python -m sd_jax.main --config=configs/shapes_clip.py:demo --workdir=workdirs/clip_demo
  python -m sd_jax.eval.shapes_eval --out workdirs/shapes_eval
  python -m experiments.sweep experiments/ldm_objective.py --out workdirs/ldm_objective --launch local
  python -m experiments.report workdirs/ldm_objective --out experiments/results/ldm_objective

The held-out loss is not comparable across prediction types (an MSE against ε or against v, with or without the
min-SNR weight): compare runs on the shapes accuracy; compare losses only within a prediction type and weighting.
"""

import os

from experiments.sweep import Best, Eval, Sweep, grid, product, seeds

SWEEP = Sweep(
    config="configs/shapes_ldm.py",
    arg="demo",
    fixed={
        "ldm.vae_from": os.environ.get("SD_JAX_VAE_FROM", "workdirs/vae_demo/export"),
        "ldm.text_from": os.environ.get("SD_JAX_TEXT_FROM", "workdirs/clip_demo/export"),
        "sample.shapes_evaluator": os.environ.get("SD_JAX_SHAPES_EVALUATOR", "workdirs/shapes_eval"),
    },
    runs=product(grid("diffusion.prediction_type", ["epsilon", "v_prediction"]),
                 grid("diffusion.min_snr_gamma", [0.0, 5.0]),
                 seeds(2)),
    name="{prediction_type}_snr{min_snr_gamma}_s{seed}",
    evals=[
        Eval("guidance",
             command=("{python} -m experiments.shapes_accuracy --workdir={workdir} --guidance_scale={guidance_scale} "
                      "--out={out}"),
             grid=grid("guidance_scale", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]),
             select=Best("eval_shapes_acc_test", "max")),
    ],
    description=("epsilon vs v-prediction × min-SNR-γ (0 / 5) × 2 seeds on configs/shapes_ldm.py:demo; guidance "
                 "scale 1..9 for the best group by held-out (test split) shapes accuracy."),
)
