"""The benchmark tool (sd_jax/bench.py) and the analytic FLOP counts (sd_jax/flops.py), on test-sized models."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import bench
from sd_jax import flops
from sd_jax import lora as lora_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from tests import helpers

# One cross-attention level (down, mid, up): the smallest U-Net with every conditioning path, so compiles are short.
_ONE_LEVEL = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
              "model.up_block_types": ("CrossAttnUpBlock2D",)}


def tiny_config(**overrides):
  return helpers.load_config("sd15_ldm", "runlocal", **{**_ONE_LEVEL, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts


def test_single_layer_hand_counts_match_xla():
  # 3×3 conv, 2 images 8×8×3 → 5 channels, no padding: 2 · (6·6 outputs) · (9·3 taps) · 5 per image.
  x, k = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 5))
  assert flops.conv_flops(8, 8, 3, 5, 3, padding=0, batch=2).total == 2 * 2 * 36 * 27 * 5
  for padding, count in (("VALID", 0), ("SAME", 1)):
    fn = jax.jit(lambda x, k, p=padding: jax.lax.conv_general_dilated(
        x, k, (1, 1), p, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    expected = flops.conv_flops(8, 8, 3, 5, 3, padding=count, batch=2, count_padding=False).total
    assert bench.xla_flops(fn.lower(x, k).compile()) == expected
  # With padding, the hardware count includes the taps on the zero border: 8·8·9 vs (8·3 − 2)² = 484 taps.
  assert flops.conv_flops(8, 8, 3, 5, 3, batch=2).total == 2 * 2 * 64 * 27 * 5
  assert flops.conv_flops(8, 8, 3, 5, 3, batch=2, count_padding=False).total == 2 * 2 * 484 * 3 * 5

  # Attention, 2 × 10 queries over 6 keys, 4 heads × 8: q kᵀ and p v are 2 · 10 · 6 · 32 each per example.
  assert flops.attention_flops(2, 10, 6, 32).total == 2 * 2 * (2 * 10 * 6 * 32)
  # A full layer adds the projections: to_q (10 × 16→32), to_k / to_v (6 × 24→32), to_out (32→16).
  layer = flops.attention_layer_flops(2, 10, 16, heads=4, head_dim=8, keys=6, key_dim=24)
  assert layer.dense == 2 * 2 * (10 * 16 * 32 + 2 * 6 * 24 * 32 + 10 * 32 * 16)
  q, kv = jnp.zeros((2, 10, 4, 8)), jnp.zeros((2, 6, 4, 8))
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  xla = bench.xla_flops(fn.lower(q, kv, kv).compile())
  # XLA adds the softmax's elementwise work (scale, max, exp, sum, divide: a few FLOPs per logit) to the matmuls.
  logits = 2 * 4 * 10 * 6
  assert 0 < xla - flops.attention_flops(2, 10, 6, 32).total <= 8 * logits


@pytest.mark.parametrize("name", ["tiny", "tiny_uncond", "sd15"])
def test_unet_count_equals_traced_matmuls(name):
  """The walk over the config equals the dot/conv ops of the traced model, to the FLOP (SD 1.5 traced, not run)."""
  model = unet_lib.create_unet(name)
  inputs = model.example_inputs(2, 77)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), **inputs)["params"]
  traced = flops.jaxpr_matmul_flops(jax.make_jaxpr(lambda p, i: model.apply({"params": p}, **i))(params, inputs))
  analytic = flops.unet_forward_flops(model, 2, context_length=77)
  assert analytic.as_dict() == traced.as_dict()
  if name == "sd15":
    # SD 1.5 at 512² (64×64 latents): ≈ 0.80 TFLOPs per image forward, 2.41 per training example.
    assert flops.unet_forward_flops(model, 1).total == pytest.approx(0.8033e12, rel=1e-3)


def test_vae_decode_count_equals_traced_matmuls():
  vae = vae_lib.create_vae("tiny")
  z = jnp.zeros((2, 8, 8, vae.latent_channels))
  params = jax.eval_shape(vae.init, jax.random.PRNGKey(0), **vae.example_inputs())["params"]
  traced = flops.jaxpr_matmul_flops(jax.make_jaxpr(
      lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, z))
  assert flops.vae_decode_flops(vae, 2, 8).as_dict() == traced.as_dict()


def test_unet_count_close_to_xla_cost_analysis():
  """Independent count: XLA's cost analysis of the compiled forward pass. XLA counts only in-bounds conv taps and
  adds the elementwise work (norms, activations, softmax); with the same tap convention the matmuls are within a
  few percent of its total, and XLA's total is never below them."""
  model = unet_lib.create_unet("tiny", block_out_channels=(64, 64), norm_num_groups=16)
  inputs = model.example_inputs(2, 16)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), **inputs)["params"]
  compiled = jax.jit(lambda p, i: model.apply({"params": p}, **i)).lower(params, inputs).compile()
  xla = bench.xla_flops(compiled)
  analytic = flops.unet_forward_flops(model, 2, context_length=16, count_padding=False).total
  assert analytic <= xla <= 1.10 * analytic
  assert flops.unet_forward_flops(model, 2, context_length=16).total > analytic  # the padded taps


# ---------------------------------------------------------------------------------------------------------------
# Collectives and table plumbing


_HLO = """
HloModule m, num_partitions=8
ENTRY %main {
  %p = f32[1024]{0} parameter(0)
  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %p), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ar2 = (f32[10]{0}, bf16[20,2]{1,0}) all-reduce(f32[10]{0} %a, bf16[20,2]{1,0} %b), replica_groups=[2,4]<=[8], to_apply=%add
  %all-gather = bf16[8,320]{1,0} all-gather(bf16[1,320]{1,0} %x), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %reduce-scatter.3 = f32[40]{0} reduce-scatter(f32[320]{0} %y), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ags = (f32[2]{0}, f32[16]{0}) all-gather-start(f32[2]{0} %z), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f32[16]{0} all-gather-done((f32[2]{0}, f32[16]{0}) %ags)
  %cp = s32[4]{0} collective-permute(s32[4]{0} %w), source_target_pairs={{0,1},{1,0}}
  %q = bf16[64]{0} parameter(1)
  ROOT %all-reduce.9 = bf16[64]{0} all-reduce(%q), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add
  %not-a-collective = f32[4]{0} add(f32[4]{0} %u, f32[4]{0} %v)
}
"""  # noqa: E501 (real HLO lines, kept whole)


def test_collective_parser_on_known_hlo():
  stats = bench.collective_stats(_HLO, num_devices=8)
  ar = stats["all-reduce"]
  assert ar["count"] == 3
  assert ar["operand_bytes"] == ar["result_bytes"] == 4096 + 40 + 80 + 128  # the last operand's type by its name
  # Groups of 8, of 4 (iota [2,4]) and of 4 (mesh axis_0).
  assert ar["traffic_bytes"] == pytest.approx(2 * 7 / 8 * 4096 + 2 * 3 / 4 * 120 + 2 * 3 / 4 * 128)
  ag = stats["all-gather"]
  assert ag["count"] == 2  # the -done half is not counted again
  assert ag["operand_bytes"] == 640 + 8 and ag["result_bytes"] == 5120 + 64
  assert ag["traffic_bytes"] == pytest.approx(7 / 8 * (5120 + 64))
  rs = stats["reduce-scatter"]
  assert (rs["count"], rs["operand_bytes"], rs["result_bytes"]) == (1, 1280, 160)
  assert stats["collective-permute"]["operand_bytes"] == 16
  assert stats["all-to-all"]["count"] == 0


def test_collective_parser_on_compiled_program():
  """A sum over a batch-sharded array needs one all-reduce of the partial sums (f32[128] per device)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sharding)
  compiled = jax.jit(lambda x: jnp.sum(x, axis=0)).lower(x).compile()
  stats = bench.collective_stats(compiled.as_text(), 8)
  reduced = stats["all-reduce"]["operand_bytes"] + stats["reduce-scatter"]["operand_bytes"]
  assert reduced == 128 * 4


def test_peak_table_and_row_appending(tmp_path):
  assert bench.peak_for("NVIDIA H100 80GB HBM3") == ("H100", 989.0)
  assert bench.peak_for("TPU v5 lite") == ("TPU v5e", 197.0)
  assert bench.peak_for("TPU v5p") == ("TPU v5p", 459.0)
  assert bench.peak_for("TPU v6 lite") == ("TPU v6e", 918.0)
  assert bench.peak_for("cpu")[1] is None
  path = tmp_path / "B.md"
  path.write_text("# Benchmarks\n\nSome text.\n")
  bench.append_rows(path, "| a | b |", ["| 1 | 2 |"])
  bench.append_rows(path, "| a | b |", ["| 3 | 4 |"])
  assert path.read_text() == "# Benchmarks\n\nSome text.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n"
  bench.append_rows(path, "| c |", ["| 5 |"], preamble="Other table.")  # a different table starts a new one
  assert path.read_text().endswith("| 4 |\n\nOther table.\n\n| c |\n|---|\n| 5 |\n")


def test_profile_threads_counts_each_threads_covered_time(tmp_path):
  """Per XLA worker thread: the union of its ops' intervals (nested and overlapping events once), collectives
  apart (an op partly inside one counts only outside it); the runtime's spans, Python frames and other threads'
  events left out; and how long the program ran on any worker thread."""
  import gzip
  names = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
           for t, n in ((1, "tf_XLAEigen/1"), (2, "tf_XLAEigen/2"), (3, "tf_XLAPjRtCpuClient/3"))]
  spans = [(1, "ThunkExecutor::Execute", 0, 100), (2, "ThunkExecutor::Execute", 50, 70),
           (1, "fusion.1", 10, 20), (1, "fusion.1.inner", 15, 10),
           (1, "ynn_fusion.2", 40, 10), (1, "all-reduce.3", 60, 30), (1, "Rendezvous", 70, 10), (1, "fusion.6", 85, 10),
           (1, "$bench.py:1 f", 0, 100), (2, "fusion.4", 0, 5), (3, "fusion.5", 0, 1000)]
  events = names + [{"ph": "X", "pid": 1, "tid": t, "name": n, "ts": ts, "dur": dur} for t, n, ts, dur in spans]
  (tmp_path / "p").mkdir()
  with gzip.open(tmp_path / "p" / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert bench.profile_threads(tmp_path, calls=2) == [
      {"thread": "tf_XLAEigen/1", "running_ms_per_call": pytest.approx(0.06), "busy_ms_per_call": pytest.approx(0.0175),
       "collective_ms_per_call": pytest.approx(0.015)},
      {"thread": "tf_XLAEigen/2", "running_ms_per_call": pytest.approx(0.06), "busy_ms_per_call": pytest.approx(0.0025),
       "collective_ms_per_call": 0.0}]


# ---------------------------------------------------------------------------------------------------------------
# The modes


def test_train_mode_end_to_end(tmp_path):
  config = tiny_config()
  m = bench.bench_train(config, steps=2, warmup=1, devices=jax.devices()[:1], profile_dir=str(tmp_path / "profile"))
  assert m.batch == 8 and m.median_s > 0 and m.images_per_s == pytest.approx(8 / m.median_s)
  # --profile_dir: 2 more steps under the profiler; where their time went, per op, largest first.
  profile = m.extra["profile"]
  assert list((tmp_path / "profile").glob("**/perfetto_trace.json.gz")) and len(profile) > 5
  assert [op["ms_per_call"] for op in profile] == sorted((op["ms_per_call"] for op in profile), reverse=True)
  assert any("fusion" in op["name"] or "convolution" in op["name"] for op in profile)  # XLA's own ops
  assert not any(op["name"].startswith("$") for op in profile)  # no Python frames
  # ... and how busy XLA's worker threads were: in ops, and (one device) never in a collective.
  threads = m.extra["threads"]
  assert threads and all("XLAEigen" in t["thread"] for t in threads)
  assert 0 < max(t["busy_ms_per_call"] for t in threads) <= threads[0]["running_ms_per_call"]
  assert all(t["collective_ms_per_call"] == 0 for t in threads)
  for fn in (bench.profile_ops, bench.profile_threads):
    with pytest.raises(FileNotFoundError, match="no perfetto_trace"):
      fn(tmp_path / "out", 1)  # no trace there
  assert np.isfinite(m.extra["loss"])
  # The analytic count is 3 × the forward of the batch's U-Net; XLA counts the same step within its conventions.
  model = unet_lib.create_unet(config.model.to_dict())
  assert m.analytic_flops == 3 * flops.unet_forward_flops(model, 8, context_length=8).total
  assert 0.7 * m.analytic_flops < m.xla_flops < 1.5 * m.analytic_flops
  assert m.mfu is None  # no CPU peak in the table
  out = tmp_path / "BENCHMARKS.md"
  row = bench.measurement_row(m, config_name="configs/sd15_ldm.py:runlocal", command="python -m sd_jax.bench x")
  bench.append_rows(out, bench.MEASURED_HEADER, [row])
  header, separator, written = out.read_text().strip().splitlines()
  assert header == bench.MEASURED_HEADER
  assert written.count("|") == header.count("|") and "| train |" in written and "`python -m sd_jax.bench x`" in written


def test_diffusers_baseline_runs_the_same_unet_and_its_ratio_is_the_two_timings(tmp_path):
  """--baseline=eager: diffusers' U-Net built from the very weights sd_jax started from computes what sd_jax's does
  (so the two timings are of one network), trains on the same batch, and the ratio is its median / sd_jax's."""
  import torch

  from sd_jax import baseline
  config = tiny_config()
  model = unet_lib.create_unet(config.model.to_dict())
  inputs = model.example_inputs(2, 8)
  params = bench.random_params(model, inputs, seed=3)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(inputs["sample"].shape).astype(np.float32)
  t = np.array([10, 900], np.int32)
  context = rng.standard_normal(inputs["encoder_hidden_states"].shape).astype(np.float32)
  want = np.asarray(model.apply({"params": params}, x, t, context))
  net = baseline.torch_unet(model, jax.device_get(params)).eval()
  with torch.no_grad():
    got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64)),
              torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)

  m = bench.bench_train(config, steps=2, warmup=1, devices=jax.devices()[:1], baselines=["eager"])
  b = m.extra["baselines"]["eager"]
  assert len(b["times_s"]) == 2 and b["median_s"] == pytest.approx(float(np.median(b["times_s"])))
  assert b["ratio"] == pytest.approx(b["median_s"] / m.median_s) and np.isfinite(b["loss"]) and b["threads"] >= 1
  row = bench.baseline_row(m, config_name="configs/sd15_ldm.py:runlocal", command="python -m sd_jax.bench y")
  assert row.count("|") == bench.BASELINE_HEADER.count("|")
  assert f"| {m.median_s * 1e3:.1f} | {b['median_s'] * 1e3:.1f} | {b['ratio']:.2f} | not run |" in row
  assert bench.baseline_row(dataclasses.replace(m, extra={}), config_name="c", command="x") is None
  assert baseline.parse_modes("eager,compile") == ["eager", "compile"] and baseline.parse_modes("none") == []
  with pytest.raises(ValueError, match="use eager, compile"):
    baseline.parse_modes("jit")
  with pytest.raises(ValueError, match="an ldm config"):
    bench.bench_train(tiny_config(**{"bench.lora_rank": 2}), steps=1, devices=jax.devices()[:1], baselines=["eager"])


def test_pipeline_mode_times_both_pipelines_on_one_model_and_its_ratio_is_the_two_timings(tmp_path):
  """--mode=pipeline --baseline=eager: sd_jax's TextToImage and diffusers' StableDiffusionPipeline on the same tiny
  model (exported to diffusers' layout for the baseline), the same prompts, steps and size; ratio = its median /
  sd_jax's; the exported copy is removed afterwards."""
  import tempfile

  from tests import helpers
  model = helpers.tiny_text_to_image(tmp_path / "model", ["a red square", "a blue circle"])
  before = set(pathlib.Path(tempfile.gettempdir()).glob("sd_jax_bench_diffusers_*"))
  (m,) = bench.bench_pipeline(model, prompts=["a red square", "a blue circle"], batch_sizes=[3], num_steps=2,
                              steps=2, warmup=1, baselines=["eager"])
  assert set(pathlib.Path(tempfile.gettempdir()).glob("sd_jax_bench_diffusers_*")) == before
  assert m.mode == "pipeline (2 DDIM steps, CFG 7.5, text + VAE decode)" and m.batch == 3
  assert m.extra["images_shape"] == [3, 16, 16, 3] and len(m.extra["times_s"]) == 2
  assert m.median_s == pytest.approx(float(np.median(m.extra["times_s"]))) and m.compile_s > 0
  assert m.analytic_flops > 0
  # As `python -m sd_jax.sample`: data-parallel over the devices where their count divides the batch, else one.
  assert (m.num_devices, m.mesh) == (1, "1 device")
  from sd_jax import generate
  pipe = generate.TextToImage.from_model_dir(model)
  assert bench.pipeline_mesh(pipe, 16) == (8, "data8") and bench.pipeline_mesh(pipe, 3) == (1, "1 device")
  pipe.devices = pipe.devices[:2]
  assert bench.pipeline_mesh(pipe, 4) == (2, "data2") and bench.pipeline_mesh(pipe, 1) == (1, "1 device")
  b = m.extra["baselines"]["eager"]
  assert b["images_shape"] == m.extra["images_shape"] and len(b["times_s"]) == 2
  assert b["ratio"] == pytest.approx(b["median_s"] / m.median_s)
  row = bench.baseline_row(m, config_name=f"model_dir={model}", command="python -m sd_jax.bench --mode=pipeline")
  assert row.count("|") == bench.BASELINE_HEADER.count("|") and "| pipeline (2 DDIM steps" in row
  with pytest.raises(ValueError, match="--prompts is empty"):
    bench.bench_pipeline(model, prompts=[])


def test_lora_fine_tune_step_state_is_the_adapters_only():
  """bench.lora_rank > 0: the U-Net is frozen (sharded like params, not in the optimizer or EMA) and only the
  adapters train: the state holds r·(in + out) numbers per targeted projection, the frozen inputs the U-Net."""
  config = tiny_config(**{"bench.lora_rank": 2})
  exp = bench.make_setup(config, devices=jax.devices()[:1])
  unet = nn.meta.unbox(jax.eval_shape(exp.task._unet_init, jax.random.PRNGKey(0)))
  targets = [k for k in lora_lib.kernels(unet) if k.endswith(("to_q", "to_k", "to_v", "to_out_0"))]
  want = sum(2 * (lora_lib.kernels(unet)[k][0] + lora_lib.kernels(unet)[k][1]) for k in targets)
  assert sum(x.size for x in jax.tree.leaves(exp.abstract_state.params)) == want
  assert bench.tree_bytes_per_device(exp.abstract_state.opt_state) == pytest.approx(2 * 4 * want, rel=0.01)
  assert "unet" in exp.task.frozen_abstract()
  m = bench.bench_train(config, steps=1, warmup=1, devices=jax.devices()[:1])
  assert np.isfinite(m.extra["loss"])


def test_sample_mode_times_ddim_and_decode():
  config = tiny_config()
  (m,) = bench.bench_sample(config, batch_sizes=(1,), num_steps=2, steps=1, warmup=0)
  assert m.mode == "sample (2 DDIM steps, CFG + VAE decode)" and m.batch == 1 and m.median_s > 0
  model = unet_lib.create_unet(config.model.to_dict())
  unet = 2 * flops.unet_forward_flops(model, 2, context_length=8).total  # 2 steps on [uncond; cond]
  assert m.analytic_flops == unet + flops.vae_decode_flops(vae_lib.create_vae("tiny"), 1, 8).total


def test_aot_parameter_bytes_per_device():
  """Per-device parameter bytes: all of them under data=8; an eighth under fsdp=8, plus the norms and biases that
  stay replicated (logical axis 'norm', or a dimension 8 does not divide: sd_jax/parallel.py fit_spec)."""
  config = tiny_config()
  total = sum(x.size * 4 for x in jax.tree.leaves(
      jax.eval_shape(bench.LatentUNetTask(config).init_params, jax.random.PRNGKey(0))))
  per_device = {}
  for mesh in ("data", "fsdp"):
    with config.unlocked():
      config.mesh.update(bench.parse_mesh(mesh, 8))
    exp = bench.make_setup(config)
    per_device[mesh] = bench.tree_bytes_per_device(exp.abstract_state.params)
    replicated = sum(x.size * 4 for x in jax.tree.leaves(exp.abstract_state.params)
                     if x.sharding.is_fully_replicated)
    assert 0 < replicated < 0.1 * total or mesh == "data"
    expected = total if mesh == "data" else (total - replicated) / 8 + replicated
    assert per_device[mesh] == pytest.approx(expected, rel=1e-6)
  assert per_device["data"] == total
  assert total / 8 < per_device["fsdp"] < 1.15 * total / 8


def test_aot_command_line_and_compiled_memory(tmp_path):
  """`--aot` end to end (a subprocess with 8 fake devices compiles the step, fsdp=8): a row in the output file, and
  the compiled program's arguments are exactly this device's shards of the state, batch and frozen inputs."""
  out, json_out = tmp_path / "B.md", tmp_path / "aot.jsonl"
  args = ["--config=configs/sd15_ldm.py:runlocal", *(f"--config.{k}={v}" for k, v in _ONE_LEVEL.items()),
          "--aot", "--aot_devices=8", "--aot_meshes=fsdp", "--aot_per_device_batch=1", f"--benchmarks={out}",
          f"--aot_json={json_out}"]
  result = subprocess.run([sys.executable, "-m", "sd_jax.bench", *args], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line for line in out.read_text().splitlines() if line.startswith("| 8 | fsdp | 1 |")]
  assert len(rows) == 1 and "failed" not in rows[0], out.read_text()
  (r,) = [json.loads(line) for line in json_out.read_text().splitlines()]

  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["batch_size"] == 8
  assert r["opt_state_bytes"] == pytest.approx(2 * r["params_bytes"], rel=0.01)  # AdamW μ, ν (+ counters)
  assert r["ema_bytes"] == r["params_bytes"]
  state = r["params_bytes"] + r["opt_state_bytes"] + r["ema_bytes"]
  batch = (8 * 8 * 4 * 2 + 8 * 32) * 4  # one example per device: latent mean + logvar [8, 8, 4], context [8, 32]
  frozen = 8 * 32 * 4                   # the replicated empty-prompt context
  assert state + batch + frozen <= r["memory"]["argument"] <= state + batch + frozen + 64  # + step and rng
  assert r["memory"]["temp"] > 0
  kinds = {k for k, s in r["collectives"].items() if s["count"]}
  assert kinds & {"all-reduce", "reduce-scatter"} and "all-gather" in kinds  # reduce grads, gather params
  config = tiny_config()
  assert r["analytic_flops"] == 3 * flops.unet_forward_flops(
      unet_lib.create_unet(config.model.to_dict()), 8, context_length=8).total


def test_aot_for_a_tpu_topology_counts_its_chips_and_without_libtpu_says_what_to_install(monkeypatch):
  """--aot_tpu=v5e:2x4 compiles with libtpu's TPU compiler on this host (BENCHMARKS.md's TPU rows); the test
  environment has no libtpu, so it checks the parse and the message, and that the point's row names the topology."""
  assert bench.topology_devices("v5e:2x4") == 8 and bench.topology_devices("v5p:2x2x2") == 8
  with pytest.raises(ValueError, match=r"--aot_tpu entry 'v5e-8'.*e\.g\. v5e:2x4"):
    bench.topology_devices("v5e-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # an import of it fails, as where it is not installed
  with pytest.raises(RuntimeError, match=r"libtpu, which is not installed: `pip install 'jax\[tpu\]'`"):
    bench.tpu_topology("v5e:2x4")
  failed = {"num_devices": 8, "mesh_name": "fsdp", "per_device_batch": 4, "tpu": "v5e:2x4", "error": "x"}
  assert bench.aot_row(failed).startswith("| 8 | fsdp on v5e:2x4 | 4 | failed: x |")


def test_the_gpu_suite_at_tiny_sizes_measures_each_point_writes_rows_and_json_and_keeps_to_its_budget(tmp_path):
  """--suite=gpu's own points (GPU_SUITE) at test sizes on the CPU: a train point with the diffusers ratio and the
  sampling point are measured; rows go to the two tables; the JSON holds every point; once the budget is spent the
  rest are reported as skipped, not dropped. (The other train points differ in batch size and levers only.)"""
  points = [bench.GPU_SUITE[i] for i in (1, 5)]
  assert [p.mode for p in points] == ["train", "sample"] and points[0].baselines == ("eager",)
  out, json_out = tmp_path / "B.md", tmp_path / "suite.json"
  results = bench.run_suite(points, tiny=True, steps=1, warmup=0, benchmarks=out, json_path=json_out,
                            log=lambda *_: None)
  assert [r["status"] for r in results] == ["measured"] * 2, [r.get("error") for r in results]
  assert [len(r["measurements"]) for r in results] == [1, 2]  # sampling: batch 1 and 2 (16 / 8)
  assert results[0]["measurements"][0]["extra"]["baselines"]["eager"]["ratio"] > 0
  tables = out.read_text().split(bench.BASELINE_HEADER)
  assert len(tables) == 2 and bench.MEASURED_HEADER in tables[0]
  assert tables[0].count("| train |") == 1 and tables[0].count("| sample (2 DDIM steps, CFG + VAE decode) |") == 2
  assert tables[1].count("| train |") == 1 and "--baseline=eager" in tables[1]
  assert json.loads(json_out.read_text())["points"] == json.loads(json.dumps(results, default=float))

  seen = []  # the JSON as each point begins: the points before it are already there (a killed run keeps them)
  spent = bench.run_suite(points[:2], tiny=True, budget_s=0.0, json_path=json_out,
                          log=lambda *_: seen.append(json.loads(json_out.read_text())["points"]))
  assert [r["status"] for r in spent] == ["skipped"] * 2 and "budget (0 s) was spent" in spent[1]["error"]
  assert [[p["status"] for p in points_so_far] for points_so_far in seen] == [[], ["skipped"]]
