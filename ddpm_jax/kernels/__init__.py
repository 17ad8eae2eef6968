"""Drop-in CPU kernels for the U-Net's layers.

Each module computes the same function as a plain flax layer (tests compare
them) with the same parameters, so checkpoints do not depend on which one
ran. `ddpm_jax.models.layers` assembles them into the 'fast' layer set;
docs/performance.md has their measurements.
"""
