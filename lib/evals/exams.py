"""MMLU and C-Eval: four-choice exams per subject, few-shot from the subject's dev rows.

Prompts, targets, few-shot selection and groups follow lm-evaluation-harness 0.4's `mmlu`
(tasks/mmlu/default) and `ceval-valid` (tasks/ceval) definitions:

    <description>                      "The following are multiple choice questions (with
                                        answers) about <subject with spaces>.\\n\\n"
    <question.strip()>\\nA. <A>\\nB. <B>\\nC. <C>\\nD. <D>\\nAnswer: <letter>\\n\\n    x k shots
    <question.strip()>\\nA. <A>\\nB. <B>\\nC. <C>\\nD. <D>\\nAnswer:

and the continuations " A" .. " D". The shots are the first k dev rows of the same subject
(lm-eval's `first_n` sampler). MMLU scores its test split, C-Eval its val split (the test
answers are not public); C-Eval's answer cue is "答案：" and its description is Chinese.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lib.errors import UserError
from lib.evals import files
from lib.evals.doc import Doc, Shot, fewshot_context

LETTERS = ("A", "B", "C", "D")

# lm-eval's MMLU groups (the `tag` of each tasks/mmlu/default/mmlu_<subject>.yaml).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning"),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions"),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy"),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology"),
}
MMLU_SUBJECTS = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects}

# C-Eval's subjects with the Chinese names its lm-eval descriptions use.
CEVAL_SUBJECTS: dict[str, str] = {
    "accountant": "注册会计师", "advanced_mathematics": "高等数学", "art_studies": "艺术学",
    "basic_medicine": "基础医学", "business_administration": "工商管理",
    "chinese_language_and_literature": "中国语言文学", "civil_servant": "公务员",
    "clinical_medicine": "临床医学", "college_chemistry": "大学化学",
    "college_economics": "大学经济学", "college_physics": "大学物理",
    "college_programming": "大学编程", "computer_architecture": "计算机组成",
    "computer_network": "计算机网络", "discrete_mathematics": "离散数学",
    "education_science": "教育学", "electrical_engineer": "注册电气工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "fire_engineer": "注册消防工程师", "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学", "high_school_chinese": "高中语文",
    "high_school_geography": "高中地理", "high_school_history": "高中历史",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理",
    "high_school_politics": "高中政治", "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "law": "法学", "legal_professional": "法律职业资格", "logic": "逻辑学",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "marxism": "马克思主义基本原理", "metrology_engineer": "注册计量师",
    "middle_school_biology": "初中生物", "middle_school_chemistry": "初中化学",
    "middle_school_geography": "初中地理", "middle_school_history": "初中历史",
    "middle_school_mathematics": "初中数学", "middle_school_physics": "初中物理",
    "middle_school_politics": "初中政治", "modern_chinese_history": "近代史纲要",
    "operating_system": "操作系统", "physician": "医师资格", "plant_protection": "植物保护",
    "probability_and_statistics": "概率统计", "professional_tour_guide": "导游资格",
    "sports_science": "体育学", "tax_accountant": "税务师", "teacher_qualification": "教师资格",
    "urban_and_rural_planner": "注册城乡规划师", "veterinary_medicine": "兽医学",
}


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, str, str, str]
    answer: int        # index into LETTERS
    index: int         # 0-based position in its file
    where: str         # "file:line" for messages


@dataclass(frozen=True)
class Exam:
    """One exam flavour: how its prompt ends and how its subjects are described."""
    name: str
    answer_cue: str
    eval_split: str

    def description(self, subject: str) -> str:
        if self.name == "ceval":
            return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, subject)}的单项选择题，请选出其中的正确答案。\n\n"
        return ("The following are multiple choice questions (with answers) about "
                f"{' '.join(subject.split('_'))}.\n\n")

    def question_text(self, q: Question) -> str:
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
        return f"{q.text.strip()}{options}\n{self.answer_cue}"


MMLU = Exam("mmlu", "Answer:", "test")
CEVAL = Exam("ceval", "答案：", "val")


def _answer_index(value: object, where: str) -> int:
    if isinstance(value, str) and value.strip() in LETTERS:
        return LETTERS.index(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise UserError(f"{where}: answer {value!r} is not one of A, B, C, D (or an index 0-3)")


# ---------------------------------------------------------------------------------------------
# Readers: {subject: {split: [Question, ...]}}

Splits = dict[str, dict[str, list[Question]]]


def read_mmlu(path: str | Path) -> Splits:
    """MMLU in the original layout (`data/{dev,val,test}/<subject>_<split>.csv`, given as `data`
    or as `data/test`) or the `cais/mmlu` layout (parquet/json files per split with question,
    subject, choices, answer)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"eval.mmlu: {path} does not exist")
    root = _csv_root(path, "test")
    if root is not None:
        return _read_csv_layout(root, ("dev", "val", "test"), _mmlu_csv)
    return _read_cais_layout(path)


def read_ceval(path: str | Path) -> Splits:
    """C-Eval's `val/<subject>_val.csv` and `dev/<subject>_dev.csv` (header id,question,A,B,C,
    D,answer), given as the folder holding val/ and dev/, or as `val`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"eval.ceval: {path} does not exist")
    root = _csv_root(path, "val")
    if root is None:
        raise UserError(f"eval.ceval: {path} holds no val/<subject>_val.csv files")
    return _read_csv_layout(root, ("dev", "val"), _ceval_csv)


def _csv_root(path: Path, split: str) -> Path | None:
    """The folder holding `<split>/` and `dev/`, whether given itself or as its `<split>/`."""
    if path.is_dir() and any(path.glob(f"*_{split}.csv")):
        return path.parent
    if (path / split).is_dir() and any((path / split).glob(f"*_{split}.csv")):
        return path
    return None


def _read_csv_layout(root: Path, splits: tuple[str, ...], read_file) -> Splits:
    out: Splits = {}
    for split in splits:
        for file in sorted((root / split).glob(f"*_{split}.csv")):
            subject = file.name[: -len(f"_{split}.csv")]
            out.setdefault(subject, {})[split] = list(read_file(file))
    return out


def _mmlu_csv(file: Path) -> Iterator[Question]:
    for index, where, row in files.csv_rows(file, columns=6):
        yield Question(row[0], tuple(row[1:5]), _answer_index(row[5], where), index, where)


def _ceval_csv(file: Path) -> Iterator[Question]:
    for index, where, row in files.csv_dicts(file, ("question", "A", "B", "C", "D", "answer")):
        yield Question(row["question"], tuple(row[k] for k in LETTERS),
                       _answer_index(row["answer"], where), index, where)


_CAIS_SPLITS = {"test": "test", "dev": "dev", "validation": "val", "val": "val"}


def _read_cais_layout(path: Path) -> Splits:
    """Files named by split (`test-00000-of-00001.parquet`, `dev.jsonl`, ...). The HF dataset
    repo holds every row twice (`all/` and one folder per subject): `all/` is read when present."""
    tables = [p for p in sorted(path.rglob("*")) if p.suffix in (".parquet", ".json", ".jsonl")]
    if any(p.parent.name == "all" for p in tables):
        tables = [p for p in tables if p.parent.name == "all"]
    out: Splits = {}
    for table in tables:
        split = next((s for key, s in _CAIS_SPLITS.items() if table.name.startswith(key)), None)
        if split is None:
            continue  # auxiliary_train and other files
        for index, record in enumerate(files.table_records(table)):
            where = f"{table} row {index}"
            choices = files.field(record, "choices", where, (list, tuple))
            if len(choices) != 4:
                raise UserError(f"{where}: expected 4 choices, got {len(choices)}")
            q = Question(files.field(record, "question", where), tuple(str(c) for c in choices),
                         _answer_index(files.field(record, "answer", where, (int, str)), where),
                         index, where)
            out.setdefault(files.field(record, "subject", where), {}).setdefault(split, []).append(q)
    if not out:
        raise UserError(f"eval.mmlu: {path} holds neither test/<subject>_test.csv files nor "
                        "cais/mmlu parquet/json files named test*/dev*")
    return out


# ---------------------------------------------------------------------------------------------


def exam_docs(exam: Exam, splits: Splits, num_fewshot: int, limit: int | None,
              source: str) -> list[Doc]:
    """Every scored document, subject by subject (sorted), each with its k-shot prompt."""
    docs: list[Doc] = []
    subjects = sorted(s for s, by_split in splits.items() if exam.eval_split in by_split)
    if not subjects:
        raise UserError(f"eval.{exam.name}: {source} holds no {exam.eval_split} questions")
    for subject in subjects:
        questions = splits[subject][exam.eval_split]
        dev = splits[subject].get("dev", [])
        if num_fewshot > len(dev):
            where = f"the dev file of {subject}" if dev else f"a dev file for {subject} (dev/{subject}_dev.csv)"
            raise UserError(f"eval.{exam.name}: num_fewshot={num_fewshot} needs {num_fewshot} dev "
                            f"rows, but {source} has {len(dev) if dev else 'no'} "
                            f"{'rows in ' + where if dev else where}")
        shots = [Shot(exam.question_text(q), LETTERS[q.answer]) for q in dev[:num_fewshot]]
        for q in questions[:limit]:
            docs.append(Doc(task=exam.name, subject=subject, index=q.index,
                            context=fewshot_context(exam.question_text(q), shots,
                                                    exam.description(subject)),
                            choices=LETTERS, target=q.answer))
    return docs
