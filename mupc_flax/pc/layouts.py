"""The two layouts inference holds a stage's layers in, and their upper layers.

Each stage's layers are either one [S, B, ...] array ("batched") or a tuple
of S [B, ...] arrays ("per_layer"). Both support x[i], x[a:b] and len(x),
and jax.tree.map applies element-wise maps to either; these helpers cover
the rest. The *upper* layers are the part of a per-stage tuple from one
layer to the top: the layers one inference loop updates.
"""

import jax
import jax.numpy as jnp


def arrange(x: jax.Array, per_layer: bool):
  """[S, B, ...] as the layout: itself, or a tuple of its S layers."""
  return tuple(x) if per_layer else x


def arrange_each(arrays, per_layer: bool) -> tuple:
  """``arrange`` of each [S, B, ...] array of ``arrays`` (e.g. one per stage)."""
  return tuple(arrange(x, per_layer) for x in arrays)


def stacked(x) -> jax.Array:
  """Either layout as one [S, B, ...] array."""
  return jnp.stack(x) if isinstance(x, tuple) else x


def join(lower, upper):
  """Layers ``lower`` below layers ``upper``, in the layout of ``upper``."""
  if isinstance(upper, tuple):
    return tuple(lower) + upper
  return jnp.concatenate([lower, upper]) if len(lower) else upper


def single(x: jax.Array, like):
  """One layer's [B, ...] array as a one-layer slice in the layout of ``like``."""
  return (x,) if isinstance(like, tuple) else x[None]


def per_layer_sum_of_squares(x) -> jax.Array:
  """Σ x² of each layer [S]."""
  if isinstance(x, tuple):
    return jnp.stack([jnp.sum(jnp.square(v)) for v in x]) if x else jnp.zeros((0,))
  return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def upper(stages: tuple, stage: int, index: int) -> tuple:
  """The layers from (``stage``, ``index``) to the top, per stage from ``stage`` up."""
  return (stages[stage][index:],) + stages[stage + 1:]


def with_upper(stages: tuple, updated: tuple, stage: int, index: int) -> tuple:
  """``stages`` with its upper layers from (``stage``, ``index``) replaced by ``updated``."""
  return stages[:stage] + (join(stages[stage][:index], updated[0]),) + updated[1:]


def is_stacked(weights: tuple) -> bool:
  """Whether residual weights (a tuple of layer-indexed sequences) are arrays
  with a leading layer axis, rather than tuples of per-layer values."""
  return all(isinstance(w, jax.Array) or hasattr(w, "shape") for w in weights)


def cut(weights: tuple, first: int, stop: int | None = None, per_layer: bool = False) -> tuple:
  """Each sequence of ``weights`` sliced to layers [first, stop); with
  ``per_layer``, cut into a tuple of those layers' values."""
  sliced = tuple(w[first:stop] for w in weights)
  return tuple(tuple(w[i] for i in range(len(w))) for w in sliced) if per_layer else sliced
