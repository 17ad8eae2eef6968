"""Test-session set-up shared by every test module.

Four CPU devices are forced before JAX initialises, so the multi-device tests
can build a 4-way 'data' mesh in the same process as the single-device ones
(which simply use one device of the four).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
