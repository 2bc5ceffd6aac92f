"""runners.convert: HF <-> native round trips, and LoRA merging checked against peft."""
import pytest
import torch
from safetensors.torch import load_file

from models import hf, llama, lora, peft
from runners import convert
from tests.helpers_hf import hf_logits, random_hf_model, random_tokens

CONFIG = llama.PRESETS["tiny"]


def run(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        convert.cli.run(convert.main, [str(a) for a in argv])
    return exit_info.value.code


def test_hf_native_hf_round_trip_is_exact(tmp_path, capsys, monkeypatch):
    import transformers

    model = random_hf_model(CONFIG, seed=0)
    model.save_pretrained(tmp_path / "hf")  # written by transformers, not by models.hf
    assert run(["hf-to-native", "--input", tmp_path / "hf", "--output", tmp_path / "native"]) == 0
    # native-to-hf reads the checkpoint a group of tensors at a time, never the whole model.
    reads, real_read = [], convert.checkpoint.Reader.read
    monkeypatch.setattr(convert.checkpoints, "STREAM_GROUP_BYTES", 100_000)
    monkeypatch.setattr(convert.checkpoint.Reader, "read",
                        lambda self, target, prefix: reads.append(target) or real_read(self, target, prefix))
    assert run(["native-to-hf", "--input", tmp_path / "native", "--output", tmp_path / "back"]) == 0
    assert len(reads) > 3

    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = random_tokens(CONFIG, seq=16)
    original_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(original_model, tokens))

    # Refuses to overwrite, and names what is not a checkpoint.
    assert run(["hf-to-native", "--input", tmp_path / "hf", "--output", tmp_path / "native"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["native-to-hf", "--input", tmp_path / "hf", "--output", tmp_path / "x"]) == 2
    assert "not a native checkpoint, no <step>/state inside (it is an HF" in capsys.readouterr().err


def _adapter(tmp_path, name, lora_cfg, vocab, seed):
    """A PEFT adapter dir whose saved embeddings/lm_head have `vocab` rows (a grown tokenizer)."""
    adapters = lora.init_adapters(CONFIG, lora_cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in adapters["layers"]:
        for ab in layer.values():
            ab["b"] = 0.05 * torch.randn(ab["b"].shape, generator=g)
    modules = {"embed": 0.05 * torch.randn(vocab, CONFIG.dim, generator=g),
               "lm_head": 0.05 * torch.randn(CONFIG.dim, vocab, generator=g)}
    peft.save(tmp_path / name, lora_cfg, adapters, modules)
    return tmp_path / name


def test_merge_lora_chain_with_vocab_resize_matches_peft(tmp_path):
    import transformers
    from peft import PeftModel

    saved = ("embed", "lm_head")
    first = _adapter(tmp_path, "a", lora.LoraConfig(r=4, alpha=8.0, target_modules=("q", "k", "v", "o"),
                                                    modules_to_save=saved), vocab=520, seed=1)
    second = _adapter(tmp_path, "b", lora.LoraConfig(r=2, alpha=3.0, target_modules=("v", "gate", "up", "down"),
                                                     modules_to_save=saved), vocab=530, seed=2)
    (second / "tokenizer.json").write_text("{}")  # stands in for the adapter's tokenizer
    random_hf_model(CONFIG, seed=0).save_pretrained(tmp_path / "base")

    assert run(["merge-lora", "--base", tmp_path / "base", "--lora", first, "--lora", second,
                "--output", tmp_path / "merged"]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    # Reference: what Chinese-LLaMA-Alpaca's merge does with transformers + peft.
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    for adapter, vocab in ((first, 520), (second, 530)):
        ref.resize_token_embeddings(vocab)
        ref = PeftModel.from_pretrained(ref, str(adapter)).merge_and_unload()
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == 530
    tokens = torch.randint(0, 530, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hf_logits(merged, tokens), hf_logits(ref.eval(), tokens), rtol=1e-5, atol=1e-5)


def test_merge_rejects_an_adapter_for_another_shape(tmp_path, capsys):
    other = llama.Config(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    adapters = lora.init_adapters(other, lora.LoraConfig(r=2), seed=0)
    peft.save(tmp_path / "a", lora.LoraConfig(r=2), adapters)
    hf.save(tmp_path / "base", CONFIG, llama.init(CONFIG, seed=0))
    assert run(["merge-lora", "--base", tmp_path / "base", "--lora", tmp_path / "a",
                "--output", tmp_path / "out"]) == 2
    assert "q_proj.lora_A.weight: layer 0 wq adapter maps 32->32, the base weight is 64->64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_native_to_hf_of_a_lora_run_merges_its_adapters(tmp_path, capsys):
    """A LoRA run's checkpoint holds adapters only: native-to-hf merges them into the base that
    run recorded (before: a misleading "another model?" error)."""
    from lib import checkpoint, config as config_lib
    params = llama.init(CONFIG, seed=0)
    hf.save(tmp_path / "base", CONFIG, params)
    lcfg = lora.LoraConfig(r=2, alpha=4.0, dropout=0.1, target_modules=("q", "v"))
    adapters = lora.init_adapters(CONFIG, lcfg, seed=1)
    for layer in adapters["layers"]:
        for ab in layer.values():
            ab["b"] = ab["b"] + 0.05
    run_config = {"model": config_lib.to_dict(CONFIG), "lora": config_lib.to_dict(lcfg),
                  "checkpoint": {"load": str(tmp_path / "base")}}
    with checkpoint.Checkpointer(checkpoint.CheckpointConfig(dir=str(tmp_path / "sft"), async_save=False)) as ckpt:
        ckpt.save(6, {"params": {"adapters": adapters}}, {"config": run_config}, force=True)
    assert run(["native-to-hf", "--input", tmp_path / "sft", "--output", tmp_path / "merged"]) == 0
    assert "its LoRA adapters, r=2, merged into the base model" in capsys.readouterr().out
    _, merged = hf.load(tmp_path / "merged")
    torch.testing.assert_close(merged, lora.merge(params, adapters, lcfg), rtol=0, atol=0)
