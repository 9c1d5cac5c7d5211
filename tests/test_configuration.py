"""Config sections that are the engine's dataclasses, the variants table, and the renamed fields."""

import dataclasses
import json
import pathlib
import re

import pytest

from mupc_flax import configuration, main, pc, validation, variants, workdir
from mupc_flax.errors import FieldError, UserError

REPO = pathlib.Path(__file__).resolve().parent.parent


def load(arg=None):
  return configuration.load(str(REPO / "configs/default.py") + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("name,spec", [("engine", pc.Engine), ("inference", pc.Inference)])
def test_sections_hold_exactly_the_dataclass_fields_at_their_defaults(name, spec):
  config = load()
  fields = {f.name: f.default for f in dataclasses.fields(spec) if f.name != "engine"}
  assert dict(config[name]) == fields
  built = validation.engine_of(config) if name == "engine" else validation.inference_of(config)
  assert built == (spec() if name == "engine" else spec(engine=pc.Engine()))


def test_a_new_dataclass_field_is_settable_from_a_config_with_no_other_edit():
  @dataclasses.dataclass(frozen=True)
  class Extended(pc.Inference):
    new_option: int | None = None

  section = configuration.section(Extended)
  assert "new_option" in section and section.new_option is None
  config = load()
  config.inference = section
  configuration.override(config, "inference.new_option=5")  # typed placeholder: parses an int
  configuration.override(config, "new_option=7")  # a bare name: only config.inference has it
  built = configuration.build(Extended, config.inference, "inference", engine=pc.Engine())
  assert built.new_option == 7 and isinstance(built, Extended)


@pytest.mark.parametrize("field,value", [("momentum", 1.5), ("steps", -1), ("phases", 0),
                                         ("output_precision", 0.0), ("step_guard", -2),
                                         ("steps_per_layer", 0)])
def test_a_bad_value_names_its_field(field, value):
  with pytest.raises(FieldError) as caught:
    pc.Inference(**{field: value})
  assert caught.value.field == field
  config = load()
  config.inference[field] = value
  with pytest.raises(UserError, match=rf"^config\.inference\.{field}: "):
    validation.inference_of(config)


@pytest.mark.parametrize("old,new", sorted(configuration.RENAMED.items()))
def test_old_field_names_fail_with_the_new_name(old, new):
  bare = old.split(".")[1]
  if bare == new.split(".")[1]:  # the same name in its new section: a bare override finds it
    assert str(load(f"{bare}=1").inference[bare]) in ("1", "1.0")
  else:
    with pytest.raises(ValueError, match=rf"{bare} is now config\.{re.escape(new)}"):
      load(f"{bare}=1")
  with pytest.raises(ValueError, match=rf"{re.escape(old)} is now {re.escape(new)}"):
    load(f"{old}=1")
  config = load()
  with config.unlocked():  # as a config file of the old layout would set it
    config.train[bare] = 1
  with pytest.raises(UserError, match=rf"config\.{re.escape(old)} is now config\.{re.escape(new)}"):
    validation.validate_config(config, num_devices=1, num_processes=1)


def test_a_bare_name_two_sections_have_must_name_its_section():
  with pytest.raises(ValueError, match="config.inference and config.train; name its section"):
    load("optimizer=sgd")
  assert load("train.optimizer=sgd").train.optimizer == "sgd"
  assert load("inference.optimizer=nesterov").inference.optimizer == "nesterov"


def _old_layout(record: dict) -> dict:
  """A config record as the layout before config.inference wrote it."""
  record = json.loads(json.dumps(record))
  inference, engine = record.pop("inference"), record["engine"]
  record["engine"] = {"layout": engine["layout"], "kernel": engine["kernel"]}
  for old, new in configuration.RENAMED.items():
    value = inference[new.split(".")[1]]
    old_values = {"train.inference_steps": {None: 0}, "train.schedule": {None: "wavefront"}}
    record["train"][old.split(".")[1]] = old_values.get(old, {}).get(value, value)
  return record


@pytest.mark.parametrize("arg", [None, "deep", "epc"])
def test_a_workdir_of_the_old_layout_resumes_without_a_change_record(tmp_path, arg):
  config = load(arg)
  (tmp_path / "config.json").write_text(json.dumps(_old_layout(json.loads(
      config.to_json_best_effort()))))
  workdir.record_config(config, tmp_path, start_step=30)
  assert not list(tmp_path.glob("config.30.json"))
  config.inference.lr = 0.125  # a real change is still recorded
  workdir.record_config(config, tmp_path, start_step=30)
  assert json.loads((tmp_path / "config.30.json").read_text())["inference"]["lr"] == 0.125


def test_help_and_readme_list_the_variants_table():
  for name, variant in variants.VARIANTS.items():
    assert f"  {name}: {variant.help}" in main.__doc__
  readme = (REPO / "README.md").read_text()
  block = readme.split("<!-- variants -->\n")[1].split("<!-- /variants -->")[0]
  assert block == "".join(f"- `{line.split(': ', 1)[0]}`: {line.split(': ', 1)[1]}\n"
                          for line in variants.help_lines())


@pytest.mark.parametrize("config, variant, per_sample", [
    ("configs/default.py", "epc", variants.EPC_STEP_PER_SAMPLE),
    ("configs/default.py", "deep", variants.DEEP_STEP_PER_SAMPLE),
    ("configs/shakespeare.py", "epc", variants.EPC_STEP_PER_SAMPLE / 64),
    ("configs/shakespeare.py", "deep", variants.DEEP_STEP_PER_SAMPLE / 64),
    ("configs/shakespeare.py", "context=16,batch_size=32,epc", variants.EPC_STEP_PER_SAMPLE / 16),
])
def test_the_variants_inference_steps_are_per_sample_and_per_position(config, variant, per_sample):
  """β on the batch-mean energy is s·B, over the T positions of a text window."""
  loaded = configuration.load(f"{REPO / config}:{variant}")
  assert loaded.inference.lr == pytest.approx(per_sample * loaded.train.batch_size)
