"""Networks: the ``PCNetwork`` protocol, the built-in kinds and their building blocks.

- ``protocol``: the one contract between a network and the engine;
- ``kinds``: ``config.model.kind`` → a factory (built-in or ``module:factory``);
- ``layers``: activations, product precisions, premultiplied layers;
- ``dense``, ``conv``, ``transformer``, ``causal_transformer``: the built-in kinds, each with its
  config fields, smoke shape and depth field (``KIND``).
"""

from mupc_flax.networks.protocol import PCNetwork

__all__ = ["PCNetwork"]
