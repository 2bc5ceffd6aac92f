"""The parts of the training loop (`runners.trainer.train`), one concern each:

- `setup`: device, process group, mesh, rules, kernels and compile backend of a run;
- `start`: where the training state comes from (scratch, resume, finetune, LoRA on top);
- `data`: the run's batches, resumable from the consumed-sample count;
- `report`: throughput, console / JSONL / TensorBoard logging, the progress bar;
- `saving`: when to checkpoint, what `extra` goes with it, failures of background saves;
- `guards`: divergence (non-finite steps) and stop signals (SIGTERM / SIGINT).
"""
