"""sd_jax.eval.inception against a PyTorch reference of pytorch-fid's FID Inception (random weights).

The reference below is pytorch-fid's `InceptionV3(output_blocks=[3])` over `fid_inception_v3()`, written out
(torchvision is not a dependency): torchvision's BasicConv2d / InceptionB / InceptionD, pytorch-fid's
FIDInceptionA / C / E_1 / E_2 forwards, torchvision's module names, and `fc` (1008 classes) as in the real file.
"""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_jax.eval import inception
from sd_jax.weights import common

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class BasicConv2d(nn.Module):

  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):

  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

  def forward(self, x):
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):

  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = x
    for i in range(1, 6):
      branch7x7dbl = getattr(self, f"branch7x7dbl_{i}")(branch7x7dbl)
    branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (max_pool=False) and FIDInceptionE_2 (max_pool=True)."""

  def __init__(self, in_channels, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionReference(nn.Module):
  """fid_inception_v3() + pytorch-fid's InceptionV3 forward up to the final average pool."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # in the real file; not part of the features

  def forward(self, x):  # x: [N, 3, H, W] in [0, 1]
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


def calibrated_reference(seed=0) -> FIDInceptionReference:
  """Random weights whose BatchNorm statistics are those of random images (else activations blow up or vanish
  over 47 layers and the comparison says nothing), then random affine BN params off their 1/0 init."""
  torch.manual_seed(seed)
  model = FIDInceptionReference()
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.momentum = None  # cumulative average: one batch sets running stats to its statistics
  with torch.no_grad():
    model.train()(torch.rand(4, 3, 299, 299))
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
        module.bias.copy_(0.2 * torch.randn_like(module.bias))
  return model.eval()


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
  model = calibrated_reference()
  path = tmp_path_factory.mktemp("inception") / "fid_inception_random.pth"
  torch.save(model.state_dict(), path)
  return model, path


def test_features_match_pytorch_reference(reference_file):
  reference, path = reference_file
  model, variables = inception.load_inception(path)
  rng = np.random.default_rng(0)
  images = rng.random((2, 80, 64, 3), dtype=np.float32)  # non-square, upsampled to 299
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  ours = np.asarray(jax.jit(model.apply, compiler_options=FAST_COMPILE)(variables, images))
  assert ours.shape == (2, inception.FEATURE_DIM)
  scale = np.abs(expected).max()
  diff = np.abs(ours - expected).max()
  print(f"pool3 features: max |ref| {scale:.3f}, max abs diff {diff:.2e}, std {expected.std():.3f}")
  assert expected.std() > 1e-2  # the comparison is not between two near-constant vectors
  assert diff <= 1e-4 * scale


def test_variables_layout(reference_file):
  reference, path = reference_file
  _, variables = inception.load_inception(path)
  assert set(variables) == {"params", "batch_stats"}
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  torch_weight = reference.Mixed_6b.branch7x7_2.conv.weight.detach().numpy()  # [O, I, 1, 7]
  assert kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(kernel, np.transpose(torch_weight, (2, 3, 1, 0)))
  np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                reference.Conv2d_1a_3x3.bn.running_var.numpy())
  # Every weight of the reference but the logits layer is a param here (running statistics are batch_stats).
  torch_count = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
  ours = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  assert ours == torch_count


@pytest.mark.parametrize("in_size,out_size", [((512, 400), (299, 299)), ((32, 45), (299, 299)), ((7, 9), (5, 13))])
def test_resize_matches_torch_interpolate(in_size, out_size):
  rng = np.random.default_rng(1)
  images = rng.random((2, *in_size, 3), dtype=np.float32)
  expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=out_size, mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(inception.resize_bilinear(images, out_size)), expected, atol=2e-6)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth.*pass its path"):
    inception.load_inception(tmp_path / "nope.pth")


def test_hash_in_file_name_is_checked(reference_file, tmp_path):
  _, path = reference_file
  renamed = tmp_path / inception.WEIGHTS_FILE
  renamed.write_bytes(path.read_bytes())
  with pytest.raises(ValueError, match="SHA-256"):
    inception.load_inception(renamed)


def test_key_mismatch_names_the_keys(reference_file):
  reference, _ = reference_file
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  del state["Mixed_7c.branch_pool.bn.running_var"]
  state["Mixed_7c.extra.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:32]
  with pytest.raises(common.WeightsMismatchError) as info:
    inception.inception_from_torch(state)
  message = str(info.value)
  assert "batch_stats/Mixed_7c/branch_pool/bn/var" in message
  assert "params/Mixed_7c/extra/conv/kernel" in message
  assert "params/Mixed_5b/branch1x1/conv/kernel" in message


def test_torchvision_imagenet_weights_are_refused(reference_file):
  reference, _ = reference_file
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match="torchvision's ImageNet"):
    inception.inception_from_torch(state)
