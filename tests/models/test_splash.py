"""Splash (flash) attention: JAX's Pallas TPU kernel, run here in Pallas' interpret mode, against the XLA path.

The kernel runs block by block with an online softmax, so it agrees with the XLA path to float32 rounding, not
bitwise; the gradients go through the kernel's own backward pass (dq and dk/dv kernels), not through autodiff of
the forward.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models import layers
from sd_jax.models.unet import create_unet
from tests.models.test_unet import make_inputs, numpy_params

TOL = dict(rtol=2e-5, atol=2e-5)


def qkv(batch=2, q_len=300, kv_len=300, heads=2, head_dim=40, seed=0):
  """Lengths that are not whole 128-blocks and a head dimension below the TPU's 128 lanes: the padding is tested."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, heads, head_dim))
  k, v = (rng.standard_normal((batch, kv_len, heads, head_dim)) for _ in range(2))
  return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v))


def attention(implementation, mask=None, min_len=1):
  def fn(q, k, v):
    return layers.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                        splash_min_seq_len=min_len)
  return fn


def loss_and_grads(fn, q, k, v):
  cotangent = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape[:3] + (v.shape[-1],)), jnp.float32)
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("kv_len, masked", [(300, False), (77, True)], ids=["self", "cross-with-padding-mask"])
def test_splash_equals_the_xla_path_forward_and_gradients(kv_len, masked):
  q, k, v = qkv(kv_len=kv_len)
  mask = None
  if masked:  # the second example's context is 40 tokens long, the rest padding
    valid = np.ones((2, kv_len), bool)
    valid[1, 40:] = False
    mask = jnp.asarray(valid)[:, None, None, :]
  with layers.pallas_interpret():
    out = jax.jit(attention("splash", mask))(q, k, v)
    loss, grads = loss_and_grads(attention("splash", mask), q, k, v)
  ref_out = attention("xla", mask)(q, k, v)
  ref_loss, ref_grads = loss_and_grads(attention("xla", mask), q, k, v)
  np.testing.assert_allclose(out, ref_out, **TOL)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name, g, ref in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, ref, **TOL, err_msg=f"d{name}")
  if masked:  # the masked keys get no gradient
    assert not np.any(np.asarray(grads[1])[1, 40:]) and not np.any(np.asarray(grads[2])[1, 40:])


def test_shorter_sequences_than_the_minimum_take_the_xla_path_and_longer_ones_the_kernel():
  q, k, v = qkv(batch=1, q_len=200, kv_len=200)
  short = jax.make_jaxpr(attention("splash", min_len=201))(q, k, v)
  with layers.pallas_interpret():
    long = jax.make_jaxpr(attention("splash", min_len=200))(q, k, v)
  assert "pallas_call" not in str(short)
  assert str(short) == str(jax.make_jaxpr(attention("xla"))(q, k, v))
  assert "pallas_call" in str(long)


def test_splash_off_tpu_without_interpret_mode_and_other_masks_are_refused_with_what_to_use():
  q, k, v = qkv(batch=1, q_len=128, kv_len=128)
  with pytest.raises(ValueError, match=r"Pallas TPU kernel.*program is for cpu.*attention_impl='xla'"):
    attention("splash")(q, k, v)
  causal = jnp.tril(jnp.ones((128, 128), bool))[None, None]
  with layers.pallas_interpret(), pytest.raises(ValueError, match=r"key-padding mask of shape \[B, 1, 1, S\]"):
    attention("splash", mask=causal)(q, k, v)
  with pytest.raises(ValueError, match="attention implementation must be one of"):
    attention("flash")(q, k, v)


def test_under_a_mesh_the_kernel_runs_per_device_on_its_share_of_the_batch():
  """splash_mesh (entered by the train step): shard_map over the batch axes, so XLA gathers no operand; the result
  is the single-device one."""
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("fsdp", "data")))
  q, k, v = (jax.device_put(t, sharding) for t in qkv(batch=8, q_len=130, kv_len=130, heads=1, head_dim=8))
  with layers.pallas_interpret(), layers.splash_mesh(mesh, ("fsdp", "data")):
    fn = jax.jit(attention("splash"), in_shardings=(sharding,) * 3, out_shardings=sharding)
    hlo = fn.lower(q, k, v).compile().as_text()
    out = fn(q, k, v)
  with layers.pallas_interpret():
    single = jax.jit(attention("splash"))(*(jax.device_get(t) for t in (q, k, v)))
  assert not re.search(r"all-gather|all-to-all|collective-permute", hlo)
  np.testing.assert_allclose(out, single, rtol=1e-6, atol=1e-6)


def test_a_unet_with_splash_in_its_long_levels_matches_the_xla_unet(monkeypatch):
  """The tiny U-Net at 16×16: its first level attends over 256 tokens (the kernel, with min length 256), the middle
  over 64 (the XLA path); the field reaches every attention layer and the outputs agree. (The kernel's gradients:
  test_splash_equals_the_xla_path_forward_and_gradients.)"""
  xla = create_unet("tiny", sample_size=16)
  splash = create_unet("tiny", sample_size=16, attention_impl="splash", splash_min_seq_len=256)
  inputs = make_inputs(xla, size=16)
  params = numpy_params(xla, inputs)
  calls = []
  kernel = layers.splash_attention
  monkeypatch.setattr(layers, "splash_attention", lambda q, k, v, **kw: calls.append(q.shape) or kernel(q, k, v, **kw))
  with layers.pallas_interpret():
    out = jax.jit(lambda p: splash.apply({"params": p}, **inputs))(params)
  ref = jax.jit(lambda p: xla.apply({"params": p}, **inputs))(params)
  # level 1: one transformer down and two up, each with self- and cross-attention, over 16×16 tokens
  assert calls == [(2, 256, 2, 16)] * 6
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_the_vae_middle_attention_takes_splash_through_encoder_and_decoder(monkeypatch):
  """The VAE's field reaches its encoder's and decoder's middle attention (one head over all channels)."""
  from tests.models.test_vae import images, numpy_params as vae_params  # pylint: disable=import-outside-toplevel
  from sd_jax.models.vae import create_vae  # pylint: disable=import-outside-toplevel
  xla = create_vae("tiny")
  splash = create_vae("tiny", attention_impl="splash", splash_min_seq_len=16)
  x = images(1, 16, 16)
  params = vae_params(xla, x)
  calls = []
  kernel = layers.splash_attention
  monkeypatch.setattr(layers, "splash_attention", lambda q, k, v, **kw: calls.append(q.shape) or kernel(q, k, v, **kw))
  with layers.pallas_interpret():
    out = jax.jit(lambda p: splash.apply({"params": p}, x)[0])(params)
  ref = jax.jit(lambda p: xla.apply({"params": p}, x)[0])(params)
  assert calls == [(1, 64, 1, 64)] * 2  # 8×8 latent tokens, one head of 64 channels: encoder, decoder
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
