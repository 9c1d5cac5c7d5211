"""The residual predictive coding network, as a Flax NNX module.

Shapes: x [B, D] inputs, z [H, B, N] hidden activities (layer axis first),
outputs [B, C]. Layers are indexed from 0 in code: ``z[0]`` is z_1 of the
paper and ``hidden.kernel[k]`` maps ``z[k]`` to the prediction of ``z[k+1]``.

The inference engine (``pc``) sees every network as a stack of *stages*, each
a run of layers whose activities share one shape: an entry layer (no skip)
followed by residual layers. The dense network is one stage of H layers; the
convolutional one (``conv``) has one stage per resolution. The methods of the
stage protocol are ``stage_layers``, ``to_stages``/``from_stages``,
``entry``, ``residual_weights``, ``residual_branch``, ``readout``, ``phi``,
``weight_stacks``, and the attributes ``hidden_products`` (the layout of
inference), ``gradient_products`` (that of the weight gradient),
``unroll_inference`` (whether inference loops are unrolled when compiled),
``inference_kernel`` ("xla", or "pallas" for the fused step of ``kernels``)
and ``linear_branches``: True where every residual branch, stage entry and
the readout is a linear map of φ(z) (the dense and convolutional networks:
the engine then uses their transposes, in closed form), False where they are
general functions of z and φ is the identity (the transformer: the engine
then uses their vector–Jacobian products).
"""

from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import parameterization as parameterization_lib

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,  # tanh approximation, jax's default
}

HiddenProducts = Literal["auto", "batched", "per_layer"]
InferenceKernel = Literal["xla", "pallas"]
# The precision of the products: the dtype the residual products take their
# inputs in, and the precision XLA runs every product at (accumulation is
# float32 throughout). "float32" is true float32 everywhere. "tf32" is XLA's
# default, which on NVIDIA GPUs (Ampere on) runs float32 products on TF32
# tensor cores (10-bit mantissa inputs) and on CPU is float32. "bfloat16"
# also stores the residual products' inputs in bfloat16.
PRECISIONS = {
    "float32": (jnp.float32, jax.lax.Precision.HIGHEST),
    "tf32": (jnp.float32, jax.lax.Precision.DEFAULT),
    "bfloat16": (jnp.bfloat16, jax.lax.Precision.DEFAULT),
}


def matmul(h: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
  """h [B, in] @ kernel [in, out] in the kernel's dtype, accumulated in float32,
  at the XLA precision of ``precision`` (a key of ``PRECISIONS``)."""
  return jnp.matmul(h.astype(kernel.dtype), kernel, precision=PRECISIONS[precision][1],
                    preferred_element_type=jnp.float32)


def residual_product(kernels, multipliers: jax.Array, h, precision: str = "float32",
                     op: Callable = matmul):
  """``multipliers[s] · op(h[s], kernels[s], precision)`` for each layer s.

  Either layout: ``h`` [S, B, ...] with ``kernels`` [S, ...] (one batched
  operation over the layer axis), or tuples of S inputs [B, ...] and S kernels
  (one operation each). ``op`` is the layer's linear map (``matmul``, or a
  convolution), accumulating in float32 whatever the kernels' dtype. Pass
  kernels already sliced to the layers wanted: a slice taken inside a
  compiled loop can cost a copy per iteration.
  """
  if isinstance(h, tuple):
    return tuple(multipliers[i] * op(h[i], kernels[i], precision) for i in range(len(h)))
  if not len(h):
    return h
  scale = multipliers.reshape(multipliers.shape + (1,) * (h.ndim - 1))
  if op is matmul:  # one batched product
    return scale * matmul(h, kernels, precision)
  return scale * jax.vmap(lambda h, kernel: op(h, kernel, precision))(h, kernels)


def _fastest_layout(width: int, hidden_layers: int) -> str:
  """The layout measured fastest here: on CPU, 2-D products per layer win from
  about 2^17 residual weights up (e.g. 256 × 8: 8.8 vs 11.6 ms per step) and
  lose below (128 × 8: 3.8 vs 3.3 ms); accelerators want one batched product."""
  if jax.default_backend() != "cpu":
    return "batched"
  return "per_layer" if (hidden_layers - 1) * width * width > 2**17 else "batched"


class Premultiplier(nnx.Variable):
  """A fixed factor in front of a layer's matrix product (a_ℓ of μPC).

  Its own variable type: not an ``nnx.Param``, so optimisers built with
  ``wrt=nnx.Param`` never update it, yet it is part of ``nnx.state(model)``
  and therefore of every checkpoint.
  """


class Dense(nnx.Module):
  """``multiplier · x @ kernel``, no bias, at the XLA precision of ``precision``.

  Plain: kernel [in, out], multiplier [], x [..., in] -> [..., out].
  With ``stack=S``: S independent maps, kernel [S, in, out], multiplier [S],
  x [S, B, in] -> [S, B, out] (one batched product).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      multiplier: float,
      init: parameterization_lib.Initializer,
      rngs: nnx.Rngs,
      stack: int | None = None,
      precision: str = "float32",
  ):
    lead = () if stack is None else (stack,)
    self.kernel = nnx.Param(init(rngs.params(), lead + (in_features, out_features), in_features))
    self.multiplier = Premultiplier(jnp.full(lead, multiplier, jnp.float32))
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.multiplier[...]
    product = jnp.matmul(x, self.kernel[...], precision=PRECISIONS[self.precision][1])
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * product


def check_options(activation: str, hidden_products: str, precision: str) -> None:
  """Raises ValueError for an activation, product layout or precision that
  does not exist (the options every network takes)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
  if hidden_products not in get_args(HiddenProducts):
    raise ValueError(f"hidden_products must be one of {list(get_args(HiddenProducts))}, got "
                     f"{hidden_products!r}.")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")


class SingleStage:
  """The stage protocol's bookkeeping for a network of one stage of all its
  ``hidden_layers`` layers, whose activities are one array [H, B, ...]."""

  @property
  def stage_layers(self) -> tuple[int, ...]:
    return (self.hidden_layers,)

  def to_stages(self, z: jax.Array) -> tuple[jax.Array]:
    return (z,)

  def from_stages(self, stages: tuple[jax.Array]) -> jax.Array:
    return stages[0]


class ResidualPCN(SingleStage, nnx.Module):
  """Fully connected residual PCN: input layer, H−1 residual layers, readout.

    μ_1 = a_1 W_1 x,  μ_ℓ = a_ℓ W_ℓ φ(z_{ℓ-1}) + z_{ℓ-1} (ℓ = 2…H),  μ_L = a_L W_L φ(z_H)

  Args:
    in_features: D, the flattened input size.
    width: N, the size of every hidden layer.
    hidden_layers: H ≥ 1, the number of hidden (free) layers; the network has
      L = H + 1 weight matrices.
    out_features: C, the output size.
    activation: a key of ``ACTIVATIONS``.
    parameterization: a key of ``parameterization.PARAMETERIZATIONS``.
    depth_exponent: α of the residual premultiplier 1/√N · L^(−α) under μPC
      (0.5, the paper's Depth-μP; 1, CompleteP).
    hidden_products: how inference holds and applies the hidden layers:
      "batched" (activities as one [H, B, N] array, one batched matrix product
      over the layer axis) or "per_layer" (a tuple of [B, N] arrays, one 2-D
      product each). Same result; "auto" takes the faster measured on the
      backend (docs/benchmarks.md): per_layer on CPU unless the residual stack
      is tiny, batched on GPU/TPU.
    precision: of the products, a key of ``PRECISIONS``: "float32" (true
      float32), "tf32" (XLA's default: TF32 tensor cores on NVIDIA GPUs) or
      "bfloat16" (residual products take bfloat16 inputs). Accumulation is
      float32 in all three; on CPU, "tf32" is float32.
    inference_kernel: "xla" (inference steps as XLA compiles them), or
      "pallas" for the fused two-kernel step of ``kernels`` (Triton on a GPU,
      interpret mode elsewhere: for checking, not speed). It needs the
      batched layout, which "auto" then takes.
    rngs: supplies the ``params`` key for the weight initialisation.
  """

  def __init__(
      self,
      in_features: int,
      width: int,
      hidden_layers: int,
      out_features: int,
      *,
      activation: str = "relu",
      parameterization: str = "mupc",
      depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
      hidden_products: HiddenProducts = "auto",
      precision: str = "float32",
      inference_kernel: InferenceKernel = "xla",
      rngs: nnx.Rngs,
  ):
    for name, value in [("in_features", in_features), ("width", width),
                        ("hidden_layers", hidden_layers), ("out_features", out_features)]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ResidualPCN needs {name} to be a positive integer, got {value!r}.")
    check_options(activation, hidden_products, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    if inference_kernel not in get_args(InferenceKernel):
      raise ValueError(f"inference_kernel must be one of {list(get_args(InferenceKernel))}, got "
                       f"{inference_kernel!r}.")
    if inference_kernel == "pallas" and hidden_products == "per_layer":
      raise ValueError("The Pallas inference kernel needs hidden_products='batched' (or 'auto').")
    if hidden_products == "auto":
      hidden_products = "batched" if inference_kernel == "pallas" else _fastest_layout(width, hidden_layers)
    p = parameterization_lib.get(parameterization)
    d, n, num_matrices = in_features, width, hidden_layers + 1
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.hidden_products = hidden_products
    self.precision = precision
    self.inference_kernel = inference_kernel
    self.unroll_inference = False  # compiled loops of matrix products run at full speed
    self.linear_branches = True
    # The weight gradient as one stacked product: on CPU at 256 × 32, 3.7 ms
    # against 23 ms for per-layer products (whichever layout inference uses).
    self.gradient_products = "batched"
    self.input_layer = Dense(d, n, multiplier=p.entry_multiplier(d, num_matrices), init=p.init,
                             rngs=rngs, precision=precision)
    self.hidden = Dense(n, n, multiplier=p.residual_multiplier(n, num_matrices, depth_exponent),
                        init=p.init, rngs=rngs, stack=hidden_layers - 1, precision=precision)
    self.readout = Dense(n, out_features, multiplier=p.readout_multiplier(n, num_matrices),
                         init=p.init, rngs=rngs, precision=precision)

  @property
  def hidden_layers(self) -> int:
    return self.hidden.kernel.shape[0] + 1

  @property
  def width(self) -> int:
    return self.input_layer.kernel.shape[1]

  def phi(self, z: jax.Array) -> jax.Array:
    """The activation φ."""
    return ACTIVATIONS[self.activation](z)

  # --- The stage protocol (one stage) ---------------------------------------------

  def entry(self, stage: int, h: jax.Array) -> jax.Array:
    """The prediction of the stage's first layer: a_1 W_1 x from x [B, D]."""
    del stage
    return self.input_layer(h)

  def residual_weights(self, stage: int = 0, dtype=None) -> tuple[jax.Array, jax.Array]:
    """(kernels [H−1, N, N] in ``dtype``, default that of the products, multipliers [H−1])."""
    del stage
    return self.hidden.kernel[...].astype(dtype or self._dtype), self.hidden.multiplier[...]

  def residual_branch(self, stage: int, weights, h):
    """The residual branches a_ℓ h W_ℓ of the layers ``weights`` hold (sliced
    to them), for their inputs ``h`` (φ(z), or differences of φ), either
    layout: see ``residual_product``."""
    del stage
    return residual_product(*weights, h, self.precision)

  @staticmethod
  def weight_stacks(params) -> list[jax.Array]:
    """The weight matrices bottom to top as arrays with a leading layer axis:
    [1, D, N], [H−1, N, N], [1, N, C]. ``params``: the ``nnx.Param`` state
    (or a pure dict of it)."""
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    return [params["input_layer"]["kernel"][None], params["hidden"]["kernel"],
            params["readout"]["kernel"][None]]

  # ------------------------------------------------------------------------------------

  @property
  def _dtype(self):
    return PRECISIONS[self.precision][0]

  def feedforward(self, x: jax.Array) -> jax.Array:
    """The feed-forward pass: hidden activities z [H, B, N] with z_ℓ = μ_ℓ."""
    return self._forward(x, keep_all=True)

  def _forward(self, x: jax.Array, keep_all: bool) -> jax.Array:
    """All activities [H, B, N] (``keep_all``), or only the top one [B, N]."""
    z = self.input_layer(x)
    kernels, multipliers = self.residual_weights()
    if keep_all and self.hidden_products == "per_layer":
      # Unrolled for the inference start: on XLA's CPU runtime, a loop followed
      # by more work (here, the inference loops) runs slower.
      activities = [z]
      for k in range(len(multipliers)):
        z = self.residual_branch(0, ((kernels[k],), multipliers[k:k + 1]), (self.phi(z),))[0] + z
        activities.append(z)
      return jnp.stack(activities)

    def layer(z, params):
      kernel, a = params
      z = self.residual_branch(0, (kernel[None], a[None]), self.phi(z)[None])[0] + z
      return z, (z if keep_all else None)

    top, rest = jax.lax.scan(layer, z, (kernels, multipliers))
    return jnp.concatenate([z[None], rest]) if keep_all else top

  def output(self, z_top: jax.Array) -> jax.Array:
    """μ_L = a_L W_L φ(z_H) for the top hidden activity z_top [B, N] -> [B, C]."""
    return self.readout(self.phi(z_top))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C] for inputs x [B, D] (test time: no inference)."""
    return self.output(self._forward(x, keep_all=False))
