"""The train step on one process: accumulation, dtypes, fp16 overflow, remat, compile = eager.

Sharded meshes are covered by tests/test_distributed.py against torch.optim.AdamW.
"""
import dataclasses

import pytest
import torch

from lib import optim, pytree
from lib.errors import UserError
from models import attention, llama, lora
from parallel import sharding
from parallel.mesh import MeshConfig, build_mesh
from parallel.train_step import (TrainStepConfig, apply_remat, build_eval_step, build_train_step,
                                  init_state)

MODEL = llama.PRESETS["tiny"]
KERNELS = llama.Kernels(attention=attention.reference)
OPT = optim.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=10)
MESH = build_mesh(MeshConfig())
RULES = sharding.load_rules(mesh=MESH)


def make_batch(seed=0, rows=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (rows, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[1, :11] = llama.IGNORE_INDEX  # rows carry unequal numbers of tokens
    return {"tokens": tokens[:, :-1].contiguous(), "labels": labels}


def run(step_cfg, steps=2, opt=OPT, **kw):
    state = init_state(llama.init(MODEL, seed=0), step_cfg)
    step = build_train_step(MODEL, opt, step_cfg, MESH, RULES, kernels=KERNELS, **kw)
    history = []
    for i in range(steps):
        state, metrics = step(state, make_batch(i))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_loss_metric_is_the_models_mean_loss_before_the_update():
    _, history = run(TrainStepConfig(compile=False), steps=1)
    expected = llama.loss_fn(llama.init(MODEL, seed=0), make_batch(0), MODEL, kernels=KERNELS)
    assert history[0]["loss"] == pytest.approx(float(expected), abs=1e-6)
    assert history[0]["lr"] == pytest.approx(float(optim.learning_rate(OPT, 0)))
    assert history[0]["skipped"] == 0 and history[0]["loss_scale"] == 1.0


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    # eps=1 makes Adam's update ~ lr * g: the params then compare the gradients themselves
    # (with eps=1e-8, rounding noise in near-zero gradients is amplified to ~lr).
    linear = dataclasses.replace(OPT, eps=1.0)
    one, h1 = run(TrainStepConfig(compile=False, micro_batches=1), opt=linear)
    four, h4 = run(TrainStepConfig(compile=False, micro_batches=4), opt=linear)
    assert abs(h1[1]["loss"] - h4[1]["loss"]) < 1e-6
    assert abs(h1[1]["grad_norm"] - h4[1]["grad_norm"]) < 1e-6
    assert pytree.max_abs_diff(one["params"], four["params"])[0] < 1e-6


def test_remat_full_and_selective_give_the_same_step():
    base, _ = run(TrainStepConfig(compile=False), steps=1)
    for mode in ("full", "selective"):
        state, _ = run(TrainStepConfig(compile=False, remat=mode), steps=1)
        assert pytree.max_abs_diff(base["params"], state["params"])[0] < 1e-7, mode


def test_lora_trains_the_same_under_every_remat_mode():
    """LoRA weights are pytree nodes, so full recompute differentiates the adapters inside a
    layer; dropout masks come from (seed, step) keys, so the recomputed forward draws the masks
    the first one did and every mode takes the same step."""
    lcfg = lora.LoraConfig(r=4, alpha=8.0, dropout=0.3, target_modules=("q", "v", "down"),
                           modules_to_save=("lm_head",))
    adapters = pytree.tree_map(lambda t: t + 0.02, lora.init_adapters(MODEL, lcfg, seed=1))
    trained, frozen = lora.trainable(llama.init(MODEL, seed=0), adapters, lcfg)
    forward = lora.forward_fn(MODEL, lcfg, frozen)
    linear = dataclasses.replace(OPT, eps=1.0)  # updates ~ lr * g: params compare the gradients

    def one_step(remat, seed=5):
        cfg = TrainStepConfig(compile=False, remat=remat)
        step = build_train_step(MODEL, linear, cfg, MESH, RULES, kernels=KERNELS, forward=forward,
                                seed=seed)
        return step(init_state(trained, cfg), make_batch(0))

    base, m = one_step("none")
    assert pytree.max_abs_diff(base["params"], trained)[0] > 1e-4  # adapters and lm_head moved
    for mode in ("selective", "full"):
        state, mm = one_step(mode)
        assert abs(float(mm["grad_norm"]) - float(m["grad_norm"])) < 1e-6, mode
        assert pytree.max_abs_diff(state["params"], base["params"])[0] < 1e-7, mode
    other_masks, mo = one_step("full", seed=6)
    assert abs(float(mo["grad_norm"]) - float(m["grad_norm"])) > 1e-4  # dropout is on


def test_bf16_keeps_fp32_moments_and_master_weights():
    state, history = run(TrainStepConfig(compile=False, dtype="bf16"))
    assert state["params"]["layers"][0]["wq"].dtype == torch.bfloat16
    assert state["opt"]["master"]["layers"][0]["wq"].dtype == torch.float32
    assert state["opt"]["nu"]["embed"].dtype == torch.float32
    fp32_state, fp32_history = run(TrainStepConfig(compile=False))
    assert abs(history[0]["loss"] - fp32_history[0]["loss"]) < 2e-2
    # The bf16 params are the rounded master weights, which keep what bf16 cannot hold.
    rounded = pytree.tree_map(lambda w: w.to(torch.bfloat16), state["opt"]["master"])
    assert pytree.max_abs_diff(rounded, state["params"])[0] == 0
    assert pytree.max_abs_diff(state["opt"]["master"], state["params"])[0] > 0


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    huge = optim.LossScaleConfig(initial=2.0 ** 40, growth_interval=1)
    params = llama.init(MODEL, seed=0)
    state0 = init_state(params, TrainStepConfig(dtype="fp16", loss_scale=huge))
    step = build_train_step(MODEL, OPT, TrainStepConfig(compile=False, dtype="fp16", loss_scale=huge),
                            MESH, RULES, kernels=KERNELS)
    state1, m = step(state0, make_batch(0))
    assert int(m["skipped"]) == 1 and float(m["loss_scale"]) == 2.0 ** 40
    assert float(state1["loss_scale"]["scale"]) == 2.0 ** 39
    assert pytree.max_abs_diff(state1["params"], state0["params"])[0] == 0
    assert int(state1["opt"]["count"]) == 0 and int(state1["step"]) == 1
    # A sane scale trains, and after `growth_interval` good steps the scale grows.
    sane = dataclasses.replace(huge, initial=2.0 ** 10)
    state = init_state(params, TrainStepConfig(dtype="fp16", loss_scale=sane))
    step = build_train_step(MODEL, OPT, TrainStepConfig(compile=False, dtype="fp16", loss_scale=sane),
                            MESH, RULES, kernels=KERNELS)
    state, m = step(state, make_batch(0))
    assert int(m["skipped"]) == 0 and float(state["loss_scale"]["scale"]) == 2.0 ** 11
    assert m["loss"] == pytest.approx(float(llama.loss_fn(params, make_batch(0), MODEL,
                                                          kernels=KERNELS)), abs=2e-2)


def test_eval_step_is_the_mean_loss():
    params = llama.init(MODEL, seed=0)
    eval_step = build_eval_step(MODEL, TrainStepConfig(compile=False), MESH, RULES, kernels=KERNELS)
    expected = llama.loss_fn(params, make_batch(3), MODEL, kernels=KERNELS)
    assert float(eval_step(params, make_batch(3))) == pytest.approx(float(expected), abs=1e-6)


def test_bad_batches_are_user_errors():
    state = init_state(llama.init(MODEL), TrainStepConfig())
    step = build_train_step(MODEL, OPT, TrainStepConfig(compile=False, micro_batches=3), MESH, RULES)
    with pytest.raises(UserError, match="not divisible by micro_batches=3"):
        step(state, make_batch(0))
    with pytest.raises(UserError, match="no 'labels'"):
        step(state, {"tokens": make_batch(0)["tokens"]})


def counting_inductor():
    """The inductor backend, recording every graph dynamo hands it."""
    graphs = []
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)
    return backend, graphs


@pytest.mark.compiled
def test_compiled_step_equals_eager_with_remat_and_compiles_one_layer(tmp_path):
    cfg = dict(micro_batches=2, remat="full")
    linear = dataclasses.replace(OPT, eps=1.0)  # updates ~ lr * g: params compare the gradients
    eager, eager_history = run(TrainStepConfig(compile=False, **cfg), opt=linear)
    backend, graphs = counting_inductor()
    compiled, history = run(TrainStepConfig(compile=True, **cfg), opt=linear, cache_dir=tmp_path,
                            backend=backend)
    for a, b in zip(history, eager_history):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert pytree.max_abs_diff(compiled["params"], eager["params"])[0] < 1e-5
    # Compile time flat in depth: the two layers share one compiled layer graph; the loss is
    # one graph, the optimizer one per layer-shaped group and one for the rest (embed, norm,
    # lm_head), whatever the depth; two steps and two micro-batches compile nothing more.
    assert len(graphs) == 4, [g.code for g in graphs]
    # The eval step compiles two more: the layer and the loss without autograd.
    evaluate = build_eval_step(MODEL, TrainStepConfig(compile=True), MESH, RULES, kernels=KERNELS,
                               backend=backend, cache_dir=tmp_path)
    expected = llama.loss_fn(compiled["params"], make_batch(3), MODEL, kernels=KERNELS)
    assert float(evaluate(compiled["params"], make_batch(3))) == pytest.approx(float(expected), abs=1e-5)
    assert len(graphs) == 6


def saved_for_backward_bytes(remat: str) -> int:
    """Bytes a compiled layer keeps for its backward: its forward graph's outputs beyond the
    layer output, as inductor's partitioner (min-cut rematerialization) splits the graph."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    saved = []

    def forward_compiler(gm, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        values = [a.meta.get("val") for a in out.args[0][1:] if hasattr(a, "meta")]
        saved.append(sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)))
        return make_boxed_func(gm.forward)
    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    hook, kernels = apply_remat(remat, KERNELS)
    layer = torch.compile(hook(llama.transformer_layer) if hook else llama.transformer_layer,
                          backend=backend, fullgraph=True, dynamic=False)
    cfg = dataclasses.replace(MODEL, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176)
    p = {k: v.requires_grad_() for k, v in llama.init(cfg, seed=0)["layers"][0].items()}
    x = torch.randn(2, 64, cfg.dim, requires_grad=True)
    cos, sin = llama.rope_cos_sin(cfg, torch.arange(64)[None].expand(2, -1), x.dtype)
    layer(p, x, cos, sin, None, cfg, kernels).sum().backward()
    weights = sum(w.numel() * w.element_size() for w in p.values())
    return saved[0] - weights  # the weights are kept whatever the mode


def test_compiled_recompute_keeps_less_for_the_backward():
    """Compiled, full recompute keeps about the layer's input, selective drops the attention
    probabilities; an implementation whose recompute the partitioner folds back into the forward
    keeps as much as no recompute."""
    none, selective, full = (saved_for_backward_bytes(m) for m in ("none", "selective", "full"))
    x_bytes = 2 * 64 * 64 * 4
    assert full <= 2 * x_bytes and 8 * x_bytes < none, (none, selective, full)
    assert selective < none, (none, selective, full)
