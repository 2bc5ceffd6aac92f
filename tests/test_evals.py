"""lib/evals: task files in every layout users hold, lm-eval's prompts, and bad input.

Prompt and score fidelity against lm-eval itself is tests/test_evaluate_parity.py; here the
readers and errors, on the small files of tests/data/evals (written for this project).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib import evals
from lib.errors import UserError
from lib.evals import exams, hellaswag, report
from lib.evals.doc import Doc, Scored, fewshot_context

DATA = Path(__file__).parent / "data" / "evals"


def test_mmlu_prompt_is_lm_eval_s_five_shot_format():
    docs = evals.load_docs("mmlu", DATA / "mmlu" / "data")
    assert [d.subject for d in docs] == ["astronomy"] * 4 + ["high_school_chemistry"] * 4
    doc = docs[0]
    assert doc.context.startswith(
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Mars\nD. Earth\nAnswer: B\n\n")
    assert doc.context.endswith("What is the largest planet in the Solar System?\nA. Earth\nB. Saturn"
                                "\nC. Jupiter\nD. Neptune\nAnswer:")
    assert doc.context.count("\n\n") == 6  # description + 5 shots
    assert doc.continuations == [" A", " B", " C", " D"] and doc.target == 2
    assert "about high school chemistry.\n\n" in docs[4].context


def test_mmlu_given_as_its_test_folder_and_with_limit_per_subject():
    docs = evals.load_docs("mmlu", DATA / "mmlu" / "data" / "test", num_fewshot=1, limit=2)
    assert [(d.subject, d.index) for d in docs] == [("astronomy", 0), ("astronomy", 1),
                                                      ("high_school_chemistry", 0), ("high_school_chemistry", 1)]
    assert docs[0].context.count("Answer:") == 2


@pytest.mark.parametrize("fmt", ["parquet", "json", "jsonl"])
def test_mmlu_in_the_cais_layout_equals_the_csv_layout(tmp_path, fmt):
    rows = {split: [] for split in ("dev", "test")}
    for split in rows:
        for file in sorted((DATA / "mmlu" / "data" / split).glob("*.csv")):
            subject = file.name.rsplit("_", 1)[0]
            for r in csv.reader(open(file, newline="")):
                rows[split].append({"question": r[0], "subject": subject, "choices": r[1:5],
                                    "answer": "ABCD".index(r[5])})
    # the HF repo holds every row twice: all/ and one folder per subject
    for folder in ("all", "astronomy"):
        (tmp_path / folder).mkdir()
        for split, records in rows.items():
            records = [r for r in records if folder == "all" or r["subject"] == folder]
            path = tmp_path / folder / f"{split}-00000-of-00001.{fmt}"
            if fmt == "parquet":
                pq.write_table(pa.Table.from_pylist(records), path)
            elif fmt == "json":
                path.write_text(json.dumps(records))
            else:
                path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [d.context for d in evals.load_docs("mmlu", tmp_path)] == \
        [d.context for d in evals.load_docs("mmlu", DATA / "mmlu" / "data")]


def test_ceval_prompt_uses_its_chinese_cue_and_description():
    docs = evals.load_docs("ceval", DATA / "ceval")
    assert len(docs) == 3 and docs[1].target == 1
    assert docs[0].context.startswith("以下是中国关于高中地理的单项选择题，请选出其中的正确答案。\n\n"
                                      "中国的首都是哪座城市？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳\n答案： B\n\n")
    assert docs[0].context.endswith("\n答案：")
    assert evals.load_docs("ceval", DATA / "ceval" / "val")[0].context == docs[0].context


def test_zero_shot_tasks():
    boolq = evals.load_docs("boolq", DATA / "boolq" / "dev.jsonl")
    assert boolq[0].context == ("The Moon is Earth's only natural satellite. Its diameter is about a quarter "
                                "of that of Earth, making it the fifth largest moon in the Solar System.\n"
                                "Question: is the moon bigger than the earth?\nAnswer:")
    assert boolq[0].choices == ("no", "yes") and [d.target for d in boolq] == [0, 0, 1, 1, 0]
    piqa = evals.load_docs("piqa", DATA / "piqa")
    assert piqa[1].context == "Question: How do you boil an egg?\nAnswer:" and piqa[1].target == 1
    assert evals.load_docs("piqa", DATA / "piqa" / "valid.jsonl")[1] == piqa[1]
    hs = evals.load_docs("hellaswag", DATA / "hellaswag")
    # "[title]" becomes ". ", ctx_b is capitalised, the label is a string
    assert hs[2].context == ("Washing dishes: A man fills the sink with soapy water.. Scrub each plate. "
                             "The man")
    assert hs[3].target == 2 and hs[0].choices[0] == "pours the hot water over a tea bag in a cup."
    mine = evals.load_docs("choice", DATA / "choice.jsonl", num_fewshot=1, fewshot_path=DATA / "choice.jsonl")
    assert mine[1].context == "The capital of France is Paris\n\nTwo plus two equals" and mine[1].target == 1


def test_hellaswag_preprocessing_as_lm_eval():
    assert hellaswag.preprocess(" A [header] B  [step] C [title] D ") == "A B  C. D"  # three spaces halve once, as in lm-eval


def test_acc_norm_divides_by_characters_of_the_choice():
    doc = Doc("piqa", None, 0, "q", ("a", "a much longer answer"), target=1)
    s = Scored(doc, (-2.0, -10.0))
    assert s.prediction == 0 and s.prediction_norm == 1 and s.correct_norm and not s.correct
    assert Scored(doc, (-1.0, -1.0)).prediction == 0  # ties: the first, as numpy's argmax


def test_report_weights_groups_by_size_and_gives_the_macro_average():
    def scored(subject, correct, n):
        return [Scored(Doc("mmlu", subject, i, "q", exams.LETTERS, 0), (0.0 if i < correct else -9.0, -1, -1, -1))
                for i in range(n)]
    summary = report.summarize(scored("anatomy", 1, 2) + scored("philosophy", 3, 3) + scored("virology", 0, 5))
    mmlu = summary["mmlu"]
    assert mmlu["acc"] == pytest.approx(4 / 10)
    assert mmlu["macro_acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert mmlu["categories"]["stem"]["acc"] == 0.5 and mmlu["categories"]["humanities"]["n"] == 3
    assert "mmlu_anatomy" in report.format_table(summary)


# ---------------------------------------------------------------------------------------------
# Bad input: the file and row named


@pytest.fixture
def mmlu_copy(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(DATA / "mmlu" / "data", root)
    return root


def test_test_file_without_dev_file(mmlu_copy):
    (mmlu_copy / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(UserError, match=r"num_fewshot=5 .*no a dev file for astronomy \(dev/astronomy_dev.csv\)"):
        evals.load_docs("mmlu", mmlu_copy)
    assert len(evals.load_docs("mmlu", mmlu_copy, num_fewshot=0)) == 8


def test_more_shots_than_dev_rows(mmlu_copy):
    with pytest.raises(UserError, match="num_fewshot=6 needs 6 dev rows, but .* has 5 rows"):
        evals.load_docs("mmlu", mmlu_copy, num_fewshot=6)


def test_row_with_the_wrong_number_of_columns(mmlu_copy):
    path = mmlu_copy / "test" / "astronomy_test.csv"
    path.write_text(path.read_text() + "Only a question,A,B\n")
    with pytest.raises(UserError, match=r"astronomy_test.csv:5: expected 6 columns, got 3"):
        evals.load_docs("mmlu", mmlu_copy)


def test_answer_that_is_not_a_letter(mmlu_copy):
    path = mmlu_copy / "test" / "astronomy_test.csv"
    path.write_text(path.read_text().replace(",C\n", ",E\n", 1))
    with pytest.raises(UserError, match=r"astronomy_test.csv:1: answer 'E' is not one of A, B, C, D"):
        evals.load_docs("mmlu", mmlu_copy)


def test_piqa_labels_that_do_not_match_the_questions(tmp_path):
    shutil.copytree(DATA / "piqa", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(UserError, match="valid-labels.lst has 2 labels but .*valid.jsonl has 5 questions"):
        evals.load_docs("piqa", tmp_path / "piqa")


def test_malformed_jsonl_line_and_missing_field(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"question": "q", "passage": "p", "answer": true}\n{not json\n')
    with pytest.raises(UserError, match=r"dev.jsonl:2: not valid JSON"):
        evals.load_docs("boolq", path)
    path.write_text('{"question": "q", "answer": true}\n')
    with pytest.raises(UserError, match=r"dev.jsonl:1: no 'passage' field"):
        evals.load_docs("boolq", path)


def test_hellaswag_label_out_of_range(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c",
                                "endings": ["x", "y"], "label": "2"}) + "\n")
    with pytest.raises(UserError, match=r"hs.jsonl:1: label '2' is not an index into its 2 endings"):
        evals.load_docs("hellaswag", path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown evaluation task 'mmmlu'; known tasks: mmlu, ceval, boolq"):
        evals.load_docs("mmmlu", DATA)


def test_empty_task_folder(tmp_path):
    with pytest.raises(UserError, match="holds neither test/<subject>_test.csv files nor cais/mmlu"):
        evals.load_docs("mmlu", tmp_path)
    with pytest.raises(UserError, match="holds no val/<subject>_val.csv"):
        evals.load_docs("ceval", tmp_path)
    with pytest.raises(UserError, match="is a folder without dev.jsonl"):
        evals.load_docs("boolq", tmp_path)


def test_zero_shot_task_refuses_shots():
    with pytest.raises(UserError, match="boolq is zero-shot here"):
        evals.load_docs("boolq", DATA / "boolq", num_fewshot=2)


def test_fewshot_context_rendering():
    assert fewshot_context("Q3", [], "") == "Q3"
