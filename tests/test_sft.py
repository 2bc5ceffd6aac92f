"""runners.sft end to end (eager, tiny): alpaca data -> preprocess -> LoRA / full fine-tuning."""
import json
import random
import re
from pathlib import Path

import pytest
import torch

from lib.data import DataConfig
from lib.data.corpus import default_dataset
from lib.data.indexed import IndexedDatasetWriter
from lib.data.sft_dataset import open_sft_pair, response_token_counts, sample_arrays
from lib.errors import UserError
from models import hf, llama, peft
from runners import convert, preprocess, sft
from runners.loop.data import instruction_data_notes

WORDS = "list sort the numbers name a colour give one fruit reverse this word count letters".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    text, tok = default_dataset(root, max_bytes=150_000, vocab_size=512)
    (root / "text_prefix").write_text(text)  # pretraining text, for the wrong-data test
    rng = random.Random(0)
    records = [{"instruction": " ".join(rng.choices(WORDS, k=6)), "input": "",
                "output": " ".join(rng.choices(WORDS, k=8))} for _ in range(64)]
    (root / "alpaca.json").write_text(json.dumps(records))
    preprocess.main(["--input", str(root / "alpaca.json"), "--output-prefix", str(root / "alpaca"),
                     "--tokenizer", tok, "--handler", "alpaca", "--template", "alpaca",
                     "--seq-length", "192", "--pack"])
    config = llama.PRESETS["tiny"]
    hf.save(root / "base", config, llama.init(config, seed=1))
    return root, tok


def run_sft(root, tok, out, *extra):
    sft.main([f"checkpoint.load={root / 'base'}", f"data.paths=[{root / 'alpaca'}]",
              f"data.tokenizer={tok}", "data.seq_len=192", "data.split=90,10,0",
              "train.steps=6", "train.global_batch=4", "train.log_every=1",
              "train.step.compile=false", "optim.lr=1e-2", "optim.decay_steps=6",
              f"out_dir={out}", *extra])
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


LORA_ARGS = ("lora.r=4", "lora.alpha=8", "lora.target_modules=[q,v]", "lora.dropout=0.1")
EVALS = Path(__file__).parent / "data" / "evals"
EVAL_TASKS = ("eval.tasks=[boolq,piqa]", f"eval.boolq={EVALS}/boolq", f"eval.piqa={EVALS}/piqa")


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory):
    """A LoRA run from the HF base, scoring evaluation tasks at its last step: (out_dir, rows)."""
    root, tok = setup
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, run_sft(root, tok, out, *LORA_ARGS, *EVAL_TASKS, "train.eval_every=6")


def test_lora_trains_adapters_only_and_writes_peft(lora_run):
    out, rows = lora_run
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    lora_cfg, adapters, modules = peft.load(out / "adapter")
    assert lora_cfg.r == 4 and lora_cfg.target_modules == ("q", "v") and not modules
    assert all(ab["b"].abs().sum() > 0 for layer in adapters["layers"] for ab in layer.values())
    assert set(adapters["layers"][0]) == {"wq", "wv"}


def test_evaluation_tasks_during_lora_training_score_the_adapted_model(setup, lora_run, tmp_path):
    """The figures logged at the last step are runners.evaluate's on the base + written adapter."""
    from runners import evaluate
    root, tok = setup
    out, rows = lora_run
    logged = [r for r in rows if "boolq_acc" in r]
    assert [r["step"] for r in logged] == [6] and "piqa_acc_norm" in logged[0]
    evaluate.main([f"checkpoint.load={root / 'base'}", f"lora.adapter={out / 'adapter'}",
                   f"data.tokenizer={tok}", f"out_dir={tmp_path}", "eval.compile=false", *EVAL_TASKS])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert logged[0]["boolq_acc"] == results["boolq"]["acc"]
    assert logged[0]["piqa_acc_norm"] == results["piqa"]["acc_norm"]


def test_full_finetune_writes_an_hf_model_and_reports_cut_responses(setup, tmp_path, capsys):
    root, tok = setup
    # Examples hold 115-136 tokens; data.seq_len=128 cuts the ends of the longer responses.
    run_sft(root, tok, tmp_path / "full", "train.eval_every=3", "data.seq_len=128")
    config, tuned = hf.load(tmp_path / "full" / "hf")
    _, base = hf.load(root / "base")
    assert config == llama.PRESETS["tiny"]
    assert not torch.equal(tuned["layers"][0]["wq"], base["layers"][0]["wq"])
    out = capsys.readouterr().out
    assert re.search(r"note: \d+ of \d+ response tokens \(\d+\.\d%\) lie beyond data\.seq_len=128 "
                     r"and are never trained on", out), out[-2000:]
    assert re.search(r"done: step 6; .* response tokens", out)  # in the final summary too


def test_cut_response_counts_match_the_samples(setup):
    """response_token_counts against the samples training sees (sample_arrays' labels)."""
    root, _ = setup
    prefix = str(root / "alpaca")
    ids, mask = open_sft_pair(prefix)
    for seq_len in (64, 120):
        total, cut = response_token_counts(prefix, (0, ids.num_documents), seq_len)
        full = kept = 0
        for d in range(ids.num_documents):
            full += int((sample_arrays(ids.document(d), mask.document(d), 10_000, 0)["labels"] != -100).sum())
            kept += int((sample_arrays(ids.document(d), mask.document(d), seq_len, 0)["labels"] != -100).sum())
        assert (total, cut) == (full, full - kept) and cut > 0


def test_wrong_or_empty_instruction_data_is_refused(setup, tmp_path):
    root, tok = setup
    text = (root / "text_prefix").read_text()
    with pytest.raises(UserError, match=r"holds pretraining text .* not instruction data"):
        instruction_data_notes(DataConfig(paths=(text,), seq_len=64))
    # Instruction data whose loss mask is all zeros: nothing to learn.
    for suffix, dtype in (("_input_ids_document", "int32"), ("_loss_mask_document", "uint8")):
        with IndexedDatasetWriter(str(tmp_path / f"silent{suffix}"), dtype) as w:
            for n in (5, 7, 6):
                w.add_document(list(range(1, n + 1)) if "ids" in suffix else [0] * n)
    with pytest.raises(UserError, match="holds no trained \\(response\\) tokens"):
        instruction_data_notes(DataConfig(paths=(str(tmp_path / "silent"),), seq_len=8, split="1"))
    with pytest.raises(UserError, match="cuts off every response token"):
        instruction_data_notes(DataConfig(paths=(str(root / "alpaca"),), seq_len=2))


def test_sft_needs_a_model_and_data(tmp_path):
    with pytest.raises(UserError, match="checkpoint.load"):
        sft.main([f"out_dir={tmp_path}"])


@pytest.mark.compiled
def test_compiled_lora_step_matches_eager(setup, tmp_path):
    """LoRA compiled with full recompute and dropout: the same masks, losses and gradients as
    the eager step (the masks are counter-based, lib.prng)."""
    root, tok = setup
    lora_args = ["lora.r=4", "lora.target_modules=[q,v,down]", "lora.dropout=0.2", "train.steps=2",
                 "train.eval_every=0", "train.step.remat=full"]
    eager = run_sft(root, tok, tmp_path / "eager", *lora_args)
    compiled = run_sft(root, tok, tmp_path / "compiled", *lora_args, "train.step.compile=true")
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], abs=1e-5)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4)


def test_sft_from_a_native_checkpoint_equals_sft_from_hf(setup, lora_run, tmp_path):
    """The native checkpoint's recorded model and weights: the same run as from the HF base."""
    root, tok = setup
    convert.hf_to_native(root / "base", tmp_path / "native", dtype=None)
    rows = run_sft(root, tok, tmp_path / "from-native", *LORA_ARGS,
                   f"checkpoint.load={tmp_path / 'native'}")
    _, reference = lora_run
    keys = ("step", "loss", "grad_norm", "lr")
    assert [{k: r[k] for k in keys} for r in rows if "loss" in r] == \
        [{k: r[k] for k in keys} for r in reference if "loss" in r]


def test_a_typo_in_an_optional_section_suggests_the_key():
    from lib.config import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'r'"):
        sft.main(["lora.rr=16"])


def test_modellink_instruction_data_gives_the_samples_of_our_own(setup):
    """The same packed alpaca examples, as ModelLink's preprocess_data.py --pack would store them
    (lib.data.modellink), train on exactly the tokens, labels, positions and segments of ours."""
    import numpy as np

    from lib.data import DataConfig, build_datasets, modellink
    from lib.data.indexed import IndexedDataset, IndexedDatasetWriter
    from lib.data.sft_dataset import IDS_SUFFIX, MASK_SUFFIX

    root, tok = setup
    seq = 512  # several examples per sample
    preprocess.main(["--input", str(root / "alpaca.json"), "--output-prefix", str(root / "packed"),
                     "--tokenizer", tok, "--handler", "alpaca", "--template", "alpaca",
                     "--seq-length", str(seq), "--pack"])
    ids, mask = IndexedDataset(f"{root}/packed{IDS_SUFFIX}"), IndexedDataset(f"{root}/packed{MASK_SUFFIX}")
    writers = {s: IndexedDatasetWriter(f"{root}/ml{s}", np.int32)
               for s in (modellink.IDS, modellink.LABELS, modellink.ATTENTION)}
    for d in range(ids.num_documents):  # ModelLink: labels = the token where trained; pads: id 0, -100, 1
        t, m = np.concatenate(ids.document(d)).astype(np.int64), np.concatenate(mask.document(d))
        pad = seq - len(t)
        writers[modellink.IDS].add_document(np.concatenate([t, np.zeros(pad)]))
        writers[modellink.LABELS].add_document(np.concatenate([np.where(m != 0, t, -100), np.full(pad, -100)]))
        writers[modellink.ATTENTION].add_document(np.ones(seq))
    for w in writers.values():
        w.finish()
    cfg = dict(seq_len=seq, tokenizer=tok, split="1,0,0")
    n = ids.num_documents
    ours = build_datasets(DataConfig(paths=(f"{root}/packed",), **cfg), {"train": n}, vocab_size=512)["train"]
    theirs = build_datasets(DataConfig(paths=(f"{root}/ml",), **cfg), {"train": n}, vocab_size=512)["train"]
    assert min(ours[i]["segment_ids"].max() for i in range(n)) > 1  # every sample packs several examples
    for i in range(n):
        a, b = ours[i], theirs[i]
        real = a["segment_ids"] != 0  # ModelLink's padding is a segment of pad tokens, never trained
        assert np.array_equal(a["labels"], b["labels"])
        for key in ("tokens", "positions", "segment_ids"):
            assert np.array_equal(a[key][real], b[key][real]), key
