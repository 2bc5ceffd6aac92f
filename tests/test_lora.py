"""LoRA as a pure transformation, checked against the `peft` library on transformers' LLaMA."""
import json

import pytest
import torch

from lib import prng
from lib.errors import UserError
from models import hf, llama, lora, peft
from tests.helpers_hf import hf_logits, random_hf_model, random_tokens

CONFIG = llama.PRESETS["tiny"]  # GQA, 2 layers, untied


def params_of(model) -> llama.Params:
    return hf.params_from_state_dict(CONFIG, model.state_dict(), "hf model")


def random_adapters(lora_cfg: lora.LoraConfig, seed: int = 1) -> lora.Adapters:
    """Adapters with a non-zero B, so the update shows in the logits."""
    adapters = lora.init_adapters(CONFIG, lora_cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for layer in adapters["layers"]:
        for ab in layer.values():
            ab["b"] = 0.05 * torch.randn(ab["b"].shape, generator=g)
    return adapters


def logits_of(params, adapters, lora_cfg, tokens, **kw):
    with torch.no_grad():
        return lora.lora_forward(params, adapters, tokens, CONFIG, lora_cfg, **kw)


ALL = lora.LoraConfig(r=4, alpha=8.0, dropout=0.0)
SOME = lora.LoraConfig(r=3, alpha=6.0, dropout=0.0, target_modules=("q", "v", "down"),
                       modules_to_save=("embed", "lm_head"))


def test_fresh_adapters_leave_the_model_unchanged():
    params = llama.init(CONFIG, seed=0)
    tokens = random_tokens(CONFIG, seq=16)
    adapters = lora.init_adapters(CONFIG, ALL, seed=3)
    assert all(ab["b"].abs().sum() == 0 and ab["a"].abs().sum() > 0
               for layer in adapters["layers"] for ab in layer.values())
    base = llama.forward(params, tokens, CONFIG)
    torch.testing.assert_close(logits_of(params, adapters, ALL, tokens), base, rtol=0, atol=1e-6)
    # Dropout acts on the low-rank path only, so with B = 0 it changes nothing either.
    dropped = logits_of(params, adapters, ALL, tokens, training=True, key=prng.fold_in(0, 0))
    torch.testing.assert_close(dropped, base, rtol=0, atol=1e-6)


def test_merged_params_give_the_adapter_logits():
    params = llama.init(CONFIG, seed=0)
    tokens = random_tokens(CONFIG, seq=16)
    adapters = random_adapters(ALL)
    adapted = logits_of(params, adapters, ALL, tokens)
    assert (adapted - llama.forward(params, tokens, CONFIG)).abs().max() > 1e-3
    merged = lora.merge(params, adapters, ALL)
    torch.testing.assert_close(llama.forward(merged, tokens, CONFIG), adapted, rtol=1e-5, atol=1e-5)


def test_dropout_is_a_function_of_its_key():
    params = llama.init(CONFIG, seed=0)
    tokens = random_tokens(CONFIG, seq=16)
    cfg = lora.LoraConfig(r=4, alpha=8.0, dropout=0.5)
    adapters = random_adapters(cfg)
    def run(seed):
        return logits_of(params, adapters, cfg, tokens, training=True, key=prng.fold_in(seed, 3))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    assert not torch.allclose(run(0), logits_of(params, adapters, cfg, tokens))
    with pytest.raises(ValueError, match="needs a random key"):
        logits_of(params, adapters, cfg, tokens, training=True)


def test_lora_weights_are_pytree_nodes_for_optree_and_torch():
    import torch.utils._pytree as torch_pytree

    from lib import pytree
    params = llama.init(CONFIG, seed=0)
    cfg = lora.LoraConfig(r=3, alpha=6.0, dropout=0.1, target_modules=("q", "v", "down"))
    adapted = lora.adapt(params, random_adapters(cfg), cfg, training=True, key=prng.fold_in(0, 1))
    n_params = len(pytree.leaves(params))
    n_adapted = 3 * CONFIG.n_layers  # wq, wv, w_down
    # Each LoraWeight contributes a, b and its dropout key beside the base weight it wraps.
    assert len(pytree.leaves(adapted)) == n_params + 3 * n_adapted
    assert len(torch_pytree.tree_leaves(adapted)) == n_params + 3 * n_adapted
    rebuilt = pytree.tree_map(lambda t: t, adapted)
    assert isinstance(rebuilt["layers"][1]["w_down"], lora.LoraWeight)
    assert rebuilt["layers"][1]["w_down"].scale == cfg.scale


def test_dropout_keeps_1_minus_p_and_scales_as_torch_does():
    """The counter-based mask against torch.nn.functional.dropout's definition: kept elements are
    x / (1 - p), about 1 - p of them, independent between keys and across the tensor."""
    x = torch.rand(64, 32, 48) + 0.5
    for p in (0.1, 0.5):
        out = prng.dropout(x, p, prng.fold_in(7, 1))
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / (1 - p))
        assert abs(kept.float().mean().item() - (1 - p)) < 0.01
        reference = torch.nn.functional.dropout(x, p) != 0  # torch's own draw, for the same rate
        assert abs(kept.float().mean().item() - reference.float().mean().item()) < 0.01
    a, b = (prng.dropout(x, 0.5, prng.fold_in(7, k)) != 0 for k in (1, 2))
    assert abs((a == b).float().mean().item() - 0.5) < 0.01  # masks of two keys agree by chance only


def test_gradients_reach_only_adapters_and_saved_modules_as_in_peft():
    from peft import LoraConfig, get_peft_model

    model = random_hf_model(CONFIG, seed=0)
    params = params_of(model)
    adapters = random_adapters(SOME)
    tokens = random_tokens(CONFIG, seq=16)
    labels = random_tokens(CONFIG, seq=16, seed=5)
    train, frozen = lora.trainable(params, adapters, SOME)
    assert set(train) == {"adapters", "modules"} and set(train["modules"]) == {"embed", "lm_head"}
    assert "embed" not in frozen and "lm_head" not in frozen and "layers" in frozen
    grads = torch.func.grad(lora.lora_loss_fn)(train, frozen, {"tokens": tokens, "labels": labels},
                                               CONFIG, SOME)

    # The reference: the same weights and adapters inside peft, loss.backward().
    ref = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj", "down_proj"],
                                           modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for i, layer in enumerate(adapters["layers"]):
            blocks = ref.base_model.model.model.layers[i]
            for name, module in (("wq", blocks.self_attn.q_proj), ("wv", blocks.self_attn.v_proj),
                                 ("w_down", blocks.mlp.down_proj)):
                module.lora_A["default"].weight.copy_(layer[name]["a"].T)
                module.lora_B["default"].weight.copy_(layer[name]["b"].T)
    logits = ref(input_ids=tokens).logits
    llama.cross_entropy(logits, labels).backward()
    trained = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    assert all(p.grad is None for n, p in ref.named_parameters() if n not in trained)

    named = dict(ref.named_parameters())
    prefix = "base_model.model.model."
    for i, layer in enumerate(grads["adapters"]["layers"]):
        for name, hf_name in (("wq", "self_attn.q_proj"), ("wv", "self_attn.v_proj"), ("w_down", "mlp.down_proj")):
            for ours, theirs in (("a", "lora_A"), ("b", "lora_B")):
                expected = named[f"{prefix}layers.{i}.{hf_name}.{theirs}.default.weight"].grad.T
                torch.testing.assert_close(layer[name][ours], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["modules"]["embed"],
                               named[f"{prefix}embed_tokens.modules_to_save.default.weight"].grad,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads["modules"]["lm_head"],
                               named["base_model.model.lm_head.modules_to_save.default.weight"].grad.T,
                               rtol=1e-4, atol=1e-7)


def test_peft_loads_our_adapters(tmp_path):
    from peft import PeftModel

    model = random_hf_model(CONFIG, seed=0)
    params = params_of(model)
    adapters = random_adapters(SOME)
    g = torch.Generator().manual_seed(9)
    modules = {"embed": params["embed"] + 0.05 * torch.randn(params["embed"].shape, generator=g),
               "lm_head": params["lm_head"] + 0.05 * torch.randn(params["lm_head"].shape, generator=g)}
    peft.save(tmp_path, SOME, adapters, modules, base_model_name_or_path="tiny")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj", "down_proj"] and written["r"] == 3

    tokens = random_tokens(CONFIG, seq=16)
    ours = logits_of({**params, **modules}, adapters, SOME, tokens)
    theirs = hf_logits(PeftModel.from_pretrained(model, str(tmp_path)).eval(), tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - hf_logits(random_hf_model(CONFIG, seed=0), tokens)).abs().max() > 1e-2


def test_we_load_adapters_saved_by_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = random_hf_model(CONFIG, seed=0)
    params = params_of(model)
    ref = get_peft_model(model, LoraConfig(r=2, lora_alpha=5, lora_dropout=0.1,
                                           target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                                           modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(str(tmp_path))
    tokens = random_tokens(CONFIG, seq=16)
    theirs = hf_logits(ref.eval(), tokens)

    lora_cfg, adapters, modules = peft.load(tmp_path)
    assert lora_cfg == lora.LoraConfig(r=2, alpha=5.0, dropout=0.1, target_modules=("k", "o", "gate", "up"),
                                       modules_to_save=("lm_head",))
    assert adapters["layers"][0]["wk"]["a"].shape == (CONFIG.dim, 2)
    ours = logits_of({**params, **modules}, adapters, lora_cfg, tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown target module 'qkv'"):
        lora.LoraConfig(target_modules=("qkv",))
    with pytest.raises(ValueError, match="unknown module to save 'norm'"):
        lora.LoraConfig(modules_to_save=("norm",))
    with pytest.raises(ValueError, match="r=0"):
        lora.LoraConfig(r=0)


def test_unsupported_peft_files_are_user_errors(tmp_path):
    peft.save(tmp_path, ALL, random_adapters(ALL))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        peft.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": ["qkv_proj"]}))
    with pytest.raises(UserError, match="target_modules"):
        peft.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        peft.load(tmp_path / "nowhere")
