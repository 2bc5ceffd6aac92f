"""Compile time flat in depth (parallel.layerwise): what gets compiled does not grow with layers.

Graphs are captured with dynamo's CompileCounter backend (dynamo traces them as for inductor, then
runs them without generating code), so a 1-layer and a 3-layer model are compared cheaply.
Compiled numerics are checked against eager in tests/test_train_step.py (inductor) and
tests/test_decode.py.
"""
import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from lib import optim, pytree
from models import attention, llama
from parallel import layerwise, sharding
from parallel.decode import Decoder
from parallel.mesh import MeshConfig, build_mesh
from parallel.train_step import TrainStepConfig, build_eval_step, build_train_step, init_state
from tests.helpers_decode import greedy

KERNELS = llama.Kernels(attention=attention.reference)
OPT = optim.OptimizerConfig(lr=1e-2, warmup_steps=1, decay_steps=10)
MESH = build_mesh(MeshConfig())
RULES = sharding.load_rules(mesh=MESH)


def batch(config, seed=0):
    tokens = torch.randint(0, config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def graphs_of_a_training_run(n_layers: int) -> tuple[int, int]:
    """(graphs compiled, operations in them) by two train steps of two micro-batches, an eval
    step and a greedy decode (prefill + steps) of a tiny model with `n_layers` layers."""
    torch._dynamo.reset()  # the layer functions are shared by both depths: start empty
    config = dataclasses.replace(llama.PRESETS["tiny"], n_layers=n_layers)
    counter = CompileCounter()
    step_cfg = TrainStepConfig(micro_batches=2, remat="selective")
    state = init_state(llama.init(config, seed=0), step_cfg)
    step = build_train_step(config, OPT, step_cfg, MESH, RULES, kernels=KERNELS, backend=counter)
    for i in range(2):
        state, _ = step(state, batch(config, i))
    evaluate = build_eval_step(config, step_cfg, MESH, RULES, kernels=KERNELS, backend=counter)
    evaluate(state["params"], batch(config, 2))
    greedy(Decoder(state["params"], config, backend=counter), [[1, 2, 3], [4, 5]], 3)
    return counter.frame_count, counter.op_count


def test_compiled_graphs_do_not_grow_with_depth():
    one = graphs_of_a_training_run(1)
    # Train: the layer, the loss, the update of a layer's parameters, the update of the others;
    # eval: the layer and the loss without autograd; decode: the cached layer for the prefill
    # and for one token.
    assert one[0] == 8
    assert graphs_of_a_training_run(3) == one


def test_layer_groups_split_parameters_by_layer():
    params = {"embed": 0, "layers": [{"wq": 1, "wo": 2}, {"wq": 3, "wo": 4}], "final_norm": 5}
    flat = pytree.leaves(params)
    groups = [[flat[i] for i in group] for group in layerwise.layer_groups(params)]
    assert sorted(groups) == [[0, 5], [2, 1], [4, 3]]  # optree sorts dict keys: wo before wq


def test_map_groups_refuses_leaves_that_do_not_line_up():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    with pytest.raises(ValueError, match="leaf 1"):
        layerwise.map_groups(lambda a, b: (a,), [[0, 1]], [params, [torch.zeros(2, 3), torch.zeros(5)]])
