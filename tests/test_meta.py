"""Meta's original checkpoint layout, checked against transformers on the same random weights.

The fake Meta checkpoint is built from an HF model's state dict by the documented relation
(Meta row 2i of a head = HF row i, Meta row 2i+1 = HF row i + head_dim/2), written independently
of `models.meta`'s own permutation, and split over two model-parallel shards as fairscale does.
"""
from __future__ import annotations

import json

import pytest
import torch

from lib.errors import UserError
from models import llama, meta
from tests.helpers_hf import hf_logits, random_hf_model, random_tokens

pytest.importorskip("transformers")

SHARDS = 2


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def write_meta_checkpoint(path, model, params_json: dict, embed_split_dim: int,
                          extra: dict | None = None) -> None:
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_split_dim),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(cfg.num_hidden_layers):
        hf_layer = f"model.layers.{i}."
        q = _to_interleaved(sd[hf_layer + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _to_interleaved(sd[hf_layer + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for name, (tensor, split) in {
            "attention.wq.weight": (q, 0), "attention.wk.weight": (k, 0),
            "attention.wv.weight": (sd[hf_layer + "self_attn.v_proj.weight"], 0),
            "attention.wo.weight": (sd[hf_layer + "self_attn.o_proj.weight"], 1),
            "feed_forward.w1.weight": (sd[hf_layer + "mlp.gate_proj.weight"], 0),
            "feed_forward.w3.weight": (sd[hf_layer + "mlp.up_proj.weight"], 0),
            "feed_forward.w2.weight": (sd[hf_layer + "mlp.down_proj.weight"], 1),
            "attention_norm.weight": (sd[hf_layer + "input_layernorm.weight"], None),
            "ffn_norm.weight": (sd[hf_layer + "post_attention_layernorm.weight"], None),
        }.items():
            full[f"layers.{i}.{name}"] = (tensor, split)
    path.mkdir()
    (path / "params.json").write_text(json.dumps(params_json))
    for rank in range(SHARDS):
        shard = {name: (t if split is None else t.chunk(SHARDS, dim=split)[rank]).clone()
                 for name, (t, split) in full.items()}
        shard.update(extra or {})
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")


CASES = {
    # LLaMA-1: multi-head, eps 1e-6, vocab_size -1, embeddings split by dim, rope.freqs buffer.
    "llama1": (
        {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-6, "vocab_size": -1},
        llama.Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=176, norm_eps=1e-6,
                     max_seq_len=2048),
        1, {"rope.freqs": torch.zeros(8)}),
    "llama2-gqa": (
        {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5,
         "vocab_size": 512},
        llama.Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                     norm_eps=1e-5, max_seq_len=4096),
        1, None),
    # LLaMA-3.1: vocab-parallel embeddings, ffn multiplier, scaled rope.
    "llama3.1": (
        {"dim": 64, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2,
         "n_layers": 2, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
         "vocab_size": 512},
        llama.Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=224,
                     norm_eps=1e-5, rope_theta=500000.0, rope_scaling=llama.RopeScaling(),
                     max_seq_len=131072),
        0, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_meta_checkpoint_matches_transformers(name, tmp_path):
    params_json, expected_config, embed_split, extra = CASES[name]
    model = random_hf_model(expected_config)
    write_meta_checkpoint(tmp_path / "ckpt", model, params_json, embed_split, extra)
    config, params = meta.load(tmp_path / "ckpt")
    assert config == expected_config
    tokens = random_tokens(config, seq=32)
    with torch.no_grad():
        ours = llama.forward(params, tokens, config)
    torch.testing.assert_close(ours, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_ffn_dim_reproduces_published_widths():
    assert meta.ffn_dim(4096, 256, None) == 11008      # LLaMA-1/2 7B
    assert meta.ffn_dim(5120, 256, None) == 13824      # 13B
    assert meta.ffn_dim(6656, 256, None) == 17920      # LLaMA-1 33B
    assert meta.ffn_dim(8192, 256, None) == 22016      # LLaMA-1 65B
    assert meta.ffn_dim(8192, 4096, 1.3) == 28672      # LLaMA-2 70B, LLaMA-3 70B
    assert meta.ffn_dim(4096, 1024, 1.3) == 14336      # LLaMA-3 8B


def test_bad_meta_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no params.json"):
        meta.load(tmp_path)
    params_json, config, split, _ = CASES["llama2-gqa"]
    write_meta_checkpoint(tmp_path / "ckpt", random_hf_model(config), params_json, split)
    shard = tmp_path / "ckpt" / "consolidated.01.pth"
    state = torch.load(shard, weights_only=True)
    del state["layers.1.feed_forward.w2.weight"]
    torch.save(state, shard)
    with pytest.raises(UserError, match="'layers.1.feed_forward.w2.weight' is in some shards but not"):
        meta.load(tmp_path / "ckpt")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="consolidated.01.pth: cannot read"):
        meta.load(tmp_path / "ckpt")
