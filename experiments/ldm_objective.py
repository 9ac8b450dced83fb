"""Ablation: the diffusion objective of the shapes latent-diffusion model, then classifier-free guidance.

epsilon vs v-prediction × min-SNR-γ weighting off (γ = 0) / on (γ = 5, Hang et al. 2023), 2 seeds each: 8 runs of
the full-size shapes U-Net (configs/shapes_ldm.py, default preset) cut to 600 steps of 32 (warmup 100, cosine to 0),
on the frozen VAE and text tower of a finished full run (`python -m sd_jax.stages --preset=full`) and its
precomputed latents: about 9 minutes each on 2 CPU cores. Each run logs the held-out loss and
eval_shapes_acc_test / eval_shapes_acc_compositional at step 600: one image at guidance 4 (DDIM 25) for each of the
first 128 captions of the held-out `test` split and of the `compositional` split, checked by the shapes evaluator
(sd_jax/eval/shapes_eval.py). Then, for the group (both seeds) with the best mean test-split accuracy, the `guidance`
evaluation draws the same test and compositional prompts at guidance scales 1..9 (experiments/shapes_accuracy.py).

This is a short-budget ablation: it asks which objective learns the shapes soonest (600 steps, a fifth of the full
preset's 3,000 at the time), not which ends best. The text tower stays frozen, as it was when the committed results
were measured (the full preset now fine-tunes it).

Needs a full shapes run and a shapes evaluator first (SD_JAX_STAGES: the stages' --workdir, default workdirs/full;
SD_JAX_SHAPES_EVALUATOR: the evaluator directory, default ~/.cache/sd_jax/shapes_evaluator, where the stages put it):

  python -m sd_jax.stages --preset=full --workdir=workdirs/full
  python -m experiments.sweep experiments/ldm_objective.py --out workdirs/ldm_objective --launch local
  python -m experiments.report workdirs/ldm_objective --out experiments/results/ldm_objective

The held-out loss is not comparable across prediction types (an MSE against ε or against v, with or without the
min-SNR weight): compare runs on the shapes accuracy; compare losses only within a prediction type and weighting.
"""

import os

from experiments.sweep import Best, Eval, Sweep, grid, product, seeds

_STAGES = os.environ.get("SD_JAX_STAGES", "workdirs/full")
_EVALUATOR = os.environ.get("SD_JAX_SHAPES_EVALUATOR", os.path.expanduser("~/.cache/sd_jax/shapes_evaluator"))

SWEEP = Sweep(
    config="configs/shapes_ldm.py",
    arg="",
    fixed={
        "ldm.vae_from": os.path.join(_STAGES, "vae", "export"),
        "ldm.text_from": os.path.join(_STAGES, "clip", "export"),
        "ldm.precompute_dir": os.path.join(_STAGES, "ldm_latents"),
        "ldm.train_text_encoder": False,  # the frozen tower the committed results were measured with
        "model.layers_per_block": 2,      # and the U-Net depth (the full preset has had 1 since commit 27b7433)
        "sample.shapes_evaluator": _EVALUATOR,
        "sample.shapes_eval_prompts": 128,
        "total_steps": 600,
        "optim.warmup_steps": 100,
        "eval_every_steps": 600,
        "sample_every_steps": 600,
        "save_every_steps": 300,
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
    description=("epsilon vs v-prediction × min-SNR-γ (0 / 5) × 2 seeds: the full shapes U-Net, 600 steps on a full "
                 "run's frozen VAE / text tower and precomputed latents; guidance scale 1..9 for the best group by "
                 "held-out (test split) shapes accuracy."),
)
