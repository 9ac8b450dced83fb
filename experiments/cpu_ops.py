"""Per-op CPU timings, JAX against PyTorch, and the cost of a fresh output buffer: where sd_jax's CPU steps go.

  python -m experiments.cpu_ops            # BENCHMARKS.md, "sd_jax beside diffusers/PyTorch on this CPU"

Shapes are the mid-size SD-shaped U-Net's (32×32×4 latents, channels 64/128/256/256) at batch 8, float32, JAX on
one device (jit), torch on its default threads; each number is the median of 10 calls after one. The last lines
time attention forward and forward + backward (JAX's jax.nn path, sd_jax's, torch SDPA), then
`x + 1` on a 268 MB array with a fresh output (the kernel faults the new mapping in page by page) and with the
input donated (no new buffer), with the page faults and kernel time per call: run it with and without
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment (this script, unlike the sd_jax commands, does not restart
itself with it).
Needs the [test] extras (torch).
"""

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

B = 8


def _median_ms(call, n: int = 10) -> float:
  call()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def jax_ms(fn, *args) -> float:
  return _median_ms(lambda: jax.block_until_ready(fn(*args)))


def torch_ms(fn, *args) -> float:
  with torch.no_grad():
    return _median_ms(lambda: fn(*args))


def ops() -> list[tuple[str, float, float]]:
  rng = np.random.default_rng(0)
  rows = []
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for hw, c in ((32, 64), (16, 128), (8, 256), (4, 256)):
    x = rng.standard_normal((B, hw, hw, c), np.float32)
    w = (rng.standard_normal((3, 3, c, c)) / (3 * c ** 0.5)).astype(np.float32)
    xt, wt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    rows.append((f"conv 3x3 {hw}x{hw}x{c}", jax_ms(conv, x, w),
                 torch_ms(lambda x, w: torch.nn.functional.conv2d(x, w, padding=1), xt, wt)))

    def group_norm_silu(x, hw=hw, c=c):
      g = x.reshape(B, hw, hw, 32, c // 32)
      mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
      return jax.nn.silu(((g - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape))
    rows.append((f"GroupNorm(32) + SiLU {hw}x{hw}x{c}", jax_ms(jax.jit(group_norm_silu), x),
                 torch_ms(lambda x: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, eps=1e-5)), xt)))
  for length, width in ((1024, 64), (256, 128), (64, 256)):
    q = rng.standard_normal((B, length, 8, width // 8), np.float32)
    qt = torch.from_numpy(q.transpose(0, 2, 1, 3).copy())
    rows.append((f"self-attention {length} tokens, 8 heads of {width // 8}",
                 jax_ms(jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q)), q),
                 torch_ms(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), qt)))
  return rows


def attention() -> list[tuple[str, float, float, float, float, float, float]]:
  """Attention alone, forward and forward + backward (the gradient of sum(out²) with respect to q, k and v): JAX's
  `jax.nn.dot_product_attention(implementation="xla")`, sd_jax's "xla" path (sd_jax/models/layers.py), torch SDPA.
  Rows: (name, jax.nn fwd, sd_jax fwd, torch fwd, jax.nn fwd+bwd, sd_jax fwd+bwd, torch fwd+bwd), ms."""
  from sd_jax.models import layers
  rng = np.random.default_rng(0)
  rows = []
  for length, context, heads, dim in ((1024, 1024, 8, 8), (1024, 77, 8, 8), (256, 256, 8, 16), (256, 77, 8, 16),
                                      (64, 64, 8, 32)):
    q = rng.standard_normal((B, length, heads, dim), np.float32)
    k, v = (rng.standard_normal((B, context, heads, dim), np.float32) for _ in range(2))
    times = []
    for fn in (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
               lambda q, k, v: layers.dot_product_attention(q, k, v, implementation="xla")):
      grad = jax.grad(lambda q, k, v, fn=fn: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
      times.append((jax_ms(jax.jit(fn), q, k, v), _median_ms(lambda g=jax.jit(grad): jax.block_until_ready(
          g(q, k, v)))))
    qt, kt, vt = (torch.from_numpy(t.transpose(0, 2, 1, 3).copy()) for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch_fwd = torch_ms(sdpa, qt, kt, vt)
    qg, kg, vg = (t.clone().requires_grad_() for t in (qt, kt, vt))

    def torch_grad():
      (sdpa(qg, kg, vg) ** 2).sum().backward()
    name = f"{'self' if context == length else 'cross'}-attention {length}×{context} tokens, {heads} heads of {dim}"
    rows.append((name, times[0][0], times[1][0], torch_fwd, times[0][1], times[1][1], _median_ms(torch_grad)))
  return rows


def fresh_buffer() -> list[str]:
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8, 1024, 1024), np.float32))
  lines = []
  for name, fn in (("fresh output", jax.jit(lambda x: x + 1.0)),
                   ("donated input", jax.jit(lambda x: x + 1.0, donate_argnums=0))):
    y = jax.block_until_ready(fn(x + 0.0))
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(5):
      y = jax.block_until_ready(fn(y))
    after = resource.getrusage(resource.RUSAGE_SELF)
    lines.append(f"x + 1 on 268 MB, {name}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms/call, "
                 f"{(after.ru_minflt - before.ru_minflt) / 5:.0f} page faults/call, "
                 f"{(after.ru_stime - before.ru_stime) / 5 * 1e3:.0f} ms kernel time/call")
  return lines


def main() -> None:
  from sd_jax import machine
  print(f"{'op':44s} {'JAX ms':>8s} {'torch ms':>9s} {'JAX/torch':>9s}")
  for name, a, b in ops():
    print(f"{name:44s} {a:8.2f} {b:9.2f} {a / b:9.2f}")
  print(f"\nbatch {B}, ms: {'jax.nn fwd':>10s} {'sd_jax fwd':>10s} {'torch fwd':>9s} {'jax.nn f+b':>10s} "
        f"{'sd_jax f+b':>10s} {'torch f+b':>9s}")
  for name, *ms in attention():
    print(f"{name:44s} " + " ".join(f"{t:10.1f}" for t in ms))
  print("\n".join(fresh_buffer()))
  print(f"GLIBC_TUNABLES={__import__('os').environ.get('GLIBC_TUNABLES', '')}; {machine.cpu_description()}")


if __name__ == "__main__":
  main()
