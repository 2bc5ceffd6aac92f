"""lib/optim.py against torch.optim.AdamW, torch's clip_grad_norm_ and hand-computed schedules."""
import math

import pytest
import torch

from lib import optim, pytree


def _tree(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return {"embed": r(7, 5), "layers": [{"w": r(5, 3), "norm": r(5)}, {"w": r(5, 3), "norm": r(5)}]}


def _torch_adamw(params, cfg):
    """torch.optim.AdamW over copies of `params`, norms (1-dim) without weight decay."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in pytree.flatten_by_path(params).items()}
    groups = [{"params": [p for p in leaves.values() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in leaves.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return leaves, opt


def test_adamw_matches_torch_adamw_over_several_steps():
    cfg = optim.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=6, weight_decay=0.1)
    params = _tree()
    leaves, ref = _torch_adamw(params, cfg)
    state = optim.adamw_init(params)
    assert "master" not in state  # fp32 params are their own master weights
    worst = 0.0
    for step in range(6):
        grads = _tree(seed=100 + step)
        lr = optim.learning_rate(cfg, step)
        params, state = optim.adamw_update(grads, state, params, lr, cfg)
        for group in ref.param_groups:
            group["lr"] = float(lr)
        for path, g in pytree.flatten_by_path(grads).items():
            leaves[path].grad = g.clone()
        ref.step()
        worst = max(worst, pytree.max_abs_diff(params, _unflat(params, leaves))[0])
    assert int(state["count"]) == 6
    assert worst < 1e-6, worst


def _unflat(like, leaves):
    return pytree.map_with_path(lambda path, _: leaves[path].detach(), like)


def test_norm_weights_are_not_decayed():
    cfg = optim.OptimizerConfig(lr=0.1, weight_decay=0.5, schedule="constant")
    params = _tree()
    zeros = pytree.tree_map(torch.zeros_like, params)
    new, _ = optim.adamw_update(zeros, optim.adamw_init(params), params, torch.tensor(0.1), cfg)
    assert torch.equal(new["layers"][0]["norm"], params["layers"][0]["norm"])
    torch.testing.assert_close(new["layers"][0]["w"], params["layers"][0]["w"] * (1 - 0.1 * 0.5))


def test_bf16_params_keep_fp32_master_weights():
    cfg = optim.OptimizerConfig(lr=1e-3, schedule="constant")
    fp32 = _tree()
    bf16 = pytree.tree_map(lambda p: p.to(torch.bfloat16), fp32)
    state = optim.adamw_init(bf16)
    assert state["master"]["embed"].dtype == torch.float32
    assert state["mu"]["embed"].dtype == torch.float32
    ref_params, ref_state = fp32, optim.adamw_init(fp32)
    state["master"] = fp32  # same starting point as the fp32 run
    for step in range(3):
        grads = _tree(seed=50 + step)
        bf16, state = optim.adamw_update(pytree.tree_map(lambda g: g.to(torch.bfloat16), grads),
                                         state, bf16, cfg.lr, cfg)
        ref_params, ref_state = optim.adamw_update(
            pytree.tree_map(lambda g: g.to(torch.bfloat16).float(), grads), ref_state, ref_params, cfg.lr, cfg)
    assert bf16["embed"].dtype == torch.bfloat16
    # Updates of size ~1e-3 vanish in bf16 weights; the fp32 master keeps them exactly.
    assert pytree.max_abs_diff(state["master"], ref_params)[0] < 1e-6
    assert pytree.max_abs_diff(bf16, pytree.tree_map(lambda p: p.to(torch.bfloat16), ref_params))[0] == 0


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_torch(max_norm):
    grads = _tree(seed=3)
    clipped, norm = optim.clip_by_global_norm(grads, max_norm)
    leaves = [p.clone().requires_grad_(True) for p in pytree.leaves(grads)]
    for p, g in zip(leaves, pytree.leaves(grads)):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    for mine, p in zip(pytree.leaves(clipped), leaves):
        torch.testing.assert_close(mine, p.grad, rtol=1e-6, atol=1e-7)


def test_learning_rate_schedules_by_hand():
    cos = optim.OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14, schedule="cosine")
    # Warmup: (step + 1) / warmup * lr, reaching lr at step 3.
    assert [round(float(optim.learning_rate(cos, s)), 6) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert float(optim.learning_rate(cos, 4)) == pytest.approx(1.0)
    # Halfway through the decay (step 4 + 10/2): min + (max - min) * 0.5 * (1 + cos(pi/2)).
    assert float(optim.learning_rate(cos, 9)) == pytest.approx(0.55)
    assert float(optim.learning_rate(cos, 14)) == pytest.approx(0.1)
    assert float(optim.learning_rate(cos, 1000)) == pytest.approx(0.1)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.3))
    assert float(optim.learning_rate(cos, 7)) == pytest.approx(quarter)
    lin = optim.OptimizerConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10, schedule="linear")
    assert float(optim.learning_rate(lin, 0)) == pytest.approx(1.0)
    assert float(optim.learning_rate(lin, 5)) == pytest.approx(0.5)
    assert float(optim.learning_rate(lin, 12)) == pytest.approx(0.0)
    const = optim.OptimizerConfig(lr=0.3, min_lr=0.0, warmup_steps=2, schedule="constant")
    assert [float(optim.learning_rate(const, s)) for s in (0, 1, 50)] == pytest.approx([0.15, 0.3, 0.3])


def test_loss_scale_backs_off_on_overflow_and_grows_after_interval():
    cfg = optim.LossScaleConfig(initial=1024.0, growth_interval=3)
    s = optim.loss_scale_init(cfg)
    s = optim.loss_scale_update(s, torch.tensor(False), cfg)
    assert float(s["scale"]) == 512.0
    for _ in range(2):
        s = optim.loss_scale_update(s, torch.tensor(True), cfg)
    assert float(s["scale"]) == 512.0
    s = optim.loss_scale_update(s, torch.tensor(True), cfg)
    assert float(s["scale"]) == 1024.0 and int(s["good_steps"]) == 0


