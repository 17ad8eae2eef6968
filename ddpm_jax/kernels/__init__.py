"""Drop-in CPU kernels for the U-Net's layers and for its optimizer update.

Each module computes the same function as a plain flax layer or optax chain
(tests compare them) with the same parameters or optimizer state, so
checkpoints do not depend on which one ran. `ddpm_jax.models.layers`
assembles the layer kernels into the 'fast' set; `train_state.make_optimizer`
uses `adam`. docs/performance.md has their measurements.
"""
