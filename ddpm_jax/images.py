"""Turning model-space images into pixels: uint8 conversion, grids, PNG files."""

import math

import numpy as np
from PIL import Image

from ddpm_jax import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps [-1, 1] floats to uint8 pixels the way the data were made (x/127.5 - 1)."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
  images: np.ndarray, num_columns: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+p)+p, cols*(W+p)+p, C] image."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'make_grid takes images [N, H, W, C], got shape {images.shape}.')
  n, h, w, c = images.shape
  cols = num_columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full(
    (rows * (h + padding) + padding, cols * (w + padding) + padding, c),
    pad_value,
    dtype=images.dtype,
  )
  for i in range(n):
    r, k = divmod(i, cols)
    top, left = padding + r * (h + padding), padding + k * (w + padding)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def class_grid(images: np.ndarray, labels: np.ndarray, max_columns: int = 10) -> np.ndarray:
  """One row per class present, in class order, of its first samples.

  Args:
    images: uint8 [N, H, W, C].
    labels: int [N], the class of each image.
    max_columns: most images per row.

  Returns:
    uint8 grid image; a row has min(max_columns, the rarest class's count) images.
  """
  classes = np.unique(labels)
  columns = min(max_columns, min(int(np.sum(labels == c)) for c in classes))
  rows = [images[labels == c][:columns] for c in classes]
  return make_grid(np.concatenate(rows), num_columns=columns)


def readable_upscale(image_size: int, min_pixels: int = 112) -> int:
  """The nearest-neighbour factor that shows an image_size-pixel tile at >= min_pixels.

  28x28 and 32x32 images get 4x, 64x64 2x, 256x256 none.
  """
  return max(1, -(-min_pixels // int(image_size)))


def save_png(image: np.ndarray, path: files.PathLike, upscale: int = 1) -> None:
  """Writes a uint8 [H, W, C] image (C in 1, 3) to `path`, creating folders."""
  image = np.asarray(image)
  if image.shape[-1] == 1:
    image = image[..., 0]
  if upscale > 1:
    image = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
  # Never leave a half-written PNG behind.
  files.atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))
