"""Image helpers: [-1, 1] floats to uint8, grids (plain and labelled with their prompts), PNG files."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
  return grid


def save_png(image: np.ndarray, path) -> None:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  epath.Path(path).write_bytes(buffer.getvalue())


def _wrap(text: str, font, width: int) -> list[str]:
  """Greedy word wrap of `text` to `width` pixels."""
  lines: list[str] = []
  for word in text.split():
    if lines and font.getlength(f"{lines[-1]} {word}") <= width:
      lines[-1] = f"{lines[-1]} {word}"
    else:
      lines.append(word)
  return lines or [""]


def labeled_grid(images: np.ndarray, labels: Sequence[str], tile: int, pad: int = 4) -> np.ndarray:
  """uint8 [P, K, H, W, 3] and P labels -> one uint8 image: a cell per label (the label over its K images,
  upscaled to `tile` pixels), cells laid out in a near-square grid."""
  from PIL import ImageDraw, ImageFont
  num_prompts, k = images.shape[:2]
  font = ImageFont.load_default()
  cell_w = k * (tile + pad) + pad
  wrapped = [_wrap(label, font, cell_w - 2 * pad) for label in labels]
  _, top, _, bottom = font.getbbox("Ag")
  line_h = bottom - top + pad // 2
  text_h = max(len(lines) for lines in wrapped) * line_h
  cell_h = text_h + tile + 2 * pad
  columns = math.ceil(math.sqrt(num_prompts))
  rows = math.ceil(num_prompts / columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for p in range(num_prompts):
    x0, y0 = (p % columns) * cell_w, (p // columns) * cell_h
    for i, line in enumerate(wrapped[p]):
      draw.text((x0 + pad, y0 + pad + i * line_h - top), line, fill="black", font=font)
    for j in range(k):
      image = Image.fromarray(images[p, j]).resize((tile, tile), Image.Resampling.NEAREST)
      canvas.paste(image, (x0 + pad + j * (tile + pad), y0 + pad + text_h))
  return np.asarray(canvas)


def prompt_grid(images: np.ndarray, prompts: Sequence[str], num_images: int) -> np.ndarray:
  """`labeled_grid` of uint8 [len(prompts) * num_images, H, W, 3] (prompt-major): one cell per prompt with its images,
  non-square images letterboxed, at most ~4096 pixels wide."""
  n, h, w, _ = images.shape
  side = max(h, w)
  if h != w:  # labeled_grid draws square tiles: pad with white rather than stretch
    square = np.full((n, side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[:, top:top + h, left:left + w] = images
    images = square
  columns = math.ceil(math.sqrt(len(prompts)))
  tile = int(min(max(side, 64), max(64, 4096 // (columns * num_images))))
  return labeled_grid(images.reshape(len(prompts), num_images, side, side, 3), prompts, tile=tile)
