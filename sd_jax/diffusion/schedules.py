"""Discrete noise schedules and the eps / v / x0 conversions between them.

The tables are built on the host with NumPy so that they match diffusers' `DDPMScheduler` (PyTorch, float32 on CPU)
as closely as float32 allows: betas are produced the way torch produces them in float32, `alphas_cumprod` is a
cumulative product accumulated in float64 and stored as float32 (what torch's CPU cumprod does for float32), and
`sqrt(alphas_cumprod)` / `sqrt(1 - alphas_cumprod)` are taken in float32 as diffusers' `add_noise` does.

Everything below `make_schedule` is pure `jnp` and jit-friendly. Timesteps `t` are integer arrays of shape [B] (or
scalars); the per-timestep coefficient is broadcast over the trailing dimensions of the sample ([B, H, W, C]).
"""

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@flax.struct.dataclass
class NoiseSchedule:
  """Per-timestep tables of a discrete diffusion process, each float32 [T].

  A pytree: pass it into jitted functions as an argument (its arrays are leaves).
  """

  betas: jnp.ndarray  # β_t, [T]
  alphas: jnp.ndarray  # α_t = 1 - β_t, [T]
  alphas_cumprod: jnp.ndarray  # ᾱ_t = ∏_{s<=t} α_s, [T]
  sqrt_alphas_cumprod: jnp.ndarray  # sqrt(ᾱ_t), [T]
  sqrt_one_minus_alphas_cumprod: jnp.ndarray  # sqrt(1 - ᾱ_t), [T]

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Host-side construction (NumPy).
# ----------------------------------------------------------------------------------------------------------------


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it.

  The kernel works in float32: step = (end - start) / (steps - 1); the first half counts up from `start`, the second
  half counts down from `end` (so both end points are exact). The multiply-add is emulated as a fused one (a single
  rounding), which is what the x86 (-mfma) and ARM builds of that kernel compile to. It differs from a correctly
  rounded float64 linspace by at most one float32 ulp.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step32 = np.float32((end32 - start32) / np.float32(steps - 1))
  idx = np.arange(steps, dtype=np.int64)
  halfway = steps // 2
  # float32 * small int is exact in float64 and so is the sum for the ranges used here: one rounding, as an FMA.
  up = np.float64(start32) + np.float64(step32) * idx
  down = np.float64(end32) - np.float64(step32) * (steps - 1 - idx)
  return np.where(idx < halfway, up, down).astype(np.float32)


def _cumprod_float32(x: np.ndarray) -> np.ndarray:
  # torch's CPU cumprod accumulates float32 inputs in double and rounds each output to float32.
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (2021): β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta), float32 [T].

  Evaluated in float64 Python math per step and rounded to float32, as diffusers does.
  """

  def alpha_bar(time):
    return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = []
  for i in range(num_diffusion_timesteps):
    t1 = i / num_diffusion_timesteps
    t2 = (i + 1) / num_diffusion_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.asarray(betas, dtype=np.float64).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so the last timestep has zero SNR (ᾱ_T = 0) while sqrt(ᾱ_0) is kept.

  Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; float32 throughout,
  operation for operation as diffusers' `rescale_zero_terminal_snr`.
  """
  betas = np.asarray(betas, dtype=np.float32)
  alphas = np.float32(1.0) - betas
  alphas_bar_sqrt = np.sqrt(_cumprod_float32(alphas))

  alphas_bar_sqrt_0 = alphas_bar_sqrt[0].copy()
  alphas_bar_sqrt_T = alphas_bar_sqrt[-1].copy()
  # Shift so the last timestep is zero, then scale so the first timestep is back to its old value.
  alphas_bar_sqrt = alphas_bar_sqrt - alphas_bar_sqrt_T
  alphas_bar_sqrt = alphas_bar_sqrt * (alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T))

  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
  return (np.float32(1.0) - alphas).astype(np.float32)


_rescale_zero_terminal_snr = rescale_zero_terminal_snr  # make_schedule's flag of the same name shadows it.


def shift_snr(betas: np.ndarray, factor: float) -> np.ndarray:
  """Betas whose SNR ᾱ_t / (1 - ᾱ_t) is `factor` times that of `betas` at every t (log-SNR shifted by log factor).

  ᾱ'_t = factor·ᾱ_t / (1 + (factor - 1)·ᾱ_t), then β'_t = 1 - ᾱ'_t / ᾱ'_{t-1}, in float64 and stored as float32.
  The resolution shift of "simple diffusion" (Hoogeboom et al. 2023) and SD3 (Esser et al. 2024), used here in the
  other direction: factor > 1 means less noise at every t, for latents much smaller than the 64×64 a schedule
  was tuned for. factor = 1 returns `betas` unchanged.
  """
  if not factor > 0:
    raise ValueError(f"snr_shift must be > 0, got {factor}.")
  betas = np.asarray(betas, dtype=np.float32)
  if factor == 1:
    return betas
  alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64))
  shifted = factor * alphas_cumprod / (1.0 + (factor - 1.0) * alphas_cumprod)
  previous = np.concatenate([[1.0], shifted[:-1]])
  return (1.0 - shifted / previous).astype(np.float32)


def make_betas(kind: str,
               num_train_timesteps: int = 1000,
               beta_start: float = 0.0001,
               beta_end: float = 0.02) -> np.ndarray:
  """Betas, float32 [T], for a diffusers `beta_schedule` name ("cosine" is an alias of "squaredcos_cap_v2")."""
  if kind == "linear":
    return _torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
  if kind == "scaled_linear":
    # Latent diffusion's schedule: linear in sqrt(β). Squared in float32, as torch does.
    sqrt_betas = _torch_linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
    return sqrt_betas * sqrt_betas
  if kind in ("squaredcos_cap_v2", "cosine"):
    return betas_for_alpha_bar(num_train_timesteps)
  raise ValueError(f"Unknown noise schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}.")


def shifted_betas(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                  snr_shift: float = 1.0) -> np.ndarray:
  """`make_betas` with `shift_snr` applied: the betas a diffusers scheduler gets as `trained_betas` (it applies
  `rescale_betas_zero_snr` after them, as `make_schedule` does)."""
  return shift_snr(make_betas(kind, num_train_timesteps, beta_start, beta_end), snr_shift)


def schedule_from_betas(betas) -> NoiseSchedule:
  """Builds the derived float32 tables from betas (e.g. `trained_betas` from a diffusers scheduler config)."""
  betas = np.asarray(betas, dtype=np.float32)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
  alphas = np.float32(1.0) - betas
  alphas_cumprod = _cumprod_float32(alphas)
  return NoiseSchedule(
      betas=jnp.asarray(betas),
      alphas=jnp.asarray(alphas),
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      sqrt_alphas_cumprod=jnp.asarray(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(np.float32(1.0) - alphas_cumprod)),
  )


def make_schedule(kind: str,
                  num_train_timesteps: int = 1000,
                  beta_start: float = 0.0001,
                  beta_end: float = 0.02,
                  rescale_zero_terminal_snr: bool = False,
                  snr_shift: float = 1.0) -> NoiseSchedule:
  """Makes the schedule diffusers' `DDPMScheduler(beta_schedule=kind, ...)` uses.

  Args:
    kind: "linear", "scaled_linear" (SD 1.x/2.x use beta_start=0.00085, beta_end=0.012) or
      "squaredcos_cap_v2" / "cosine" (beta_start and beta_end are ignored).
    num_train_timesteps: T.
    beta_start: β_0 of the linear schedules.
    beta_end: β_{T-1} of the linear schedules.
    rescale_zero_terminal_snr: rescale to ᾱ_{T-1} = 0 (Lin et al. 2023); pair it with v-prediction, since an
      epsilon model cannot recover x0 at zero SNR.
    snr_shift: multiply the SNR at every t by this (`shift_snr`), before the zero-SNR rescaling. diffusers has no
      such option: a shifted schedule is exported as its `trained_betas` (`shifted_betas`).
  """
  betas = shifted_betas(kind, num_train_timesteps, beta_start, beta_end, snr_shift)
  if rescale_zero_terminal_snr:
    betas = _rescale_zero_terminal_snr(betas)
  return schedule_from_betas(betas)


# ----------------------------------------------------------------------------------------------------------------
# Device-side math (jnp, jit-friendly).
# ----------------------------------------------------------------------------------------------------------------


def _extract(table: jnp.ndarray, t, ndim: int) -> jnp.ndarray:
  """table[t] reshaped to broadcast against a sample of rank `ndim` whose leading dims are t's shape."""
  t = jnp.asarray(t)
  coef = table[t]
  return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def check_prediction_type(prediction_type: str) -> None:
  """Raises ValueError unless prediction_type is one of PREDICTION_TYPES (checked at trace time)."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}.")


def add_noise(schedule: NoiseSchedule, x0, noise, t):
  """q(x_t | x0): x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε. x0, noise [B, ...]; t int [B]."""
  dtype = jnp.result_type(x0, noise)
  a = _extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  s = _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return (a * x0 + s * noise).astype(dtype)


def get_velocity(schedule: NoiseSchedule, x0, noise, t):
  """The v-prediction target (Salimans & Ho 2022): v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0."""
  dtype = jnp.result_type(x0, noise)
  a = _extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  s = _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return (a * noise - s * x0).astype(dtype)


def predict_x0(schedule: NoiseSchedule, x_t, model_output, t, prediction_type: str = "epsilon"):
  """x0 implied by a model output at x_t.

  epsilon: (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)  (undefined where ᾱ = 0, i.e. at a zero-terminal-SNR last step);
  v_prediction: sqrt(ᾱ) x_t - sqrt(1-ᾱ) v̂;  sample: the output itself.
  """
  check_prediction_type(prediction_type)
  dtype = jnp.result_type(x_t, model_output)
  a = _extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  s = _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  if prediction_type == "epsilon":
    x0 = (x_t - s * model_output) / a
  elif prediction_type == "v_prediction":
    x0 = a * x_t - s * model_output
  else:
    x0 = model_output
  return x0.astype(dtype)


def predict_eps(schedule: NoiseSchedule, x_t, model_output, t, prediction_type: str = "epsilon"):
  """ε implied by a model output at x_t.

  epsilon: the output itself;  v_prediction: sqrt(ᾱ) v̂ + sqrt(1-ᾱ) x_t;
  sample: (x_t - sqrt(ᾱ) x̂0) / sqrt(1-ᾱ).
  """
  check_prediction_type(prediction_type)
  dtype = jnp.result_type(x_t, model_output)
  a = _extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  s = _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  if prediction_type == "epsilon":
    eps = model_output
  elif prediction_type == "v_prediction":
    eps = a * model_output + s * x_t
  else:
    eps = (x_t - a * model_output) / s
  return eps.astype(dtype)


def snr(schedule: NoiseSchedule, t):
  """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t), float32 with t's shape.

  Computed as (sqrt(ᾱ) / sqrt(1-ᾱ))², like diffusers' `training_utils.compute_snr`.
  """
  t = jnp.asarray(t)
  return (schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])**2


def schedule_from_config(diffusion_config) -> NoiseSchedule:
  """The training noise schedule of a config's `diffusion` block (schedule, num_train_timesteps, beta_start,
  beta_end, zero_terminal_snr, snr_shift)."""
  d = diffusion_config
  return make_schedule(d["schedule"], num_train_timesteps=d["num_train_timesteps"], beta_start=d["beta_start"],
                       beta_end=d["beta_end"], rescale_zero_terminal_snr=d["zero_terminal_snr"],
                       snr_shift=float(d.get("snr_shift", 1.0)))
