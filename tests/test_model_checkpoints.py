"""models.checkpoints: one loader for HF directories, native checkpoints and LoRA adapters."""
import shutil

import pytest
import torch

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib import pytree
from lib.errors import UserError
from models import hf, llama, lora, peft
from models.checkpoints import find_tokenizer, load_pretrained
from parallel.train_step import TrainStepConfig, init_state

CONFIG = llama.PRESETS["tiny"]
LORA = lora.LoraConfig(r=2, alpha=4.0, dropout=0.0, target_modules=("q", "down"))


def save_native(root, state, extra, step=3):
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(dir=str(root), async_save=False))
    ckpt.save(step, state, extra, force=True)
    ckpt.close()
    return root


def random_adapters(cfg, seed=1):
    adapters = lora.init_adapters(CONFIG, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g), adapters)


def tokens():
    return torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF base (with a tokenizer file) and a bf16 training run's native checkpoint of it."""
    root = tmp_path_factory.mktemp("ckpts")
    params = llama.init(CONFIG, seed=3)
    hf.save(root / "hf", CONFIG, params)
    (root / "hf" / "tokenizer.json").write_text("{}")
    state = init_state(params, TrainStepConfig(dtype="bf16"))
    run_config = {"model": config_lib.to_dict(CONFIG), "data": {"tokenizer": str(root / "tok.model")},
                  "lora": None}
    (root / "tok.model").write_text("stands in for a tokenizer")
    save_native(root / "run", state, {"config": run_config, "consumed_samples": 12})
    return root, params


def test_hf_directory_in_a_dtype(base):
    root, params = base
    config, got, lora_cfg = load_pretrained(root / "hf", dtype=torch.bfloat16, device="cpu")
    assert config == CONFIG and lora_cfg is None
    assert got["layers"][1]["wq"].dtype == torch.bfloat16
    assert torch.equal(got["layers"][1]["wq"], params["layers"][1]["wq"].bfloat16())
    assert find_tokenizer(root / "hf") == str(root / "hf" / "tokenizer.json")


def test_native_run_gives_its_recorded_model_and_fp32_master_weights(base):
    root, params = base
    for path in (root / "run", root / "run" / "3"):  # the root (latest step) or one step dir
        config, got, lora_cfg = load_pretrained(path, dtype=torch.float32)
        assert config == CONFIG and lora_cfg is None
        # The bf16 run's params are rounded; its fp32 master weights are the exact ones.
        assert pytree.max_abs_diff(got, params)[0] == 0
    assert find_tokenizer(root / "run") == str(root / "tok.model")
    with pytest.raises(UserError, match=r"holds another model .*n_layers: 2 vs 3"):
        load_pretrained(root / "run", config=llama.Config(**{**config_lib.to_dict(CONFIG), "n_layers": 3}))


def test_converted_checkpoint_and_one_without_a_recorded_model(base, tmp_path):
    root, params = base
    save_native(tmp_path / "conv", {"params": params},
                {"model": config_lib.to_dict(CONFIG), "converted_from": str(root / "hf")}, step=0)
    config, got, _ = load_pretrained(tmp_path / "conv")
    assert config == CONFIG and pytree.max_abs_diff(got, params)[0] == 0
    assert find_tokenizer(tmp_path / "conv") == str(root / "hf" / "tokenizer.json")  # via converted_from

    save_native(tmp_path / "bare", {"params": params}, {}, step=0)
    with pytest.raises(UserError, match="records no model config"):
        load_pretrained(tmp_path / "bare")
    assert load_pretrained(tmp_path / "bare", config=CONFIG)[0] == CONFIG


def test_peft_adapter_unmerged_and_merged(base, tmp_path):
    root, params = base
    adapters = random_adapters(LORA)
    peft.save(tmp_path / "adapter", LORA, adapters)
    expected = lora.lora_forward(params, adapters, tokens(), CONFIG, LORA)

    config, adapted, lora_cfg = load_pretrained(root / "hf", adapter=tmp_path / "adapter")
    assert lora_cfg == LORA and isinstance(adapted["layers"][0]["wq"], lora.LoraWeight)
    # (rounding only: PEFT files hold A and B transposed)
    torch.testing.assert_close(llama.forward(adapted, tokens(), config), expected, rtol=0, atol=1e-6)
    _, merged, _ = load_pretrained(root / "hf", adapter=tmp_path / "adapter", merge_adapter=True)
    assert isinstance(merged["layers"][0]["wq"], torch.Tensor)
    torch.testing.assert_close(llama.forward(merged, tokens(), config), expected, rtol=1e-5, atol=1e-5)


def test_adapter_of_another_model_names_the_tensor(base, tmp_path):
    root, _ = base
    other = llama.Config(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    peft.save(tmp_path / "other", LORA, lora.init_adapters(other, LORA))
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: .* another model"):
        load_pretrained(root / "hf", adapter=tmp_path / "other")
    with pytest.raises(UserError, match="is a PEFT adapter, not a model"):
        load_pretrained(tmp_path / "other")


def test_native_lora_run_is_its_base_plus_its_adapters(base, tmp_path):
    root, params = base
    adapters = random_adapters(LORA, seed=5)
    run_config = {"model": config_lib.to_dict(CONFIG), "lora": config_lib.to_dict(LORA),
                  "checkpoint": {"load": str(root / "hf")}, "data": {"tokenizer": None}}
    save_native(tmp_path / "sft", {"params": {"adapters": adapters}}, {"config": run_config})
    config, adapted, lora_cfg = load_pretrained(tmp_path / "sft")
    assert lora_cfg == LORA
    torch.testing.assert_close(llama.forward(adapted, tokens(), config),
                               lora.lora_forward(params, adapters, tokens(), CONFIG, LORA), rtol=0, atol=0)
    _, merged, _ = load_pretrained(tmp_path / "sft", merge_adapter=True)
    assert pytree.max_abs_diff(merged, lora.merge(params, adapters, LORA))[0] == 0
    assert find_tokenizer(tmp_path / "sft") == str(root / "hf" / "tokenizer.json")  # its base's


def test_what_is_not_a_model_is_named(base, tmp_path):
    root, _ = base
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        load_pretrained(tmp_path / "empty")
    shutil.copytree(root / "run", tmp_path / "damaged")
    (tmp_path / "damaged" / "3" / "state" / "_METADATA").unlink()
    with pytest.raises(UserError, match=r"step dir .*damaged/3 is missing its metadata \(state/_METADATA\)"):
        load_pretrained(tmp_path / "damaged" / "3")
