"""HF checkpoint interop, checked against transformers' LlamaForCausalLM on random weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib import config as config_lib
from lib.errors import UserError
from models import attention, hf, llama
from tests.helpers_hf import hf_logits, random_hf_model, random_tokens

transformers = pytest.importorskip("transformers")

TINY = llama.PRESETS["tiny"]
VARIANTS = {
    "llama1-mha": llama.PRESETS["tiny-mha"],
    "llama2-gqa": TINY,
    "llama3": dataclasses.replace(llama.PRESETS["tiny-llama3"], rope_scaling=None),
    "llama3.1-rope-scaling": llama.PRESETS["tiny-llama3"],
    "tied-embeddings": dataclasses.replace(TINY, tie_embeddings=True),
}
# Measured maximum |ours - HF| over these variants (fp32, 2x48 tokens, 2026-11-22): 0.0 with the
# reference kernel (bit-identical), 8.9e-7 with sdpa.
ATOL = 1e-4


def _forward(params, tokens, config, kernel=attention.sdpa):
    with torch.no_grad():
        return llama.forward(params, tokens, config, kernels=llama.Kernels(attention=kernel))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_matches_transformers(name, tmp_path):
    config = VARIANTS[name]
    model = random_hf_model(config)
    tokens = random_tokens(config)
    expected = hf_logits(model, tokens)

    # A directory written by transformers itself -> our loader.
    model.save_pretrained(tmp_path / "theirs")
    loaded_config, params = hf.load(tmp_path / "theirs")
    assert loaded_config == config
    for kernel in (attention.reference, attention.sdpa):
        torch.testing.assert_close(_forward(params, tokens, config, kernel), expected, atol=ATOL, rtol=0)

    # Our writer -> transformers' from_pretrained; small shards force an index.
    hf.save(tmp_path / "ours", config, params, max_shard_bytes=200_000)
    assert (tmp_path / "ours" / hf.SAFETENSORS_INDEX).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(reloaded, tokens), expected, atol=ATOL, rtol=0)


def test_config_round_trip_for_every_preset():
    for name, config in llama.PRESETS.items():
        assert hf.config_from_hf(hf.config_to_hf(config), name) == config, name


def test_bf16_checkpoint_keeps_its_dtype_unless_asked(tmp_path):
    model = random_hf_model(TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, params = hf.load(tmp_path)
    assert params["layers"][0]["wq"].dtype == torch.bfloat16
    assert params["embed"].dtype == torch.bfloat16
    _, params32 = hf.load(tmp_path, dtype=torch.float32)
    assert params32["lm_head"].dtype == torch.float32
    torch.testing.assert_close(params32["lm_head"], model.lm_head.weight.detach().float().T)


def test_save_as_bf16_is_read_as_bf16_by_transformers_and_by_us(tmp_path):
    params = llama.init(TINY, seed=0)
    hf.save(tmp_path, TINY, params, dtype=torch.bfloat16, bos_token_id=1, eos_token_id=[2, 3])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == [2, 3]
    _, loaded = hf.load(tmp_path)
    assert loaded["layers"][1]["w_down"].dtype == torch.bfloat16
    torch.testing.assert_close(loaded["layers"][1]["w_down"], params["layers"][1]["w_down"].bfloat16(),
                               atol=0, rtol=0)


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"hidden_size": None}, "no 'hidden_size'"),
    ({"num_attention_heads": 5, "head_dim": None}, "not divisible by n_heads=5"),
    ({"num_attention_heads": 8}, "head_dim=16 with 8 heads does not match hidden_size=64"),
])
def test_unsupported_config_json(edit, message):
    raw = {k: v for k, v in {**hf.config_to_hf(TINY), **edit}.items() if v is not None}
    with pytest.raises(UserError, match=f"^my/config.json: .*{message}"):
        hf.config_from_hf(raw, "my/config.json")


def test_sharded_safetensors_written_by_transformers(tmp_path):
    model = random_hf_model(TINY)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / hf.SAFETENSORS_INDEX).is_file()
    _, params = hf.load(tmp_path)
    tokens = random_tokens(TINY, seq=16)
    torch.testing.assert_close(_forward(params, tokens, TINY), hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_pytorch_model_bin_single_and_sharded(tmp_path):
    model = random_hf_model(TINY)
    tokens = random_tokens(TINY, seq=16)
    expected = hf_logits(model, tokens)
    state = model.state_dict()

    single = tmp_path / "single"
    single.mkdir()
    model.config.to_json_file(single / "config.json")
    torch.save(state, single / "pytorch_model.bin")
    _, params = hf.load(single)
    torch.testing.assert_close(_forward(params, tokens, TINY), expected, atol=ATOL, rtol=0)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    model.config.to_json_file(sharded / "config.json")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / hf.PYTORCH_BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    _, params = hf.load(sharded)
    torch.testing.assert_close(_forward(params, tokens, TINY), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: every case is a UserError naming what is at fault.


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    hf.save(path / "model", TINY, llama.init(TINY, seed=0))
    return path / "model"


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    file = path / hf.SAFETENSORS
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_config_json(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}.*config.json"):
        hf.load(tmp_path)


def test_not_a_llama_architecture(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="MistralForCausalLM.*expected LlamaForCausalLM"):
        hf.load(path)


def test_shape_disagrees_with_config(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    raw["intermediate_size"] = 160
    (path / "config.json").write_text(json.dumps(raw))
    # Whichever MLP weight is read first is reported, with both shapes.
    with pytest.raises(UserError, match=r"tensor 'model\.layers\.0\.mlp\.(gate_proj\.weight' has shape \[176, 64\], "
                                        r"expected \[160, 64\]|down_proj\.weight' has shape \[64, 176\], "
                                        r"expected \[64, 160\])"):
        hf.load(path)


def test_missing_tensor(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(UserError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        hf.load(path)


def test_unexpected_tensor(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        hf.load(path)


def test_missing_and_truncated_shards(tmp_path):
    hf.save(tmp_path / "m", TINY, llama.init(TINY, seed=0), max_shard_bytes=200_000)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=shards[1].name + ".*cannot read"):
        hf.load(tmp_path / "m")
    shards[0].unlink()
    with pytest.raises(UserError, match=f"names shard '{shards[0].name}', which does not exist"):
        hf.load(tmp_path / "m")


def test_no_weight_files(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path / "m")
    (path / hf.SAFETENSORS).unlink()
    with pytest.raises(UserError, match="no weights found"):
        hf.load(path)


def test_save_replaces_atomically_and_leaves_no_partial_dir(tmp_path, monkeypatch):
    old, new = llama.init(TINY, seed=0), llama.init(TINY, seed=1)
    hf.save(tmp_path / "m", TINY, old)
    hf.save(tmp_path / "m", TINY, new)
    _, reloaded = hf.load(tmp_path / "m")
    torch.testing.assert_close(reloaded["embed"], new["embed"], atol=0, rtol=0)

    real_write, calls = hf.safetensors_io.write, []

    def disk_full_on_second_shard(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_write(*args, **kwargs)

    monkeypatch.setattr(hf.safetensors_io, "write", disk_full_on_second_shard)
    with pytest.raises(OSError):
        hf.save(tmp_path / "m", TINY, old, max_shard_bytes=200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    _, still = hf.load(tmp_path / "m")
    torch.testing.assert_close(still["embed"], new["embed"], atol=0, rtol=0)


def test_preset_typo_suggests_the_right_name():
    @dataclasses.dataclass(frozen=True)
    class Run:
        model: llama.Config = TINY

    with pytest.raises(config_lib.ConfigError, match="did you mean 'llama2-7b'"):
        config_lib.load(Run, overrides=["model=llama2-7bb"])
