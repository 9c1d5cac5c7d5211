"""Prints text sampled from a language model's newest checkpoint.

    python -m mupc_flax.sample --workdir=runs/shakespeare --prompt="ROMEO:" --length=200
    python -m mupc_flax.sample --workdir=runs/shakespeare --prompt="To be" --temperature=0

The workdir's config (its newest record) names the dataset, whose
vocabulary maps characters to token ids, and the network; the weights are
the newest checkpoint's, read and never written. Each new character is drawn
from softmax(μ_L / τ) of the feed-forward prediction at the last position of
the window (the last ``context`` characters so far); τ = 0 takes the most
likely one. The prompt, then the sampled text, go to stdout.
"""

from absl import app, flags
from flax import nnx

from mupc_flax import checkpointing, cli, data, sampling, workdir as records
from mupc_flax.errors import UserError
from mupc_flax.validation import build_model

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "The text to continue (default: a new line).")
_LENGTH = flags.DEFINE_integer("length", 200, "The characters to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "τ: 1 samples the model's distribution, "
                                  "0 takes the most likely character.")
_SEED = flags.DEFINE_integer("seed", 0, "The sampler's random seed.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: every option is a --flag=value.")
  if _LENGTH.value < 0:
    raise UserError(f"--length must be 0 or more characters, got {_LENGTH.value}.")
  if not _TEMPERATURE.value >= 0:
    raise UserError(f"--temperature must be 0 or more, got {_TEMPERATURE.value}.")
  if not _PROMPT.value:
    raise UserError("--prompt is empty; give at least one character (the default is a new line).")
  workdir = cli.resolve_path(_WORKDIR.value, "--workdir")
  config = records.newest_config(workdir)
  if config.data.name not in data.TEXT_DATASETS:
    raise UserError(f"{workdir} trained on {config.data.name}, not text; sample from a run of a "
                    f"text dataset ({', '.join(data.TEXT_DATASETS)}).")
  spec = data.spec_of(config.data)
  try:
    spec.encode(_PROMPT.value)
  except data.DataError as e:
    raise UserError(f"--prompt: {e}") from None
  model = build_model(config, spec)
  restored = checkpointing.restore_model(checkpointing.directory(workdir), nnx.state(model))
  if restored is None:
    raise UserError(f"{workdir} holds no checkpoint yet; train first (or wait for the first "
                    "save).")
  nnx.update(model, restored[0])
  print(_PROMPT.value + sampling.sample_text(model, spec, _PROMPT.value, _LENGTH.value,
                                             _TEMPERATURE.value, _SEED.value))


if __name__ == "__main__":
  cli.run(main)
