"""lib/config.py: YAML + dotted overrides into frozen dataclasses, with errors that name the key."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lib import config
from lib.config import ConfigError
from models import llama
from runners.pretrain import PretrainConfig
from runners.sft import SftConfig

REPO = Path(__file__).resolve().parent.parent
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


def test_a_string_key_takes_a_bare_integer():
    from lib.data import DataConfig

    assert config.load(DataConfig, overrides=["split=1"]).split == "1"
    with pytest.raises(ConfigError, match="^split: expected str, got True$"):
        config.load(DataConfig, overrides=["split=true"])


def test_model_validation_becomes_a_config_error():
    with pytest.raises(ConfigError, match="^model.dim=64 is not divisible by n_heads=5$"):
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


# ---------------------------------------------------------------------------------------------
# Ranges of the runners' real configs: each bad value is refused, naming the key and the value.

BAD_VALUES = [
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=.inf", "optim.lr=inf must be a finite number"),          # YAML's own infinity
    ("optim.min_lr=-inf", "optim.min_lr=-inf must be a finite number"),
    ("optim.lr=-1", "optim.lr=-1.0 and min_lr=0.0002 must be >= 0"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5 is above lr=0.002"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0"),
    ("optim.eps=-1e-8", "optim.eps=-1e-08 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.weight_decay=600", "optim.weight_decay=600.0 times lr=0.002 is >= 1"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("optim.beta1=1", r"optim.beta1=1.0 must lie in \[0, 1\)"),
    ("optim.beta2=-0.5", r"optim.beta2=-0.5 must lie in \[0, 1\)"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.warmup_steps=400", "optim.decay_steps=300 must exceed warmup_steps=400"),
    ("train.step.loss_scale.initial=0", "train.step.loss_scale.initial=0.0 must be > 0"),
    ("train.step.loss_scale.backoff_factor=1", r"train.step.loss_scale.backoff_factor=1.0 must lie in \(0, 1\)"),
    ("train.step.loss_scale.growth_factor=0.5", "train.step.loss_scale.growth_factor=0.5 must be >= 1"),
    ("train.step.loss_scale.growth_interval=0", "train.step.loss_scale.growth_interval=0 must be >= 1"),
    ("train.step.loss_scale.min_scale=0", "train.step.loss_scale.min_scale=0.0 must be > 0"),
    ("train.step.micro_batches=0", "train.step.micro_batches=0 must be >= 1"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("train.seed=-1", r"train.seed=-1 must lie in \[0, 2\*\*32\)"),
    ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
    ("data.seed=4294967296", r"data.seed=4294967296 must lie in \[0, 2\*\*32\)"),
    ("data.weights=[1, nan]", r"data.weights=\(1.0, nan\) must be a finite number"),
    ("data.split=9,x,1", "data: split '9,x,1': expected comma-separated numbers"),
    ("data.split=inf,1,1", "data.split='inf,1,1' must hold finite numbers"),
    ("checkpoint.every=0", "checkpoint.every=0 must be >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("mesh.tensor=0", "mesh: mesh axis sizes must be positive or -1"),
    ("model.vocab_size=0", "model.vocab_size=0 must be >= 1"),
    ("model.n_heads=0", "model.n_heads=0 must be >= 1"),
    ("model.n_kv_heads=0", "model.n_kv_heads=0 must be >= 1"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("model.rope_theta=nan", "model.rope_theta=nan must be a finite number"),
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor=0.5 must be >= 1"),
    ("model.rope_scaling.low_freq_factor=4", "model.rope_scaling.low_freq_factor=4.0 must be > 0 and below"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match="^" + message):
        config.load(PretrainConfig, overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("lora.alpha=0", "lora.alpha=0.0 must be positive"),
    ("lora.alpha=nan", "lora.alpha=nan must be a finite number"),
    ("lora.dropout=1", r"lora.dropout=1.0 must be in \[0, 1\)"),
])
def test_out_of_range_lora_values(override, message):
    with pytest.raises(ConfigError, match="^" + message):
        config.load(SftConfig, overrides=[override])


def _float_keys(cls, prefix=""):
    """Dotted keys of every float (or tuple-of-float) field reachable from config class `cls`."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        for arg in args:
            if dataclasses.is_dataclass(arg):
                yield from _float_keys(arg, f"{prefix}{f.name}.")
            elif arg is float or float in typing.get_args(arg):
                yield f"{prefix}{f.name}", arg is not float


def test_every_float_key_refuses_nan():
    """A guard for configs added later: none of them may take a NaN, in any runner."""
    checked = []
    for cls in (PretrainConfig, SftConfig):
        for key, is_list in _float_keys(cls):
            value = "[nan]" if is_list else "nan"
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*nan.* must be a finite number"):
                config.load(cls, overrides=[f"{key}={value}"])
            checked.append(key)
    assert {"optim.lr", "train.step.loss_scale.initial", "model.rope_scaling.factor", "data.weights",
            "lora.alpha"} <= set(checked)


def test_runner_command_line_refuses_nan(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runners.pretrain", "optim.lr=nan", f"out_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: optim.lr=nan must be a finite number\n"
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_dump_is_atomic(tmp_path, monkeypatch):
    """A crash while writing config.yaml leaves the previous file whole and no temporary."""
    import lib.files
    path = tmp_path / "config.yaml"
    config.dump(PretrainConfig(), path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lib.files.os, "replace", crash)
    with pytest.raises(OSError):
        config.dump(dataclasses.replace(PretrainConfig(), out_dir="runs/other"), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
