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
tile, row tile); each program keeps one [rows, columns] float32 accumulator
and runs a loop over the width in [*, depth] chunks (``Tiling``), so its
registers do not grow with the width or the batch. The readout's part (a
[B, N] × [N, C] product) stays in XLA between them.

Where it runs is chosen by the platform the step is *lowered* for, not by
``jax.default_backend()`` (``jax.lax.platform_dependent``): for CUDA the
kernels compile through Pallas' Triton backend (``compiler_params`` name it
explicitly: a ``pallas_call`` without them is built for Mosaic GPU, which
cannot lower these kernels), so a CPU machine can lower the step for a GPU
(``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))``) and find
the ``__gpu$xla.gpu.triton`` custom calls in it; on any other platform they
run in Pallas' interpret mode (how the tests check them on CPU: slow,
exact). Triton takes power-of-two blocks only, so for CUDA a batch or width
that is not a power of two (or a batch below 16, the products' least rows) is
zero-padded to one, exactly (padded units and rows stay zero), at the cost of
a copy of δ per step; benchmarks/ptx_check.py compiles the kernels to PTX
without a GPU and reports registers, spills and shared memory.

The fused step is opt-in (``pc.Engine(kernel="pallas")``): it has been
compiled for a GPU but never timed on one (docs/benchmarks.md).

The result is the XLA path's within the rounding of the products: zero errors
below the wavefront stay exactly zero, errors stay relative to the start.
Inside ``jax.shard_map`` call it with ``check_vma=False``, as ``steps`` does:
Pallas (jax 0.10) cannot type a kernel's values as device-varying.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mupc_flax.networks.layers import PRECISIONS

# Triton's dot wants at least 16 rows (one m16 MMA tile).
MIN_ROWS = 16


def tile(size: int, preferred: int = 64) -> int:
  """The largest power of two ≤ ``preferred`` that divides ``size`` (at least 1)."""
  t = 1
  while t * 2 <= preferred and size % (t * 2) == 0:
    t *= 2
  return t


def _next_power_of_two(n: int) -> int:
  """The least power of two ≥ ``n`` (1 for n ≤ 1)."""
  return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a kernel's [B, N] output is cut up, and how Triton compiles it.

  rows × columns is one program's output tile (a float32 accumulator);
  depth the chunk of the width the product loop takes per iteration
  (columns/rows of the weight chunk streamed in); warps and stages are
  Triton's ``num_warps`` and ``num_stages`` (software pipelining of the
  chunk loop through shared memory).
  """
  rows: int
  columns: int
  depth: int
  warps: int = 4
  stages: int = 3

  def compiler_params(self) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=self.warps, num_stages=self.stages)


def tiling_for(batch: int, width: int, dtype=jnp.float32, *, for_triton: bool = True) -> Tiling:
  """The tiling of a [``batch``, ``width``] layer (the per-device batch).

  For Triton, ``batch`` and ``width`` must be powers of two (``fused_step``
  pads them) and ``batch`` ≥ ``MIN_ROWS``. The tile is at most 64 × 64 (a
  16 KB float32 accumulator, 32 registers a thread at 4 warps) and the
  chunk 32 deep in float32, 64 in bfloat16, so each pipeline stage holds
  16 KB of operands in shared memory: three stages (fewer if the loop is
  shorter) stay far below the 227 KB an H100 block may have, whatever the
  width or batch; 4 warps, Triton's usual for a 64 × 64 tile. Chosen with
  benchmarks/ptx_check.py (ptxas: no spills; docs/benchmarks.md). Elsewhere
  (interpret mode) the tiles only need to divide the shape.
  """
  if for_triton:
    for name, n in (("batch", batch), ("width", width)):
      if n & (n - 1) or n < 1:
        raise ValueError(f"Triton blocks are powers of two: the {name} {n} must be padded first.")
    if batch < MIN_ROWS:
      raise ValueError(f"Triton products need at least {MIN_ROWS} rows, not a batch of {batch}.")
  depth = tile(width, 64 if jnp.dtype(dtype).itemsize == 2 else 32)
  # No more pipeline stages than the chunk loop has iterations.
  return Tiling(rows=tile(batch, 64), columns=tile(width, 64), depth=depth,
                stages=max(1, min(3, width // depth)))


# What a residual branch a·φ(z)W may be traced to for the fused step to
# compute it: one matrix product, scaled (and cast for bfloat16 products);
# inside shard_map with device-varying weights, its inputs are marked varying.
_BRANCH_PRIMITIVES = {"dot_general", "mul", "broadcast_in_dim", "reshape", "convert_element_type",
                      "squeeze", "expand_dims", "pvary", "pcast"}


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


def _columns(j, size: int):
  """The index of column tile ``j`` of ``size`` columns."""
  return pl.ds(pl.multiple_of(j * size, size), size)


def _errors_kernel(phi, precision, tiling, has_start_errors, *refs):
  """Program (k, j, i): e_k[row tile i, column tile j] for layer k of the block.

  Refs: δ_{k−1} and z⁰_{k−1} [rows, N] (this program's rows), δ_k [rows,
  columns], Ŵ_k [N, columns], the bottom shift [rows, columns], e⁰_k
  [rows, columns] if given; out e_k [rows, columns], float32.
  """
  (d_below, z0_below, d_here, weights, bottom_shift, *rest) = refs
  start_errors, out = rest if has_start_errors else (None, rest[0])
  k, j = pl.program_id(0), pl.program_id(1)
  width, depth = d_below.shape[-1], tiling.depth

  def chunk(c, acc):
    cols = _columns(c, depth)
    z0 = z0_below[:, cols]
    # φ(z⁰) is recomputed here rather than read: the same code on both sides,
    # so a layer with δ = 0 moves by exactly zero on any backend.
    moved = phi(z0 + d_below[:, cols]) - phi(z0)
    w = weights[cols, :]
    return acc + jnp.dot(moved.astype(w.dtype), w, precision=precision,
                         preferred_element_type=jnp.float32)

  # A loop, not unrolled chunks: Triton keeps one chunk's operands live (and
  # pipelines the next ones' loads), so registers do not grow with the width.
  product = jax.lax.fori_loop(0, width // depth, chunk,
                              jnp.zeros((d_here.shape[0], d_here.shape[1]), jnp.float32))
  shift = jnp.where(k == 0, bottom_shift[...], product + d_below[:, _columns(j, out.shape[-1])])
  e = d_here[...] - shift
  if start_errors is not None:
    e = e + start_errors[...]
  out[...] = e


def _update_kernel(phi, precision, tiling, step_size, *refs):
  """Program (k, j, i): δ_k[row tile i, column tile j] after one step.

  Refs: e_{k+1} [rows, N], e_k, δ_k, z⁰_k [rows, columns], Ŵ_{k+1} rows of
  this tile [columns, N], the readout's back-projection [rows, columns]; out
  δ_k [rows, columns] (aliasing δ_k).
  """
  (e_above, e_here, d_here, z0_here, weights, readout_back, out) = refs
  k, j = pl.program_id(0), pl.program_id(1)
  top = k == pl.num_programs(0) - 1
  width, depth = e_above.shape[-1], tiling.depth

  def chunk(c, acc):
    cols = _columns(c, depth)
    w = weights[:, cols]  # rows: this tile's units; columns: the layer above's
    return acc + jax.lax.dot_general(e_above[:, cols].astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                     precision=precision, preferred_element_type=jnp.float32)

  product = jax.lax.fori_loop(0, width // depth, chunk,
                              jnp.zeros((d_here.shape[0], d_here.shape[1]), jnp.float32))
  back = jnp.where(top, readout_back[...], product)
  skip = jnp.where(top, 0.0, e_above[:, _columns(j, out.shape[-1])])
  gradient = e_here[...] - skip - _slope(phi, z0_here[...] + d_here[...]) * back
  out[...] = d_here[...] - step_size * gradient


def _calls(phi, precision, tiling: Tiling, shape, has_start_errors: bool, step_size: float,
           interpret: bool):
  """The two pallas_calls for δ of ``shape`` [S, B, N]: ``(errors, update)``
  with ``errors(d, z0, d, scaled, bottom_shift[, start_errors]) -> e`` and
  ``update(e, e, d, z0, scaled, readout_back) -> δ`` (δ in place), all float32
  [S, B, N] but the weights [S−1, N, N] and the [B, N] shift and back-projection."""
  layers, batch, width = shape
  rows, columns = tiling.rows, tiling.columns
  if batch % rows or width % columns or width % tiling.depth:
    raise ValueError(f"The tiling {tiling} does not divide the layer shape [{batch}, {width}].")
  grid = (layers, width // columns, batch // rows)
  clamp = lambda k: jnp.clip(k, 0, layers - 1)
  row = lambda layer: pl.BlockSpec((None, rows, width), lambda k, j, i: (clamp(layer(k)), i, 0))
  here = pl.BlockSpec((None, rows, columns), lambda k, j, i: (k, i, j))
  shared = pl.BlockSpec((rows, columns), lambda k, j, i: (i, j))
  out_shape = jax.ShapeDtypeStruct(shape, jnp.float32)
  # Triton's options (interpret mode ignores them); named so that a GPU
  # lowering takes Triton, not the Mosaic GPU default.
  params = tiling.compiler_params()

  # Layer k's prediction comes through kernel k − 1 (layer 0's from below the block).
  into = pl.BlockSpec((None, width, columns), lambda k, j, i: (jnp.clip(k - 1, 0, layers - 2), 0, j))
  errors = pl.pallas_call(
      functools.partial(_errors_kernel, phi, precision, tiling, has_start_errors),
      out_shape=out_shape, grid=grid,
      in_specs=[row(lambda k: k - 1), row(lambda k: k - 1), here, into, shared]
      + [here] * has_start_errors,
      out_specs=here, interpret=interpret, compiler_params=params, name="pc_errors")

  # Layer k's errors go back through kernel k (the top's through the readout).
  out_of = pl.BlockSpec((None, columns, width), lambda k, j, i: (jnp.clip(k, 0, layers - 2), j, 0))
  update = pl.pallas_call(
      functools.partial(_update_kernel, phi, precision, tiling, step_size),
      out_shape=out_shape, grid=grid,
      in_specs=[row(lambda k: k + 1), here, here, here, out_of, shared],
      out_specs=here,
      input_output_aliases={2: 0},  # δ in place: each program reads only the tile it writes
      interpret=interpret, compiler_params=params, name="pc_update")
  return errors, update


def _pad_to(x: jax.Array, shape) -> jax.Array:
  """``x`` zero-padded at the end of each axis to ``shape``."""
  return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)])


def fused_step_of(phi: Callable, readout: Callable, precision: str, z0: jax.Array,
                  start_errors: jax.Array | None, bottom_shift: jax.Array,
                  weights: tuple[jax.Array, jax.Array], y: jax.Array, output_errors,
                  lr: float, batch_size: int, *, interpret: bool | None = None,
                  tiling: Tiling | None = None, padded_as_triton: bool = False):
  """The inference step of a dense block, as ``step(δ) -> δ`` (δ: [S, B, N] float32).

  Args:
    phi: the activation, elementwise; readout: φ(z_top) [B, N] -> outputs
      [B, C], linear; precision: a key of ``PRECISIONS``.
    z0: [S, B, N] the block's activities at the start.
    start_errors: [S, B, N] the errors at the start, or None (zero: the
      feed-forward start).
    bottom_shift: [B, N] how far the prediction of the block's lowest layer
      has moved (fixed while the block is updated).
    weights: (kernels [S−1, N, N] in the products' dtype, multipliers [S−1]),
      the block's residual weights.
    y: [B, C] targets; output_errors: ``(outputs, y) -> ε``, −∂ℓ_out/∂μ_L.
    lr, batch_size: β and the B of the batch mean.
    interpret: True: Pallas' interpret mode; False: Triton; None: Triton
      where the step is lowered for CUDA, interpret mode elsewhere.
    tiling: for the Triton kernels; None: ``tiling_for`` the padded shape.
    padded_as_triton: with ``interpret=True``, run what Triton would (the
      padded shape, Triton's tiling) in interpret mode: how the padding is
      checked without a GPU.

  The premultipliers are folded into the kernels here, once per block
  (outside the inference loop): the weights do not change during inference,
  and neither does the padding of z⁰ and the weights for Triton.
  """
  layers, batch, width = z0.shape
  dtype, lax_precision = PRECISIONS[precision]
  kernels, multipliers = weights
  scaled = (multipliers[:, None, None] * kernels.astype(jnp.float32)).astype(dtype)
  step_size = lr / batch_size
  has_start_errors = start_errors is not None
  starts = (start_errors,) if has_start_errors else ()

  def readout_back(d):
    """The top layer's −∂ℓ_out/∂φ(z_top) through the readout, [B, N] float32."""
    phi_top = phi(z0[-1] + d[-1])
    epsilon = output_errors(readout(phi_top), y)
    return jax.linear_transpose(readout, phi_top)(epsilon)[0]

  def build(shape, kernel_tiling: Tiling, interpret: bool):
    """``step`` on δ zero-padded to ``shape`` [S, B', N'] (no copy if it is
    δ's): padded units and rows keep δ = e = 0, since φ(0 + 0) − φ(0) = 0
    and their weights are zero, and the readout sees only the real ones."""
    errors, update = _calls(phi, lax_precision, kernel_tiling, shape, has_start_errors, step_size,
                            interpret)
    pad = shape != z0.shape
    fit = (lambda x: _pad_to(x, shape[-x.ndim:])) if pad else (lambda x: x)
    # Padded here, once per block, outside the inference loop.
    z0_p, shift_p, starts_p = fit(z0), fit(bottom_shift), tuple(fit(s) for s in starts)
    scaled_p = _pad_to(scaled, (layers - 1, shape[-1], shape[-1]))

    def run(d):
      d_p = fit(d)
      e = errors(d_p, z0_p, d_p, scaled_p, shift_p, *starts_p)
      d_p = update(e, e, d_p, z0_p, scaled_p, fit(readout_back(d)))
      return d_p[:, :batch, :width] if pad else d_p

    return run

  # Triton takes power-of-two blocks and products of at least MIN_ROWS rows.
  padded = (layers, max(_next_power_of_two(batch), MIN_ROWS), _next_power_of_two(width))
  triton_tiling = tiling or tiling_for(*padded[1:], dtype)
  if interpret is None:  # decided when lowered: Triton for CUDA, interpret mode elsewhere
    compiled = build(padded, triton_tiling, interpret=False)
    # Interpret mode: the tiles only need to divide the shape.
    interpreted = build(z0.shape, tiling_for(batch, width, dtype, for_triton=False), interpret=True)
    step = lambda d: jax.lax.platform_dependent(d, cuda=compiled, default=interpreted)
  elif interpret and not padded_as_triton:
    step = build(z0.shape, tiling_for(batch, width, dtype, for_triton=False), interpret=True)
  else:
    step = build(padded, triton_tiling, interpret=interpret)
  return step


def fused_step(model, z0: jax.Array, start_errors: jax.Array | None,
               bottom_shift: jax.Array, weights: tuple[jax.Array, jax.Array], y: jax.Array,
               output_errors, lr: float, batch_size: int, **options):
  """``fused_step_of`` with the φ, readout and precision of a network that ``fits``."""
  return fused_step_of(model.phi, model.readout, model.precision, z0, start_errors, bottom_shift,
                       weights, y, output_errors, lr, batch_size, **options)
