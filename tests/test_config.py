"""lib/config.py: YAML + dotted overrides into frozen dataclasses, with errors that name the key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lib import config
from lib.config import ConfigError
from models import llama

TINY = llama.PRESETS["tiny"]


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup: int | None = None


@dataclass(frozen=True)
class Run:
    model: llama.Config = TINY
    optim: Optim = Optim()
    steps: int = 10
    data: Path | None = None
    log_layers: tuple[int, ...] = ()


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 3e-4\n  warmup: 100\ndata: /data/corpus\n")
    run = config.parse_argv(Run, [str(path), "steps=7", "optim.schedule=linear"])
    assert run.steps == 7  # the override wins over the file
    assert run.optim == Optim(lr=3e-4, schedule="linear", warmup=100)  # "3e-4" is a YAML string
    assert run.data == Path("/data/corpus")
    assert run.model == TINY


def test_nested_edit_starts_from_the_field_default():
    # The default model is the tiny preset: editing one field must not fall back to 7B shapes.
    run = config.load(Run, overrides=["model.n_layers=3"])
    assert run.model == dataclasses.replace(TINY, n_layers=3)
    assert config.load(Run, overrides=["optim.lr=0.5"]).optim == Optim(lr=0.5)


def test_preset_by_name_then_edit(tmp_path):
    run = config.load(Run, overrides=["model=tiny-mha", "model.n_layers=3"])
    assert run.model == dataclasses.replace(llama.PRESETS["tiny-mha"], n_layers=3)
    path = write(tmp_path, "model: llama2-7b\n")
    run = config.load(Run, path, ["model.n_layers=2"])
    assert run.model == dataclasses.replace(llama.PRESETS["llama2-7b"], n_layers=2)
    path = write(tmp_path, "model:\n  preset: llama3.1-8b\n  max_seq_len: 4096\n")
    run = config.load(Run, path)
    assert run.model == dataclasses.replace(llama.PRESETS["llama3.1-8b"], max_seq_len=4096)
    assert run.model.rope_scaling == llama.RopeScaling()


def test_dump_then_load_round_trips(tmp_path):
    run = config.load(Run, overrides=["model=llama3.1-8b", "optim.betas=[0.8, 0.9]", "log_layers=[1, 3]",
                                      "data=/x"])
    config.dump(run, tmp_path / "dumped.yaml")
    assert config.load(Run, tmp_path / "dumped.yaml") == run


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'lr'\?"):
        config.load(Run, overrides=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'model.n_layer'; did you mean 'n_layers'\?"):
        config.load(Run, overrides=["model=tiny", "model.n_layer=3"])
    with pytest.raises(ConfigError, match=r"unknown Config preset 'tinny'; did you mean 'tiny'\?"):
        config.load(Run, overrides=["model=tinny"])


def test_wrong_type_names_key_expected_and_value():
    with pytest.raises(ConfigError, match=r"^steps: expected int, got 'abc'$"):
        config.load(Run, overrides=["steps=abc"])
    with pytest.raises(ConfigError, match=r"^steps: expected int, got 2.5$"):
        config.load(Run, overrides=["steps=2.5"])
    with pytest.raises(ConfigError, match=r"^model.tie_embeddings: expected bool"):
        config.load(Run, overrides=["model.tie_embeddings=1"])
    with pytest.raises(ConfigError, match=r"^optim.lr: expected float, got 'fast'$"):
        config.load(Run, overrides=["optim.lr=fast"])


def test_optional():
    assert config.load(Run, overrides=["optim.warmup=null"]).optim.warmup is None
    assert config.load(Run, overrides=["optim.warmup=5"]).optim.warmup == 5
    with pytest.raises(ConfigError, match=r"^optim.warmup: expected int \| None, got 'soon'$"):
        config.load(Run, overrides=["optim.warmup=soon"])


def test_tuples():
    run = config.load(Run, overrides=["optim.betas=[0.8, 0.99]", "log_layers=[0, 2, 4]"])
    assert run.optim.betas == (0.8, 0.99) and run.log_layers == (0, 2, 4)
    with pytest.raises(ConfigError, match=r"^optim.betas: expected 2 items, got 3"):
        config.load(Run, overrides=["optim.betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"^log_layers\[1\]: expected int, got 'x'$"):
        config.load(Run, overrides=["log_layers=[1, x]"])
    with pytest.raises(ConfigError, match=r"^optim.betas: expected a list"):
        config.load(Run, overrides=["optim.betas=0.9"])


def test_literal():
    with pytest.raises(ConfigError, match=r"^optim.schedule: expected one of \['cosine', 'linear'\], got 'cos'$"):
        config.load(Run, overrides=["optim.schedule=cos"])


def test_model_validation_becomes_a_config_error():
    with pytest.raises(ConfigError, match="model: dim=64 is not divisible by n_heads=5"):
        config.load(Run, overrides=["model.n_heads=5"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        config.parse_argv(Run, [str(tmp_path / "missing.yaml")])
    bad = write(tmp_path, "steps: [1, 2\n")
    with pytest.raises(ConfigError, match=f"config file '{bad}' is not valid YAML"):
        config.load(Run, bad)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(Run, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load(Run, overrides=["steps"])
    with pytest.raises(ConfigError, match="'steps' holds 10, not a mapping"):
        config.load(Run, write(tmp_path, "steps: 10\n"), ["steps.x=1"])
