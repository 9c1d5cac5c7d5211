"""A fused inference step for the dense residual stack, in Pallas.

One inference step on a block of S hidden layers (the top S of the dense
``ResidualPCN``, from the feed-forward start) is, with m_k = φ(z_k) − φ(z⁰_k),
the premultipliers folded into the weights (Ŵ_k = a_k W_k) and β' = β/B:

    e_0 = δ_0 − s                         (s: the shift from the layer below)
    e_k = δ_k − δ_{k−1} − m_{k−1} Ŵ_k     (+ e⁰_k when starting from given z)
    δ_k ← δ_k − β' (e_k − e_{k+1} − φ'(z_k) ⊙ e_{k+1} Ŵ_{k+1}ᵀ),   δ_top with the readout's r instead.

XLA runs this as about ten kernels per step (two batched products, the
elementwise passes, a copy of the loop carry). Here it is two: ``errors``
(the forward product with φ, the differences and the skip fused around it)
and ``update`` (the transposed product with φ', the gradient and the step
fused around it, δ updated in place). Both are grids over (layer, column
tile); each program streams its layer's weights in [tile, tile] chunks, so no
block has to fit on chip. The readout's part (a [B, N] × [N, C] product) stays
in XLA between them.

On a GPU the kernels compile through Pallas' Triton backend; elsewhere they
run in Pallas' interpret mode (how the tests check them on CPU: slow, exact).
The result is the XLA path's within the rounding of the products: zero errors
below the wavefront stay exactly zero, errors stay relative to the start.
Inside ``jax.shard_map`` call it with ``check_vma=False``, as ``steps`` does:
Pallas (jax 0.10) cannot type a kernel's values as device-varying.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mupc_flax.networks.layers import PRECISIONS


def tile(size: int, preferred: int = 64) -> int:
  """The largest power of two ≤ ``preferred`` that divides ``size`` (at least 1)."""
  t = 1
  while t * 2 <= preferred and size % (t * 2) == 0:
    t *= 2
  return t


# What a residual branch a·φ(z)W may be traced to for the fused step to
# compute it: one matrix product, scaled (and cast for bfloat16 products).
_BRANCH_PRIMITIVES = {"dot_general", "mul", "broadcast_in_dim", "reshape", "convert_element_type",
                      "squeeze", "expand_dims"}


def fits(network, x) -> bool:
  """Whether the fused step computes ``network``'s inference on inputs
  shaped like ``x``: one stage declared linear, with residual weights
  (kernels [R, N, N], multipliers [R]), activities [B, N], and each branch
  one premultiplied matrix product (checked on its traced primitives)."""
  if (len(network.stage_layers) != 1 or not getattr(network, "linear_branches", False)
      or not hasattr(network, "precision") or network.precision not in PRECISIONS):
    return False
  weights = network.residual_weights(0)
  if len(weights) != 2 or getattr(weights[0], "ndim", 0) != 3 or getattr(weights[1], "ndim", 0) != 1:
    return False
  width = weights[0].shape[-1]
  z = jax.eval_shape(lambda x: network.entry(0, x), x)
  if z.shape[1:] != (width,) or weights[0].shape[1] != width:
    return False
  one_layer = tuple(w[:1] for w in weights)
  jaxpr = jax.make_jaxpr(lambda h: network.residual_branch(0, one_layer, h))(
      jax.ShapeDtypeStruct((1,) + z.shape, z.dtype)).jaxpr
  names = [eqn.primitive.name for eqn in jaxpr.eqns]
  return names.count("dot_general") == 1 and set(names) <= _BRANCH_PRIMITIVES


def _slope(phi, z):
  """φ'(z), elementwise."""
  return jax.jvp(phi, (z,), (jnp.ones_like(z),))[1]


def _errors_kernel(phi, precision, block_k, has_start_errors, *refs):
  """Program (k, j): e_k[:, tile j] for layer k of the block."""
  (d_below, z0_below, d_below_tile, d_here, weights, bottom_shift, *rest) = refs
  start_errors, out = rest if has_start_errors else (None, rest[0])
  k = pl.program_id(0)
  width = d_below.shape[-1]

  def chunk(c):
    cols = pl.ds(c * block_k, block_k)
    z0 = z0_below[:, cols]
    # φ(z⁰) is recomputed here rather than read: the same code on both sides,
    # so a layer with δ = 0 moves by exactly zero on any backend.
    moved = phi(z0 + d_below[:, cols]) - phi(z0)
    w = weights[cols, :]
    return jnp.dot(moved.astype(w.dtype), w, precision=precision, preferred_element_type=jnp.float32)

  # Chunks unrolled (a static few): a loop carry would need its type spelled
  # out under jax.shard_map.
  product = sum(chunk(c) for c in range(width // block_k))
  shift = jnp.where(k == 0, bottom_shift[...], product + d_below_tile[...])
  e = d_here[...] - shift
  if start_errors is not None:
    e = e + start_errors[...]
  out[...] = e


def _update_kernel(phi, precision, block_k, step_size, *refs):
  """Program (k, j): δ_k[:, tile j] after one step."""
  (e_above, e_above_tile, e_here, d_here, z0_here, weights, readout_back, out) = refs
  k = pl.program_id(0)
  top = k == pl.num_programs(0) - 1
  width = e_above.shape[-1]

  def chunk(c):
    cols = pl.ds(c * block_k, block_k)
    w = weights[:, cols]  # rows: this tile's units; columns: the layer above's
    return jax.lax.dot_general(e_above[:, cols].astype(w.dtype), w, (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

  product = sum(chunk(c) for c in range(width // block_k))
  back = jnp.where(top, readout_back[...], product)
  skip = jnp.where(top, 0.0, e_above_tile[...])
  gradient = e_here[...] - skip - _slope(phi, z0_here[...] + d_here[...]) * back
  out[...] = d_here[...] - step_size * gradient


def fused_step(model, z0: jax.Array, start_errors: jax.Array | None,
               bottom_shift: jax.Array, weights: tuple[jax.Array, jax.Array], y: jax.Array,
               output_errors, lr: float, batch_size: int, *, interpret: bool | None = None,
               block: int | None = None):
  """The inference step of a dense block, as ``step(δ) -> δ``.

  Args:
    model: the dense ``ResidualPCN`` (its φ, readout and precision are used).
    z0: [S, B, N] the block's activities at the start.
    start_errors: [S, B, N] the errors at the start, or None (zero: the
      feed-forward start).
    bottom_shift: [B, N] how far the prediction of the block's lowest layer
      has moved (fixed while the block is updated).
    weights: (kernels [S−1, N, N] in the products' dtype, multipliers [S−1]),
      the block's residual weights.
    y: [B, C] targets; output_errors: ``(outputs, y) -> ε``, −∂ℓ_out/∂μ_L.
    lr, batch_size: β and the B of the batch mean.
    interpret: run in Pallas' interpret mode; None: unless on a GPU.
    block: the column tile (rows and columns of the weight chunks); None:
      ``tile(N)``.

  The premultipliers are folded into the kernels here, once per block
  (outside the inference loop): the weights do not change during inference.
  """
  layers, batch, width = z0.shape
  dtype, precision = PRECISIONS[model.precision]
  kernels, multipliers = weights
  scaled = (multipliers[:, None, None] * kernels.astype(jnp.float32)).astype(dtype)
  block = block or tile(width)
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  grid = (layers, width // block)
  clamp = lambda k: jnp.clip(k, 0, layers - 1)
  row = lambda layer: pl.BlockSpec((None, batch, width), lambda k, j: (clamp(layer(k)), 0, 0))
  tile_of = lambda layer: pl.BlockSpec((None, batch, block), lambda k, j: (clamp(layer(k)), 0, j))
  below, here, above = tile_of(lambda k: k - 1), tile_of(lambda k: k), tile_of(lambda k: k + 1)
  shared = pl.BlockSpec((batch, block), lambda k, j: (0, j))
  out_shape = jax.ShapeDtypeStruct(z0.shape, jnp.float32)
  has_start_errors = start_errors is not None

  def errors_call(d):
    # Layer k's prediction comes through kernel k − 1 (layer 0's from below the block).
    into = pl.BlockSpec((None, width, block), lambda k, j: (jnp.clip(k - 1, 0, layers - 2), 0, j))
    return pl.pallas_call(
        functools.partial(_errors_kernel, model.phi, precision, block, has_start_errors),
        out_shape=out_shape, grid=grid,
        in_specs=[row(lambda k: k - 1), row(lambda k: k - 1), below, here, into, shared]
        + [here] * has_start_errors,
        out_specs=here, interpret=interpret, name="pc_errors",
    )(d, z0, d, d, scaled, bottom_shift, *((start_errors,) if has_start_errors else ()))

  def update_call(e, d, readout_back):
    # Layer k's errors go back through kernel k (the top's through the readout).
    out_of = pl.BlockSpec((None, block, width), lambda k, j: (jnp.clip(k, 0, layers - 2), j, 0))
    return pl.pallas_call(
        functools.partial(_update_kernel, model.phi, precision, block, lr / batch_size),
        out_shape=out_shape, grid=grid,
        in_specs=[row(lambda k: k + 1), above, here, here, here, out_of, shared],
        out_specs=here,
        input_output_aliases={3: 0},  # δ in place: each program reads only the tile it writes
        interpret=interpret, name="pc_update",
    )(e, e, e, d, z0, scaled, readout_back)

  def step(d: jax.Array) -> jax.Array:
    e = errors_call(d)
    phi_top = model.phi(z0[-1] + d[-1])
    epsilon = output_errors(model.readout(phi_top), y)
    readout_back = jax.linear_transpose(model.readout, phi_top)(epsilon)[0]
    return update_call(e, d, readout_back)

  return step
