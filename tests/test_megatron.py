"""Megatron-LM / ModelLink checkpoints: round trips against transformers' logits, the on-disk
layout against names taken from Megatron's own code, and bad input.

The golden key lists below were printed from megatron-core 0.16.1's GPTModel (local spec)
`state_dict()` and Megatron-LM core_v0.16.1's legacy GPTModel `state_dict_for_save_checkpoint()`
(bench/megatron_checkpoint_parity.py loads what is written here into both and compares logits);
the TransformerEngine names are megatron-core's `get_gpt_layer_with_transformer_engine_spec`.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import logging
import random
import shutil
import signal
import sys
import types

import numpy as np
import pytest
import torch

from lib.errors import UserError
from models import checkpoints, hf, llama, megatron
from runners import convert
from tests.helpers_hf import hf_logits, random_hf_model, random_tokens

pytest.importorskip("transformers")

GQA_UNTIED = llama.Config(vocab_size=500, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=176,
                          max_seq_len=256)
MHA_TIED = llama.Config(vocab_size=512, dim=64, n_layers=4, n_heads=4, ffn_dim=128, norm_eps=1e-6,
                        max_seq_len=256, tie_embeddings=True)
SPLITS = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]  # (tensor, pipeline, virtual stages)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (config, HF model, params read from the directory transformers wrote)."""
    out = {}
    for name, config in (("gqa-untied", GQA_UNTIED), ("mha-tied", MHA_TIED)):
        model = random_hf_model(config, seed=3)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (config, model, hf.load(path)[1], path)
    return out


def _read_file(file):
    with torch.serialization.safe_globals(megatron._SAFE_GLOBALS):
        return torch.load(file, weights_only=True)


def _rewrite_args(root, **changes) -> None:
    for file in root.rglob("model_optim_rng.pt"):
        state = _read_file(file)
        for key, value in changes.items():
            if value is None:
                delattr(state["args"], key)
            else:
                setattr(state["args"], key, value)
        torch.save(state, file)


@pytest.mark.parametrize("layout", sorted(megatron.LAYOUTS))
@pytest.mark.parametrize("name", ["gqa-untied", "mha-tied"])
def test_round_trips_are_exact_and_match_transformers(references, name, layout, tmp_path):
    config, model, params, _ = references[name]
    tokens = random_tokens(config, seq=24)
    expected = hf_logits(model, tokens)
    for tp, pp, vs in SPLITS:
        out = tmp_path / f"tp{tp}pp{pp}vs{vs}"
        megatron.save(out, config, params, tensor_parallel=tp, pipeline_parallel=pp, virtual_stages=vs,
                      layout=layout)
        loaded_config, loaded = megatron.load(out)
        assert loaded_config == config
        for a, b in zip(*(megatron.hf.state_dict_from_params(config, p).values() for p in (params, loaded))):
            assert torch.equal(a, b)
        with torch.no_grad():
            logits = llama.forward(loaded, tokens, loaded_config)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_convert_hf_to_megatron_tp2pp2_to_native_matches_transformers(references, tmp_path, capsys):
    config, model, _, hf_dir = references["gqa-untied"]
    mg, native = tmp_path / "mg", tmp_path / "native"
    assert _run(["hf-to-megatron", "--input", hf_dir, "--output", mg, "--target-tensor-parallel-size", 2,
                 "--target-pipeline-parallel-size", 2, "--layout", "legacy"]) == 0
    assert _run(["megatron-to-native", "--input", mg, "--output", native]) == 0
    assert "read legacy Megatron checkpoint" in capsys.readouterr().out
    for path in (native, mg):  # and checkpoint.load= a Megatron directory directly
        loaded_config, params, _ = checkpoints.load_pretrained(path)
        assert loaded_config == config
        tokens = random_tokens(config, seq=24)
        with torch.no_grad():
            torch.testing.assert_close(llama.forward(params, tokens, config), hf_logits(model, tokens),
                                       atol=1e-5, rtol=0)
    assert checkpoints.checkpoint_kind(mg) == "megatron"
    # A target the model does not divide into is refused before anything is written.
    assert _run(["native-to-megatron", "--input", native, "--output", tmp_path / "bad", "--layout", "mcore",
                 "--target-tensor-parallel-size", 4]) == 2
    assert "kv heads (query groups) (2) cannot be split over tensor_model_parallel_size=4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _run(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        convert.cli.run(convert.main, [str(a) for a in argv])
    return exit_info.value.code


# ---------------------------------------------------------------------------------------------
# The layout on disk, against Megatron's names


def _golden(layout: str, layers: int, first: bool, last: bool, tied: bool) -> set[str]:
    if layout == "legacy":
        keys = {f"language_model.encoder.layers.{i}.{s}" for i in range(layers) for s in (
            "input_layernorm.weight", "self_attention.query_key_value.weight", "self_attention.dense.weight",
            "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")}
        keys |= {"language_model.embedding.word_embeddings.weight"} if first else set()
        if last:
            keys |= {"language_model.encoder.final_layernorm.weight"}
            keys |= ({"word_embeddings_for_head.weight"} if not first else set()) if tied else \
                {"language_model.output_layer.weight"}
        return keys
    per_layer = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv._extra_state",
                 "self_attention.linear_proj.weight", "self_attention.linear_proj._extra_state",
                 "mlp.linear_fc1.weight", "mlp.linear_fc1._extra_state",
                 "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state")
    per_layer += (("input_layernorm.weight", "pre_mlp_layernorm.weight") if layout == "mcore-local" else
                  ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight",
                   "self_attention.core_attention._extra_state"))
    keys = {f"decoder.layers.{i}.{s}" for i in range(layers) for s in per_layer}
    keys |= {"embedding.word_embeddings.weight"} if first else set()
    if last:
        keys |= {"decoder.final_layernorm.weight", "output_layer._extra_state"}
        keys |= {"output_layer.weight"} if not (tied and first) else set()
    return keys


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("layout", sorted(megatron.LAYOUTS))
def test_files_hold_megatrons_keys_layers_numbered_per_stage(references, layout, tmp_path):
    for name in ("gqa-untied", "mha-tied"):
        config, _, params, _ = references[name]
        for tp, pp in ((1, 1), (2, 2)):
            out = tmp_path / f"{name}-{tp}{pp}"
            megatron.save(out, config, params, tensor_parallel=tp, pipeline_parallel=pp, layout=layout)
            assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
            dirs = sorted(p.name for p in (out / "iter_0000001").iterdir())
            assert dirs == (["mp_rank_00"] if (tp, pp) == (1, 1) else
                            ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"])
            for d in dirs:
                state = _read_file(out / "iter_0000001" / d / "model_optim_rng.pt")
                assert state["checkpoint_version"] == 3.0 and state["iteration"] == 1
                assert state["args"].tensor_model_parallel_size == tp
                stage = int(d.split("_")[-1]) if pp > 1 else 0
                keys = set(_flat(state["model"]))
                assert keys == _golden(layout, config.n_layers // pp, stage == 0, stage == pp - 1,
                                       config.tie_embeddings)
                if layout == "legacy":  # nested one dict per module, as legacy Megatron saves
                    assert "layers.0.input_layernorm.weight" in state["model"]["language_model"]["encoder"]


def test_fused_qkv_is_grouped_by_kv_head_and_fc1_is_gate_up_per_shard(tmp_path):
    config = GQA_UNTIED  # 4 query heads in 2 groups, head_dim 16
    hd, d = config.head_dim, config.dim
    params = llama.init(config)
    for layer in params["layers"]:  # ([in, out] here): every head's output columns hold its tag
        layer["wq"] = torch.arange(4.0).repeat_interleave(hd).expand(d, -1).clone()       # q heads 0..3
        layer["wk"] = (10 + torch.arange(2.0)).repeat_interleave(hd).expand(d, -1).clone()  # k groups 10, 11
        layer["wv"] = (20 + torch.arange(2.0)).repeat_interleave(hd).expand(d, -1).clone()  # v groups 20, 21
        layer["w_gate"] = torch.arange(config.ffn_dim, dtype=torch.float32).expand(d, -1).clone()
        layer["w_up"] = -layer["w_gate"]
    megatron.save(tmp_path / "mg", config, params, tensor_parallel=2, layout="mcore-local")
    rank_dir = tmp_path / "mg" / "iter_0000001"
    shards = [_read_file(rank_dir / f"mp_rank_0{r}" / "model_optim_rng.pt")["model"] for r in range(2)]
    heads = [s["decoder.layers.0.self_attention.linear_qkv.weight"][::hd, 0].tolist() for s in shards]
    # Megatron's [groups, heads per group + 2, head_dim, hidden]: rank r holds group r.
    assert heads == [[0, 1, 10, 20], [2, 3, 11, 21]]
    half = config.ffn_dim // 2
    for r, s in enumerate(shards):
        fc1 = s["decoder.layers.0.mlp.linear_fc1.weight"][:, 0]
        expected_gate = torch.arange(r * half, (r + 1) * half, dtype=torch.float32)
        assert torch.equal(fc1, torch.cat([expected_gate, -expected_gate]))


def test_vocabulary_padding_both_ways(references, tmp_path, caplog):
    config, _, params, _ = references["gqa-untied"]  # 500 tokens
    megatron.save(tmp_path / "mg", config, params, tensor_parallel=2, layout="mcore")
    first = _read_file(tmp_path / "mg" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")
    assert first["args"].padded_vocab_size == 512 and first["args"].vocab_size == 500  # 128 x TP 2
    embed = first["model"]["embedding.word_embeddings.weight"]  # rows 256..511
    assert embed.shape[0] == 256 and torch.equal(embed[500 - 256:], params["embed"][-1].expand(12, -1))
    assert megatron.load(tmp_path / "mg")[0].vocab_size == 500

    _rewrite_args(tmp_path / "mg", vocab_size=None)  # as training runs with a tokenizer save them
    with caplog.at_level(logging.WARNING, logger="models.megatron"):
        padded_config, padded = megatron.load(tmp_path / "mg")
    assert padded_config.vocab_size == 512 and "keeping the padded vocabulary of 512 rows" in caplog.text
    assert torch.equal(padded["embed"][:500], params["embed"])
    trimmed_config, _ = megatron.load(tmp_path / "mg", overrides={"vocab_size": 500})
    assert trimmed_config == config


# ---------------------------------------------------------------------------------------------
# What Megatron's training saves, and what must be refused


def _fake_megatron_enums(monkeypatch):
    """Enums importable under Megatron's names, so torch.save pickles them as Megatron does."""
    classes = {}
    for module, name, members in (("megatron.core.enums", "ModelType", {"encoder_or_decoder": 1}),
                                  ("megatron.core.transformer.enums", "AttnBackend", {"auto": 5})):
        cls = enum.Enum(name, members)
        cls.__module__ = module
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), sys.modules.get(".".join(parts[:i]))
                                or types.ModuleType(".".join(parts[:i])))
        setattr(sys.modules[module], name, cls)
        classes[name] = cls
    return classes


def test_reads_a_training_checkpoint_with_optimizer_rng_and_enums(references, tmp_path, monkeypatch):
    config, _, params, _ = references["mha-tied"]
    megatron.save(tmp_path / "mg", config, params, layout="mcore")
    file = tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = _read_file(file)
    enums = _fake_megatron_enums(monkeypatch)
    state["args"].model_type = enums["ModelType"].encoder_or_decoder
    state["args"].attention_backend = enums["AttnBackend"].auto
    state["args"].exit_signal = signal.SIGTERM
    state["args"].llama = types.SimpleNamespace(hidden_size=64)  # ModelLink's conversions add this
    state["model"] = {k: (io.BytesIO(b"te") if k.endswith("_extra_state") else v) for k, v in state["model"].items()}
    state["optimizer"] = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
                          "grad_scaler": {"scale": torch.tensor(1.0), "growth_tracker": 0}}
    state["opt_param_scheduler"] = {"max_lr": 1e-4, "num_steps": 128}
    state["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "rng_tracker_states": {"model-parallel-rng": torch.zeros(8, dtype=torch.uint8)}}]
    torch.save(state, file)
    args = megatron.read_rank_file(file)["args"]
    assert args.model_type == megatron.EnumValue("megatron.core.enums.ModelType", 1)
    loaded_config, loaded = megatron.load(tmp_path / "mg")
    assert loaded_config == config and torch.equal(loaded["embed"], params["embed"])


class _Evil:
    def __reduce__(self):
        import os
        return os.system, ("touch pwned",)


def test_refuses_a_pickle_that_needs_another_type(references, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _, params, _ = references["mha-tied"]
    megatron.save(tmp_path / "mg", config, params, layout="legacy")
    file = tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = _read_file(file)
    state["args"].hook = _Evil()
    torch.save(state, file)
    with pytest.raises(UserError, match=r"model_optim_rng.pt: refusing to unpickle posix.system"):
        megatron.load(tmp_path / "mg")
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def tp2pp2(references, tmp_path_factory):
    config, _, params, _ = references["gqa-untied"]
    root = tmp_path_factory.mktemp("tp2pp2") / "mg"
    megatron.save(root, config, params, tensor_parallel=2, pipeline_parallel=2, layout="legacy")
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_name_the_value_or_path(tp2pp2, tmp_path):
    iter_dir = "iter_0000001"
    broken = _copy(tp2pp2, tmp_path / "missing-rank")
    shutil.rmtree(broken / iter_dir / "mp_rank_01_001")
    with pytest.raises(UserError, match=r"missing .*mp_rank_01_001/model_optim_rng.pt \(args say "
                                        r"tensor_model_parallel_size=2, pipeline_model_parallel_size=2\)"):
        megatron.load(broken)

    broken = _copy(tp2pp2, tmp_path / "args-tp")
    _rewrite_args(broken, tensor_model_parallel_size=1)
    with pytest.raises(UserError, match=r"mp_rank_01_000 does not fit the checkpoint's parallel layout "
                                        r"\(args say tensor_model_parallel_size=1"):
        megatron.load(broken)

    broken = _copy(tp2pp2, tmp_path / "args-layout")
    _rewrite_args(broken, use_legacy_models=False, use_mcore_models=None)
    with pytest.raises(UserError, match=r"its keys are in the legacy layout, but its args say "
                                        r"use_legacy_models=False \(mcore models\)"):
        megatron.load(broken)

    broken = _copy(tp2pp2, tmp_path / "args-shape")
    _rewrite_args(broken, num_query_groups=4)
    with pytest.raises(UserError, match=r"mp_rank_00_000/model_optim_rng.pt: language_model.encoder.layers.0."
                                        r"self_attention.query_key_value.weight has shape \[64, 64\], expected "
                                        r"\[96, 64\] from its args \(tensor_model_parallel_size=2.*num_query_groups=4"):
        megatron.load(broken)
    _rewrite_args(broken, num_query_groups=1)
    with pytest.raises(UserError, match=r"kv heads \(query groups\) \(1\) cannot be split over "
                                        r"tensor_model_parallel_size=2"):
        megatron.load(broken)

    broken = _copy(tp2pp2, tmp_path / "args-tied")
    _rewrite_args(broken, untie_embeddings_and_output_weights=False)
    with pytest.raises(UserError, match=r"mp_rank_00_001/model_optim_rng.pt: holds an output layer "
                                        r"\(language_model.output_layer.weight\) of its own, but its args say it "
                                        r"is tied"):
        megatron.load(broken)

    several = _copy(tp2pp2, tmp_path / "several")
    shutil.copytree(several / iter_dir, several / "iter_0000002")
    (several / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(UserError, match=r"holds several iterations \(iter_0000001, iter_0000002\) and no "
                                        r"latest_checkpointed_iteration.txt"):
        megatron.load(several)
    assert megatron.load(several / "iter_0000002")[0] == GQA_UNTIED  # one iteration, named

    (several / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(UserError, match=r"names iteration 5, but .*iter_0000005 does not exist"):
        megatron.load(several)
    (several / "latest_checkpointed_iteration.txt").write_text("latest\n")
    with pytest.raises(UserError, match=r"latest_checkpointed_iteration.txt: expected an iteration number or "
                                        r"'release', found 'latest'"):
        megatron.load(several)

    dist = tmp_path / "dist" / "iter_0000010"
    dist.mkdir(parents=True)
    (dist / "metadata.json").write_text("{}")
    (dist.parent / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(UserError, match=r"iter_0000010 is a torch_dist \(distributed\) checkpoint"):
        megatron.load(dist.parent)
    with pytest.raises(UserError, match=r"not a Megatron checkpoint"):
        megatron.load(tmp_path / "several" / iter_dir / "mp_rank_00_000")


def test_target_sizes_are_checked(references, tmp_path):
    config, _, params, _ = references["gqa-untied"]
    with pytest.raises(UserError, match="4 layers cannot be split evenly over 3 pipeline stage"):
        megatron.save(tmp_path / "a", config, params, pipeline_parallel=3)
    with pytest.raises(UserError, match="layout 'core': expected one of"):
        megatron.save(tmp_path / "a", config, params, layout="core")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="already exists and is not empty"):
        megatron.save(tmp_path / "full", config, params)
    bigger = dataclasses.replace(config, n_layers=2)
    with pytest.raises(UserError, match="cannot be split evenly over 2 pipeline stage"):
        megatron.save(tmp_path / "b", bigger, llama.init(bigger), pipeline_parallel=2, virtual_stages=2)
