"""Named PRNG streams: every use of randomness outside the training step gets its own key.

Training step s uses fold_in(seed key, s). The streams below are folded in
with ids from the top of the int32 range, which no step count reaches, so
no stream ever shares a key with a training step or with another stream.
The ids are fixed: changing one changes every run's initialisation or samples.
"""

import enum

import jax


class Stream(enum.IntEnum):
  """What a key is for; the value is what gets folded into the seed key."""

  INIT = 2**31 - 1  # Parameter initialisation.
  GRID = 2**31 - 2  # The periodic sample grids of training (the same key every time).
  SAMPLE = 2**31 - 3  # --mode=sample and the samples of --mode=eval.
  FIGURE = 2**31 - 4  # The progressive-generation and interpolation figures.
  BPD = 2**31 - 5  # The bound's noise in --mode=eval.
  # Class-label dropout of conditional training: folded into each training step's own key
  # (fold_in(seed key, step)), so the step's timestep, noise and dropout draws stay as they were.
  LABEL_DROPOUT = 2**31 - 6
  # The samples of training's FID (the same key every time, as the grids'), so turning FID on
  # changes no other draw.
  FID = 2**31 - 7
  ODE_BPD = 2**31 - 8  # The ODE likelihood's dequantisation noise and probes in --mode=eval.


def key(seed: int, stream: Stream) -> jax.Array:
  """The typed key of `stream` for a run with `seed`."""
  return jax.random.fold_in(jax.random.key(seed), int(stream))
