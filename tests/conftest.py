"""Test setup: eight emulated CPU devices, before JAX initialises its backend."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(__file__))  # for the oracles module
