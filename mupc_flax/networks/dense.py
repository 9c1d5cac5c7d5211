"""The fully connected residual PCN (the paper's network), as a Flax NNX module.

Shapes: x [B, D] inputs, z [H, B, N] hidden activities (layer axis first),
outputs [B, C]. Layers are indexed from 0 in code: ``z[0]`` is z_1 of the
paper and ``hidden.kernel[k]`` maps ``z[k]`` to the prediction of ``z[k+1]``.
It is one stage of the ``PCNetwork`` protocol, whose every map is linear in
φ(z) (``linear_branches``).
"""

import jax
from flax import nnx

from mupc_flax import parameterization as parameterization_lib
from mupc_flax.networks import kinds
from mupc_flax.networks.layers import ACTIVATIONS, PRECISIONS, Dense, check_options, residual_product


class ResidualPCN(nnx.Module):
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
    precision: of the products, a key of ``PRECISIONS``: "float32" (true
      float32), "tf32" (XLA's default: TF32 tensor cores on NVIDIA GPUs) or
      "bfloat16" (residual products take bfloat16 inputs). Accumulation is
      float32 in all three; on CPU, "tf32" is float32.
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
      precision: str = "float32",
      rngs: nnx.Rngs,
  ):
    for name, value in [("in_features", in_features), ("width", width),
                        ("hidden_layers", hidden_layers), ("out_features", out_features)]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ResidualPCN needs {name} to be a positive integer, got {value!r}.")
    check_options(activation, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    p = parameterization_lib.get(parameterization)
    d, n, num_matrices = in_features, width, hidden_layers + 1
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.precision = precision
    self.linear_branches = True
    options = lambda role, fan_in, fan_out: p.layer_options(role, fan_in, fan_out, num_matrices,
                                                            depth_exponent)
    self.input_layer = Dense(d, n, rngs=rngs, precision=precision, **options("entry", d, n))
    self.hidden = Dense(n, n, rngs=rngs, stack=hidden_layers - 1, precision=precision,
                        **options("residual", n, n))
    self.readout = Dense(n, out_features, rngs=rngs, precision=precision,
                         **options("readout", n, out_features))

  @property
  def hidden_layers(self) -> int:
    return self.hidden.kernel.shape[0] + 1

  @property
  def width(self) -> int:
    return self.input_layer.kernel.shape[1]

  def phi(self, z: jax.Array) -> jax.Array:
    """The activation φ."""
    return ACTIVATIONS[self.activation](z)

  # --- The PCNetwork protocol (one stage) -------------------------------------------

  @property
  def stage_layers(self) -> tuple[int, ...]:
    return (self.hidden_layers,)

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

  @property
  def _dtype(self):
    return PRECISIONS[self.precision][0]

  def feedforward(self, x: jax.Array) -> jax.Array:
    """The feed-forward pass: hidden activities z [H, B, N] with z_ℓ = μ_ℓ."""
    from mupc_flax.pc import forward  # the engine imports the networks' layers
    return forward.feedforward(self, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C] for inputs x [B, D] (test time: no inference)."""
    from mupc_flax.pc import forward
    return forward.predict(self, x)


def make_network(spec, *, width: int = 512, hidden_layers: int = 8, activation: str = "relu",
                 parameterization: str = "mupc",
                 depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
                 precision: str = "float32", rngs: nnx.Rngs) -> ResidualPCN:
  """The dense network for a dataset of ``spec`` (flattened inputs, its classes)."""
  return ResidualPCN(spec.input_size, width, hidden_layers, spec.num_classes,
                     activation=activation, parameterization=parameterization,
                     depth_exponent=depth_exponent, precision=precision, rngs=rngs)


KIND = kinds.NetworkKind(make=make_network, smoke=dict(width=64, hidden_layers=4),
                         depth_field="hidden_layers")
