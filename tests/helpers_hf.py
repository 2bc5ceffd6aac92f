"""Reference models from HF transformers, built independently of `models.hf` (no shared code)."""
from __future__ import annotations

import torch

from models import llama


def hf_llama_config(config: llama.Config):
    """A transformers LlamaConfig written by hand from our Config (not via models.hf)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings, attn_implementation="eager")


def random_hf_model(config: llama.Config, seed: int = 0):
    """LlamaForCausalLM in fp32 eval mode with random weights, norms included (so swaps show)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_llama_config(config)).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def random_tokens(config: llama.Config, batch: int = 2, seq: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
