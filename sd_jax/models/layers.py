"""Shared Flax Linen layers for the U-Net, VAE and text towers.

Numerics and parameter names follow diffusers (PyTorch) so that its checkpoints map onto these modules by a key
rename plus a layout transpose:

* indexed PyTorch submodules (`to_out.0`, `net.2`, `resnets.1`) are Flax names with an `_N` suffix
  (`to_out_0`, `net_2`, `resnets_1`);
* Dense kernels are [in, out] (PyTorch Linear weight transposed); Conv kernels are HWIO (PyTorch OIHW transposed
  (2, 3, 1, 0)); norm `weight` is Flax `scale`.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) from this vocabulary, which the
trainer's `logical_axis_rules` map to mesh axes:
  conv kernels ("conv_h", "conv_w", "conv_in", "conv_out"), conv biases ("conv_out",);
  dense kernels ("embed", "heads") / ("heads", "embed") in attention, ("embed", "mlp") / ("mlp", "embed")
  elsewhere, biases take the output axis; norm scale/bias ("norm",); embedding tables ("vocab", "embed").
Large activations get `nn.with_logical_constraint` with ("batch", "height", "width", "channels") or
("batch", "length", "embed"); both are no-ops when no axis rules are active.

Layout is NHWC throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import contextlib
import contextvars
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
IMAGE_AXES = ("batch", "height", "width", "channels")  # [B, H, W, C] activations
TOKEN_AXES = ("batch", "length", "embed")  # [B, L, D] activations

# Names accepted by `remat_policy` switches. "none" disables rematerialisation; "full" recomputes everything
# in the backward pass (jax.checkpoint without a policy); the rest are `jax.checkpoint_policies` entries.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Values accepted by the attention-implementation switch. "xla", "cudnn" and None (JAX chooses) go to
# jax.nn.dot_product_attention; "cudnn" needs a GPU and fp16/bf16 inputs. "splash" runs JAX's Pallas splash
# (flash) attention kernel for TPU on sequences of at least `splash_min_seq_len` queries and the "xla" path on
# shorter ones: the [T, S] attention matrix is never materialised, which at 512² (4,096 latent tokens in the U-Net's
# first level and the VAE's middle) is most of the activation memory (BENCHMARKS.md).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", None)
# Queries below which "splash" runs the "xla" path (maxdiffusion's WAN configs set flash_min_seq_length to 4096 too).
SPLASH_MIN_SEQ_LEN = 4096
# On a CPU, the "xla" path attends in blocks of query rows whose float32 logits take at most this many bytes
# (`_attention_query_chunks`) wherever the whole [B, H, T, S] logits would take more: blocks that stay in the
# caches made a mid-size U-Net's train step with 1,024-token attention about a sixth faster on 2 CPU cores
# (BENCHMARKS.md, "Attention in blocks of queries on a CPU"). Other platforms run the plain path (cuDNN and
# splash are their long-sequence kernels). `cpu_attention_block_bytes` changes it while tracing (0: off, as the AOT
# planner does).
CPU_ATTENTION_BLOCK_BYTES = 8 << 20
_CPU_BLOCK_BYTES = contextvars.ContextVar("sd_jax_cpu_attention_block_bytes", default=CPU_ATTENTION_BLOCK_BYTES)
# The fewest query rows in a block: below this the loop's overhead outweighs what the caches save.
_MIN_QUERY_CHUNK = 16
# The widest heads attended in blocks.
_MAX_BLOCKED_HEAD_DIM = 128


@contextlib.contextmanager
def cpu_attention_block_bytes(max_bytes: int):
  """While tracing under this context, the "xla" attention path's CPU blocks hold at most `max_bytes` of logits
  (0: no blocks, the whole logits at once, as on other platforms)."""
  token = _CPU_BLOCK_BYTES.set(int(max_bytes))
  try:
    yield
  finally:
    _CPU_BLOCK_BYTES.reset(token)


def cpu_query_chunk(batch: int, heads: int, queries: int, keys: int, head_dim: int,
                    max_bytes: int | None = None) -> int:
  """The query rows per block for the CPU's "xla" attention: 0 (no blocks) when the whole float32 logits fit in
  `max_bytes` (default: the current `cpu_attention_block_bytes`, 8 MiB), the heads are wider than 128 (the VAE's
  one head of 512: its matmuls are large already, and blocks measured no faster) or the rows do not halve into
  blocks; otherwise the largest block of `queries` / 2^k rows within `max_bytes`, and no fewer than 16 rows."""
  max_bytes = _CPU_BLOCK_BYTES.get() if max_bytes is None else max_bytes
  row_bytes = batch * heads * keys * 4
  if max_bytes <= 0 or queries * row_bytes <= max_bytes or head_dim > _MAX_BLOCKED_HEAD_DIM:
    return 0
  chunk = queries
  while chunk % 2 == 0 and chunk // 2 >= _MIN_QUERY_CHUNK and chunk * row_bytes > max_bytes:
    chunk //= 2
  return chunk if chunk < queries else 0


# ----------------------------------------------------------------------------------------------------------------
# Functions


def timestep_embedding(
    timesteps: Array,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    *,
    scale: float = 1.0,
    max_period: int = 10000,
) -> Array:
  """Sinusoidal timestep embedding, identical to diffusers' `get_timestep_embedding`.

  Args:
    timesteps: [B] (or scalar) timesteps; may be fractional.
    dim: embedding width.
    flip_sin_to_cos: put the cosines first (SD / DDPM-in-diffusers: True).
    downscale_freq_shift: the frequencies are exp(-log(max_period) * i / (dim // 2 - shift)); SD uses 0.
    scale: multiplier on the arguments.
    max_period: controls the lowest frequency.

  Returns:
    float32 [B, dim] embedding.
  """
  timesteps = jnp.atleast_1d(jnp.asarray(timesteps)).astype(jnp.float32)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be a scalar or 1-D, got shape {timesteps.shape}")
  half_dim = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32) / (half_dim - downscale_freq_shift)
  args = scale * timesteps[:, None] * jnp.exp(exponent)[None, :]  # [B, half_dim]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    scale: float | None = None,
    upcast: bool = False,
    implementation: str | None = "xla",
    splash_min_seq_len: int = SPLASH_MIN_SEQ_LEN,
) -> Array:
  """Multi-head attention over [B, L, H, D] inputs via `jax.nn.dot_product_attention`.

  Args:
    query: [B, T, H, D].
    key, value: [B, S, H, D].
    mask: optional boolean mask broadcastable to [B, H, T, S]; True = attend.
    scale: logit scale; default 1/sqrt(D).
    upcast: compute in float32 (diffusers' `upcast_attention`, needed by SD 2.1-v in half precision). The
      cuDNN kernel already accumulates and takes the softmax in float32 and only accepts fp16/bf16 inputs, so
      the cast is skipped there.
    implementation: "xla", "cudnn", "splash" or None (JAX chooses).
    splash_min_seq_len: with "splash", shorter query sequences take the "xla" path.

  Returns:
    [B, T, H, D] in the query's dtype.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
  out_dtype = query.dtype
  if upcast and implementation != "cudnn":
    query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
  if implementation == "splash":
    if query.shape[1] >= splash_min_seq_len:
      return splash_attention(query, key, value, mask=mask, scale=scale).astype(out_dtype)
    implementation = "xla"
  if implementation == "xla":
    (batch, queries, heads, head_dim), keys = query.shape, key.shape[1]
    chunk = 0 if mask is not None else cpu_query_chunk(batch, heads, queries, keys, head_dim)
    if chunk:  # blocks of queries where this lowers for a CPU, the whole logits elsewhere
      out = jax.lax.platform_dependent(
          query, key, value, cpu=functools.partial(_attention_xla, scale=scale, query_chunk=chunk),
          default=functools.partial(_attention_xla, scale=scale))
    else:
      out = _attention_xla(query, key, value, mask=mask, scale=scale)
    return out.astype(out_dtype)
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)
  return out.astype(out_dtype)


def _attention_xla(query: Array, key: Array, value: Array, *, mask: Array | None = None,
                   scale: float | None = None, query_chunk: int = 0) -> Array:
  """`jax.nn.dot_product_attention(..., implementation="xla")`'s computation (logits and softmax in float32, the
  probabilities in the values' dtype, masked logits at 0.7 × the float32 minimum), with the heads moved in front of
  the sequences before the two matmuls: [B, L, H, D] -> [B, H, L, D]. JAX's own version reshapes the heads into
  groups and vmaps over them, which XLA's CPU code runs slower: on 2 CPU cores, self-attention over 1,024 tokens
  (batch 8, 8 heads of 8) forward + backward 596 -> 418 ms, and the train step of a 33.8 M SD-shaped U-Net at 32×32
  latents 2.08 -> 1.27 s (BENCHMARKS.md, "Attention: the heads in front of the sequences")."""
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))
  if mask is None and query_chunk and q.shape[2] > query_chunk and q.shape[2] % query_chunk == 0:
    return jnp.swapaxes(_attention_query_chunks(q, k, v, float(scale), int(query_chunk)), 1, 2)
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.float32(0.7 * float(jnp.finfo(jnp.float32).min)))
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", probs, v), 1, 2)


def _chunk_rows(t: Array, chunk: int) -> Array:
  """[B, H, T, ...] -> [T / chunk, B, H, chunk, ...]: the query rows in blocks, blocks first (for scan / map)."""
  b, h, n = t.shape[:3]
  return jnp.moveaxis(t.reshape(b, h, n // chunk, chunk, *t.shape[3:]), 2, 0)


def _unchunk_rows(t: Array) -> Array:
  """The inverse of `_chunk_rows`."""
  t = jnp.moveaxis(t, 0, 2)
  return t.reshape(*t.shape[:2], t.shape[2] * t.shape[3], *t.shape[4:])


def _query_chunks_forward(q: Array, k: Array, v: Array, scale: float, chunk: int) -> tuple[Array, Array]:
  """Attention over [B, H, T, D] queries, `chunk` query rows at a time: each block's logits ([B, H, chunk, S],
  float32) are made, soft-maxed and used at once, so no [T, S] array exists. Returns the output and each row's
  log-sum-exp of the logits (float32), which is all the backward pass needs to rebuild a block's probabilities.
  The matmuls run in float32 (see the backward pass), the probabilities rounded to the values' dtype."""
  out_dtype = v.dtype
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))

  def block(q_block):
    logits = jnp.einsum("bhtd,bhsd->bhts", q_block, k) * jnp.float32(scale)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = (unnormalised / total).astype(out_dtype).astype(jnp.float32)
    return jnp.einsum("bhts,bhsd->bhtd", probs, v).astype(out_dtype), (peak + jnp.log(total))[..., 0]
  out, lse = jax.lax.map(block, _chunk_rows(q, chunk))
  return _unchunk_rows(out), _unchunk_rows(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_query_chunks(q: Array, k: Array, v: Array, scale: float, chunk: int) -> Array:
  """`_attention_xla` without a mask, `chunk` query rows at a time in the forward and the backward pass ([B, H, L, D]
  in and out). The same arithmetic (float32 logits and softmax, the probabilities in the values' dtype) in
  blocks that stay in the CPU's caches; the backward pass rebuilds each block's probabilities from the saved
  log-sum-exp instead of keeping the [T, S] probabilities (Rabe & Staats 2021, "Self-attention does not need
  O(n²) memory"; FlashAttention's backward)."""
  return _query_chunks_forward(q, k, v, scale, chunk)[0]


def _attention_query_chunks_fwd(q, k, v, scale, chunk):
  out, lse = _query_chunks_forward(q, k, v, scale, chunk)
  return out, (q, k, v, lse)


def _attention_query_chunks_bwd(scale, chunk, residuals, d_out):
  q, k, v, lse = residuals
  dtypes = q.dtype, k.dtype, v.dtype
  # In float32 (XLA's CPU runtime has no bfloat16 x bfloat16 -> float32 kernel for some matmuls inside the loop),
  # with the probabilities and the gradient of the logits rounded to the inputs' dtype as the plain path does.
  q, k, v, d_out = (t.astype(jnp.float32) for t in (q, k, v, d_out))
  # Each block works on the transposed logits, [B, H, S, chunk]: then every matmul below contracts the last axis of
  # its first operand with the second axis from the end of its second (k's transpose is made once, outside the
  # loop), the forms XLA's CPU code runs fast; contracting the rows of both operands (P^T dO as einsum
  # "bhts,bhtd->bhsd") ran at a tenth of the speed inside the loop.
  k_t = jnp.swapaxes(k, 2, 3)

  def rounded(t, dtype):
    return t.astype(dtype).astype(jnp.float32)

  def block(carry, xs):
    dk, dv = carry
    q_block, d_out_block, lse_block = xs
    logits_t = jnp.einsum("bhsd,bhtd->bhst", k, q_block) * jnp.float32(scale)
    probs_t = jnp.exp(logits_t - lse_block[:, :, None, :])
    dv = dv + jnp.einsum("bhst,bhtd->bhsd", rounded(probs_t, dtypes[2]), d_out_block)
    d_probs_t = rounded(jnp.einsum("bhsd,bhtd->bhst", v, d_out_block), dtypes[2])
    d_logits_t = probs_t * (d_probs_t - jnp.sum(probs_t * d_probs_t, axis=2, keepdims=True))  # the softmax's VJP
    d_logits_t = rounded(d_logits_t * jnp.float32(scale), dtypes[0])
    dk = dk + jnp.einsum("bhst,bhtd->bhsd", d_logits_t, q_block)
    dq_t = jnp.einsum("bhds,bhst->bhdt", k_t, d_logits_t)
    return (dk, dv), jnp.swapaxes(dq_t, 2, 3).astype(dtypes[0])

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  blocks = tuple(_chunk_rows(t, chunk) for t in (q, d_out, lse))
  (dk, dv), dq = jax.lax.scan(block, zeros, blocks)
  return _unchunk_rows(dq), dk.astype(dtypes[1]), dv.astype(dtypes[2])


_attention_query_chunks.defvjp(_attention_query_chunks_fwd, _attention_query_chunks_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Splash (flash) attention: JAX's Pallas TPU kernel


@dataclasses.dataclass(frozen=True)
class _SplashContext:
  mesh: jax.sharding.Mesh | None = None
  batch_axes: tuple[str, ...] = ()
  interpret: bool = False


_SPLASH = contextvars.ContextVar("sd_jax_splash", default=_SplashContext())


@contextlib.contextmanager
def splash_mesh(mesh: jax.sharding.Mesh, batch_axes: Sequence[str]):
  """While tracing under this context, splash attention runs per device (shard_map) over `mesh` with the batch
  split over `batch_axes`: a Pallas kernel is opaque to XLA's partitioner, which would otherwise gather every
  operand onto every device. The training step enters it (train.jit_train_step)."""
  token = _SPLASH.set(dataclasses.replace(_SPLASH.get(), mesh=mesh, batch_axes=tuple(batch_axes)))
  try:
    yield
  finally:
    _SPLASH.reset(token)


@contextlib.contextmanager
def pallas_interpret():
  """Splash attention traced under this context runs in Pallas' interpret mode (any backend, e.g. the CPU in
  tests): the same kernel, block by block, as ordinary JAX operations."""
  token = _SPLASH.set(dataclasses.replace(_SPLASH.get(), interpret=True))
  try:
    yield
  finally:
    _SPLASH.reset(token)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_block(length: int) -> int:
  """The kernel's block along a sequence of `length`: 512 (a multiple of the TPU's 128 lanes), or the whole
  sequence rounded up to 128 when shorter."""
  return min(512, _round_up(length, 128))


def splash_attention(query: Array, key: Array, value: Array, *, mask: Array | None = None,
                     scale: float | None = None) -> Array:
  """`dot_product_attention` through `jax.experimental.pallas.ops.tpu.splash_attention`.

  [B, T, H, D] queries, [B, S, H, D] keys and values. The sequences are padded to whole blocks (`splash_block`) and
  the head dimension to the TPU's 128 lanes (zeros: no change to q·k, zero columns of the output, sliced off);
  padded keys, and keys a [B, 1, 1, S] padding mask removes, get segment id 1 and the queries 0, so no query
  attends to them. Other masks are refused."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  ctx = _SPLASH.get()
  platform = ctx.mesh.devices.flat[0].platform if ctx.mesh is not None else jax.default_backend()
  if platform != "tpu" and not ctx.interpret:
    raise ValueError(f"attention_impl='splash' runs a Pallas TPU kernel, and this program is for {platform}: use "
                     "attention_impl='xla' (or 'cudnn' on a GPU); tests run the kernel in interpret mode "
                     "(layers.pallas_interpret()).")
  batch, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  if mask is not None:
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != kv_len:
      raise ValueError(f"splash attention takes a key-padding mask of shape [B, 1, 1, S]; got {mask.shape}. "
                       "Use attention_impl='xla' for other masks.")
    key_valid = jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (batch, kv_len))
  else:
    key_valid = jnp.ones((batch, kv_len), bool)
  scale = head_dim**-0.5 if scale is None else scale
  block_q, block_kv = splash_block(q_len), splash_block(kv_len)
  q_pad, kv_pad = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
  d_pad = _round_up(head_dim, 128)

  def to_kernel(t, length):  # [B, L, H, D] -> [B, H, L_pad, D_pad]
    t = jnp.swapaxes(t, 1, 2)
    return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, d_pad - head_dim)))

  q = to_kernel(query * jnp.asarray(scale, query.dtype), q_pad)
  k, v = to_kernel(key, kv_pad), to_kernel(value, kv_pad)
  kv_segments = jnp.pad(~key_valid, ((0, 0), (0, kv_pad - kv_len)), constant_values=True).astype(jnp.int32)
  q_segments = jnp.zeros((batch, q_pad), jnp.int32)

  block_sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                  block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                  block_q_dq=block_q, block_kv_dq=block_kv)
  full = splash.MultiHeadMask([splash.FullMask((q_pad, kv_pad))] * heads)
  kernel = splash.make_splash_mha(full, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                  interpret=ctx.interpret)

  def attend(q, k, v, q_segments, kv_segments):  # one device's share of the batch
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
        q, k, v, q_segments, kv_segments)

  axes = tuple(a for a in ctx.batch_axes if ctx.mesh is not None and ctx.mesh.shape[a] > 1)
  if axes:
    split = int(np.prod([ctx.mesh.shape[a] for a in axes]))
    spec = jax.sharding.PartitionSpec(axes if batch % split == 0 else None)  # else each device does all of it
    attend = jax.shard_map(attend, mesh=ctx.mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
  out = attend(q, k, v, q_segments, kv_segments)  # [B, H, T_pad, D_pad]
  return jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2)


def activation(name: str) -> Callable[[Array], Array]:
  """diffusers `get_activation` names → JAX functions."""
  table = {
      "silu": nn.silu,
      "swish": nn.silu,
      "gelu": lambda x: nn.gelu(x, approximate=False),  # torch F.gelu default is exact (erf)
      "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "relu": nn.relu,
      "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
  return table[name]


def remat(module_cls: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()) -> type[nn.Module]:
  """`nn.remat(module_cls)` with a named policy from REMAT_POLICIES; "none" returns the class unchanged.

  `static_argnums` counts `self` as 0 (Flax convention). Parameter names are unaffected.
  """
  if policy == "none":
    return module_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, got {policy!r}")
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=tuple(static_argnums))


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal(),
) -> nn.Dense:
  """nn.Dense whose kernel [in, out] carries logical `axes` and whose bias carries `axes[-1]`."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
      name=name,
  )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    name: str,
    strides: int = 1,
    padding: int | str | Sequence[tuple[int, int]] | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
  """nn.Conv (NHWC, HWIO kernel) with PyTorch-style symmetric integer padding, default (k - 1) // 2."""
  if padding is None:
    padding = (kernel_size - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features,
      kernel_size=(kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def layer_norm(
    *, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> nn.LayerNorm:
  """torch.nn.LayerNorm numerics (two-pass variance, float32 statistics), params `scale`/`bias`."""
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


# ----------------------------------------------------------------------------------------------------------------
# Modules


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the last (channel) axis; statistics in float32 whatever the compute dtype."""

  num_groups: int = 32  # channels must divide evenly
  epsilon: float = 1e-5  # diffusers: 1e-5 in the U-Net resnets (norm_eps), 1e-6 in Transformer2D and the VAE
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (channels,), self.param_dtype
    )
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (channels,), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    mean = self._group_mean(x32)
    centred = x32 - mean
    var = self._group_mean(jnp.square(centred))  # two passes, as torch: no E[x²] - E[x]² cancellation
    y = centred * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)

  def _group_mean(self, v: Array) -> Array:
    """[B, ..., C] -> [B, 1, ..., C]: for each channel, the mean of `v` over its group's channels and all positions.

    Summed per channel over the positions first (a reduction over the major axes, vectorised along the channels),
    then over each group's channels. Reducing the [B, ..., G, C/G] view over (positions, C/G) at once, as before,
    is the same sum in another order and took XLA's CPU code 2-4.5x longer (32×32×64 at batch 8: 3.6 -> 0.8 ms;
    2026-12-04, machine F)."""
    batch, channels = v.shape[0], v.shape[-1]
    positions = tuple(range(1, v.ndim - 1))
    per_group = channels // self.num_groups
    sums = v.sum(axis=positions).reshape(batch, self.num_groups, per_group).sum(axis=-1, keepdims=True)
    means = sums / (math.prod(v.shape[1:-1]) * per_group)
    means = jnp.broadcast_to(means, (batch, self.num_groups, per_group)).reshape(batch, channels)
    return means.reshape(batch, *(1,) * len(positions), channels)


class Attention(nn.Module):
  """diffusers `Attention` (AttnProcessor2_0 semantics): params `to_q`, `to_k`, `to_v`, `to_out_0`, and
  `group_norm` when `norm_num_groups` is set (the pixel-space `AttnDownBlock2D`/VAE mid-block form).

  Input is [B, L, C] or [B, H, W, C] (flattened to tokens and restored). `context` [B, S, C'] gives
  cross-attention; None gives self-attention.
  """

  heads: int
  dim_head: int
  out_dim: int | None = None  # default: the input channels
  bias: bool = False  # bias on to_q/to_k/to_v
  out_bias: bool = True
  norm_num_groups: int | None = None  # GroupNorm over the input before the projections
  eps: float = 1e-5  # group_norm epsilon
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  upcast_attention: bool = False
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  dropout: float = 0.0  # on the output projection
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      hidden_states: Array,
      context: Array | None = None,
      context_mask: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    """context_mask: optional boolean [B, S], True = attend (only used with `context`)."""
    residual = hidden_states
    spatial_shape = None
    if hidden_states.ndim == 4:
      spatial_shape = hidden_states.shape
      hidden_states = hidden_states.reshape(spatial_shape[0], -1, spatial_shape[-1])
    batch, length, channels = hidden_states.shape
    if self.norm_num_groups is not None:
      hidden_states = GroupNorm(
          self.norm_num_groups, self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="group_norm"
      )(hidden_states)
    hidden_states = hidden_states.astype(self.dtype)
    kv_input = hidden_states if context is None else context.astype(self.dtype)

    inner = self.heads * self.dim_head
    proj = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)
    query = dense(inner, ("embed", "heads"), name="to_q", **proj)(hidden_states)
    key = dense(inner, ("embed", "heads"), name="to_k", **proj)(kv_input)
    value = dense(inner, ("embed", "heads"), name="to_v", **proj)(kv_input)
    query, key, value = (t.reshape(batch, t.shape[1], self.heads, self.dim_head) for t in (query, key, value))

    mask = None
    if context is not None and context_mask is not None:
      mask = context_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    out = dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        scale=self.dim_head**-0.5,
        upcast=self.upcast_attention,
        implementation=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
    )
    out = out.reshape(batch, length, inner)
    out = dense(
        self.out_dim or channels,
        ("heads", "embed"),
        name="to_out_0",
        use_bias=self.out_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(out)
    out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
    if spatial_shape is not None:
      out = out.reshape(*spatial_shape[:-1], out.shape[-1])
    if self.residual_connection:
      out = out + residual.astype(out.dtype)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nn.Module):
  """diffusers GEGLU: `proj` to 2 * dim_out, split into (hidden, gate), return hidden * gelu(gate)."""

  dim_out: int
  approximate: bool = False  # exact erf GELU as torch's F.gelu default
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = dense(2 * self.dim_out, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    hidden, gate = jnp.split(x, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=self.approximate)


class GELUProj(nn.Module):
  """diffusers GELU activation module: `proj` then gelu."""

  dim_out: int
  approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = dense(self.dim_out, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return nn.gelu(x, approximate=self.approximate)


class FeedForward(nn.Module):
  """diffusers FeedForward: `net_0` (GEGLU/GELU with `proj`), dropout, `net_2` Dense back to `dim_out`."""

  dim_out: int | None = None  # default: input width
  mult: int = 4
  inner_dim: int | None = None  # default: mult * input width
  activation_fn: str = "geglu"  # "geglu" | "geglu-approximate" | "gelu" | "gelu-approximate"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dim = x.shape[-1]
    inner = self.inner_dim or dim * self.mult
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation_fn in ("geglu", "geglu-approximate"):
      act = GEGLU(inner, approximate=self.activation_fn.endswith("approximate"), name="net_0", **kw)
    elif self.activation_fn in ("gelu", "gelu-approximate"):
      act = GELUProj(inner, approximate=self.activation_fn.endswith("approximate"), name="net_0", **kw)
    else:
      raise ValueError(f"unsupported activation_fn {self.activation_fn!r}")
    x = act(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return dense(self.dim_out or dim, ("mlp", "embed"), name="net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock (norm_type "layer_norm"): pre-LN self-attention, cross-attention and
  GEGLU feed-forward, each added back to the residual stream. Params: norm1, attn1, norm2, attn2, norm3, ff.
  """

  num_attention_heads: int
  attention_head_dim: int
  cross_attention_dim: int | None = None  # None: no attn2/norm2 (self-attention only)
  only_cross_attention: bool = False  # attn1 attends to the context too
  upcast_attention: bool = False
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      hidden_states: Array,
      context: Array | None = None,
      context_mask: Array | None = None,
      deterministic: bool = True,
  ) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(
        heads=self.num_attention_heads,
        dim_head=self.attention_head_dim,
        upcast_attention=self.upcast_attention,
        attention_impl=self.attention_impl,
        splash_min_seq_len=self.splash_min_seq_len,
        dropout=self.dropout,
        **kw,
    )
    if context is not None and self.cross_attention_dim is not None and context.shape[-1] != self.cross_attention_dim:
      raise ValueError(f"context width {context.shape[-1]} != cross_attention_dim {self.cross_attention_dim}")

    norm = layer_norm(name="norm1", epsilon=self.norm_eps, **kw)(hidden_states)
    attn1_context = context if self.only_cross_attention else None
    hidden_states = Attention(name="attn1", **attn_kw)(norm, attn1_context, context_mask, deterministic) + hidden_states

    if self.cross_attention_dim is not None:
      if context is None:
        raise ValueError("this transformer block has cross-attention: pass a context (encoder_hidden_states)")
      norm = layer_norm(name="norm2", epsilon=self.norm_eps, **kw)(hidden_states)
      hidden_states = Attention(name="attn2", **attn_kw)(norm, context, context_mask, deterministic) + hidden_states

    norm = layer_norm(name="norm3", epsilon=self.norm_eps, **kw)(hidden_states)
    hidden_states = FeedForward(dropout=self.dropout, name="ff", **kw)(norm, deterministic) + hidden_states
    return nn.with_logical_constraint(hidden_states, TOKEN_AXES)


class Transformer2DModel(nn.Module):
  """diffusers Transformer2DModel for continuous (image) input: GroupNorm(eps 1e-6) → proj_in (1×1 conv, or
  Dense when `use_linear_projection`) → BasicTransformerBlocks over H*W tokens → proj_out, plus the input.
  Params: norm, proj_in, transformer_blocks_{i}, proj_out.
  """

  num_attention_heads: int
  attention_head_dim: int
  num_layers: int = 1
  cross_attention_dim: int | None = None
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  dropout: float = 0.0
  attention_impl: str | None = "xla"
  splash_min_seq_len: int = SPLASH_MIN_SEQ_LEN  # "splash": shorter query sequences take the "xla" path
  remat_policy: str = "none"  # applied to each BasicTransformerBlock
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      hidden_states: Array,  # [B, H, W, C]
      context: Array | None = None,  # [B, S, D]
      context_mask: Array | None = None,  # [B, S] bool
      deterministic: bool = True,
  ) -> Array:
    batch, height, width, channels = hidden_states.shape
    inner = self.num_attention_heads * self.attention_head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = hidden_states

    h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(hidden_states)
    # A 1x1 conv and a Dense are the same map on NHWC; only the kernel shape differs ([1,1,C,I] vs [C,I]).
    if self.use_linear_projection:
      h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h.reshape(batch, height * width, channels))
    else:
      h = conv(inner, 1, name="proj_in", **kw)(h).reshape(batch, height * width, inner)
    h = nn.with_logical_constraint(h, TOKEN_AXES)

    block_cls = remat(BasicTransformerBlock, self.remat_policy, static_argnums=(4,))
    for i in range(self.num_layers):
      h = block_cls(
          num_attention_heads=self.num_attention_heads,
          attention_head_dim=self.attention_head_dim,
          cross_attention_dim=self.cross_attention_dim,
          only_cross_attention=self.only_cross_attention,
          upcast_attention=self.upcast_attention,
          dropout=self.dropout,
          attention_impl=self.attention_impl,
          splash_min_seq_len=self.splash_min_seq_len,
          name=f"transformer_blocks_{i}",
          **kw,
      )(h, context, context_mask, deterministic)

    if self.use_linear_projection:
      h = dense(channels, ("mlp", "embed"), name="proj_out", **kw)(h).reshape(batch, height, width, channels)
    else:
      h = conv(channels, 1, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
    return h + residual.astype(h.dtype)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D: norm1 → act → conv1 (+ time_emb_proj(act(temb))) → norm2 → act → dropout → conv2,
  plus the input (through the 1×1 `conv_shortcut` when channels change), divided by output_scale_factor.
  `temb` None means no time embedding (as in the VAE), and no `time_emb_proj` parameter is created.
  """

  out_channels: int | None = None  # default: input channels
  groups: int = 32
  groups_out: int | None = None  # default: groups
  eps: float = 1e-6
  dropout: float = 0.0
  time_embedding_norm: str = "default"  # "default" (add) | "scale_shift"
  non_linearity: str = "silu"
  output_scale_factor: float = 1.0
  use_in_shortcut: bool | None = None  # default: in != out
  conv_shortcut_bias: bool = True
  skip_time_act: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, deterministic: bool = True) -> Array:
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    act = activation(self.non_linearity)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      if self.time_embedding_norm not in ("default", "scale_shift"):
        raise ValueError(f"unsupported time_embedding_norm {self.time_embedding_norm!r}")
      t = temb.astype(self.dtype) if self.skip_time_act else act(temb.astype(self.dtype))
      width = out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
      t = dense(width, ("embed", "mlp"), name="time_emb_proj", **kw)(t)[:, None, None, :]
    norm2 = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)
    if temb is not None and self.time_embedding_norm == "scale_shift":
      scale, shift = jnp.split(t, 2, axis=-1)
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + t if temb is not None else h)
    h = nn.Dropout(self.dropout)(act(h), deterministic=deterministic)
    h = conv(out_channels, 3, name="conv2", **kw)(h)

    use_shortcut = self.use_in_shortcut if self.use_in_shortcut is not None else in_channels != out_channels
    if use_shortcut:
      x = conv(out_channels, 1, name="conv_shortcut", use_bias=self.conv_shortcut_bias, **kw)(x)
    out = (x.astype(h.dtype) + h) / self.output_scale_factor
    return nn.with_logical_constraint(out, IMAGE_AXES)


class Downsample2D(nn.Module):
  """diffusers Downsample2D: 3×3 stride-2 `conv` with `padding` on all sides, or with padding 0 the
  (right, bottom) one-pixel zero pad first (VAE encoder). `use_conv=False` is a 2×2 average pool.
  """

  out_channels: int | None = None
  use_conv: bool = True
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.use_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(
        self.out_channels or x.shape[-1],
        3,
        strides=2,
        padding=self.padding,
        name="conv",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(x)


def nearest_resize(x: Array, size: tuple[int, int]) -> Array:
  """torch `F.interpolate(mode="nearest")` to `size` on NHWC: source index floor(dst * in / out)."""
  in_h, in_w = x.shape[1:3]
  out_h, out_w = size
  if (out_h, out_w) == (2 * in_h, 2 * in_w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (jnp.arange(out_h) * in_h) // out_h
  cols = (jnp.arange(out_w) * in_w) // out_w
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """diffusers Upsample2D: nearest ×2 (or to `output_size`) then a 3×3 `conv` when `use_conv`."""

  out_channels: int | None = None
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, output_size: tuple[int, int] | None = None) -> Array:
    size = output_size or (2 * x.shape[1], 2 * x.shape[2])
    x = nearest_resize(x, tuple(size))
    if not self.use_conv:
      return x
    return conv(
        self.out_channels or x.shape[-1], 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
    )(x)


class TimestepEmbedding(nn.Module):
  """diffusers TimestepEmbedding: `linear_1` → act → `linear_2`."""

  time_embed_dim: int
  out_dim: int | None = None  # default: time_embed_dim
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.time_embed_dim, ("embed", "mlp"), name="linear_1", **kw)(x)
    x = activation(self.act_fn)(x)
    return dense(self.out_dim or self.time_embed_dim, ("mlp", "embed"), name="linear_2", **kw)(x)


def normalize_field(value: Any) -> Any:
  """Lists (from JSON / ml_collections) -> tuples so a module stays hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(normalize_field(v) for v in value)
  return value


def check_module_fields(cfg: Mapping[str, Any], fields: frozenset, what: str) -> dict[str, Any]:
  """Module config dict with unknown keys rejected, lists as tuples and dtype names as dtypes."""
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"unknown {what} config keys {unknown}; valid keys: {sorted(fields)}")
  out = {k: normalize_field(v) for k, v in cfg.items()}
  for key in ("dtype", "param_dtype"):
    if key in out and out[key] is not None:
      out[key] = jnp.dtype(out[key])  # accepts "bfloat16", jnp.bfloat16, np.dtype
  return out
