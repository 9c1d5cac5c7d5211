"""How the engine computes: choices that change speed, never the result.

``Engine`` holds what a user may set; ``plan`` turns it into concrete
choices for one network and input shape, taking every "auto" from the
backend and the network's shapes, as measured (docs/benchmarks.md). No
choice is an attribute of a network.
"""

import dataclasses
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from mupc_flax.errors import FieldError
from mupc_flax.pc import layouts, pallas_step

Layout = Literal["auto", "stacked", "per_layer"]
Kernel = Literal["xla", "pallas"]

# On CPU, 2-D products per layer win from about this many residual weights
# up (dense 256 × 8: 8.8 vs 11.6 ms per step) and lose below (128 × 8: 3.8 vs
# 3.3 ms); accelerators want one stacked product.
_PER_LAYER_FROM = 2**17


@dataclasses.dataclass(frozen=True)
class Engine:
  """The engine's choices (each "auto"/None: the measured default).

  Attributes:
    layout: how inference holds each stage's activities: "stacked" (one
      [S, B, ...] array, one batched product over the layer axis) or
      "per_layer" (a tuple of S arrays [B, ...], one product each). Auto:
      stacked on accelerators; on CPU per layer for convolutions and, for
      state inference, more than 2^17 stacked residual weights, else stacked
      (inference on the errors, a forward and a backward pass per step,
      keeps dense stages stacked: 10.7 against 21.4 ms per ePC step at
      128 × 64, 1.5 against 9.2 s to compile). Networks whose residual
      weights are per-layer tuples are always per layer.
    gradient_layout: the same choice for the weight gradient's products.
      Auto: stacked wherever the weights are, except convolutions on CPU (a
      stacked convolution is a grouped one, whose kernel gradient XLA's CPU
      runtime computes slowly: 2.2 s against 6 ms per step at 14×14×8).
    unroll: write inference loops out when compiled. Auto: for convolutions
      on CPU (XLA's CPU runtime runs a convolution about 3× slower inside a
      while loop: 18 vs 53 ms per inference step at 14×14×8, jax 0.10.2).
    closed_form: the activity gradient from the maps' transposes, in closed
      form, for networks that declare ``linear_branches``; False always
      takes the general path, ``jax.grad`` of the energy. Auto: True (1.16×
      faster inference on CPU at 256 × 32 than through ``jax.grad``).
    kernel: "xla", or "pallas" for the fused two-kernel step of
      ``mupc_flax.pc.pallas_step`` (a single stacked stage of matrix products
      a·φ(z)W, plain gradient descent; Triton on a GPU, interpret mode
      elsewhere: opt-in).
  """

  layout: Layout = "auto"
  gradient_layout: Layout = "auto"
  unroll: bool | None = None
  closed_form: bool | None = None
  kernel: Kernel = "xla"

  def __post_init__(self):
    for name in ("layout", "gradient_layout"):
      if getattr(self, name) not in get_args(Layout):
        raise FieldError(name, f"Engine {name} must be one of {list(get_args(Layout))}, got "
                         f"{getattr(self, name)!r}.")
    if self.kernel not in get_args(Kernel):
      raise FieldError("kernel", f"Engine kernel must be one of {list(get_args(Kernel))}, got {self.kernel!r}.")
    if self.kernel == "pallas" and self.layout == "per_layer":
      raise FieldError("layout", "The Pallas kernel needs the stacked layout: use layout='stacked' or 'auto'.")


class Plan(NamedTuple):
  """The concrete choices for one network (see ``Engine``)."""

  per_layer: bool
  gradient_per_layer: bool
  unroll: bool
  closed_form: bool
  kernel: str

  @property
  def unrolled(self) -> bool:
    """Whether the forward pass is written out per layer: where the layers
    are held per layer or inference unrolls its loop."""
    return self.per_layer or self.unroll


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "jaxpr"):
          names |= _primitives(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
        elif hasattr(sub, "eqns"):
          names |= _primitives(sub)
  return names


def branch_primitives(network, x: jax.ShapeDtypeStruct) -> set[str]:
  """The primitives of one residual branch of each stage (and of its entry),
  traced on abstract values: what the measured defaults depend on."""
  def one_layer_each(x):
    out, below = [], x
    for s, layers in enumerate(network.stage_layers):
      z = network.entry(s, below)
      if layers > 1:
        weights = layouts.cut(network.residual_weights(s), 0, 1, per_layer=True)
        z = network.residual_branch(s, weights, (network.phi(z),))[0] + z
      out.append(z)
      below = network.phi(z)
    return out

  return _primitives(jax.make_jaxpr(one_layer_each)(x).jaxpr)


def plan(engine: "Engine | None", network, x, method: str = "states") -> Plan:
  """``engine``'s choices for ``network`` on inputs shaped like ``x`` [B, ...],
  for inference on the ``method``'s variables ("states" or "errors")."""
  engine = engine or Engine()
  weights = [network.residual_weights(s) for s in range(len(network.stage_layers))]
  stacked = all(layouts.is_stacked(w) for w in weights)
  on_cpu = jax.default_backend() == "cpu"
  convolution = "conv_general_dilated" in branch_primitives(
      network, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
  if engine.kernel == "pallas":
    if not pallas_step.fits(network, x):
      raise ValueError("The Pallas kernel fuses one stacked stage of matrix products a·φ(z)W (the "
                       "dense network's); this network is not one: use kernel='xla'.")
  if not stacked and (engine.layout == "stacked" or engine.gradient_layout == "stacked"):
    raise ValueError("This network's residual weights are per-layer tuples: use the layout "
                     "'per_layer' or 'auto'.")

  def per_layer(choice: str, auto: bool) -> bool:
    return not stacked or (choice == "per_layer" if choice != "auto" else auto)

  big = sum(w.size for stage in weights for w in stage if hasattr(w, "ndim") and w.ndim >= 3)
  return Plan(
      per_layer=per_layer(engine.layout, engine.kernel != "pallas" and on_cpu
                          and (convolution or (method == "states" and big > _PER_LAYER_FROM))),
      gradient_per_layer=per_layer(engine.gradient_layout, on_cpu and convolution),
      unroll=on_cpu and convolution if engine.unroll is None else engine.unroll,
      closed_form=bool(getattr(network, "linear_branches", False)) and engine.closed_form is not False,
      kernel=engine.kernel)

