"""lm-evaluation-harness runs exported folders offline, exactly as a user would type it:
``lm_eval --model hf --model_args pretrained=DIR[,trust_remote_code=True,step_size=A]``.

One local task of each request type lm-eval has (loglikelihood, rolling loglikelihood, generation),
read from a JSON file (``dataset_path: json``), with the Hub switched off.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odegpt.folders.export import save_native, save_unrolled
from tests.conftest import tokenized_tiny_model

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 40
PAIRS = [("def add(a, b):\n    return", " a + b"), ("class Point:\n    x: int =", " 0"), ("def add(a,", " b):")]

TASKS = {
    "completion": {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
                   "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}]},
    "rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{context}}{{continuation}}",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    "generation": {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model, info = tokenized_tiny_model(root, TEXT)
    save_native(model, root / "native", tokenizer_dir=root / "tokenizer")
    save_unrolled(model, root / "unrolled-a2", 2.0, tokenizer_dir=root / "tokenizer")
    (root / "docs.jsonl").write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in PAIRS))
    (root / "tasks").mkdir()
    for name, spec in TASKS.items():  # JSON is YAML
        task = {"task": f"odegpt_tiny_{name}", "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(root / "docs.jsonl")}}, **spec}
        (root / "tasks" / f"{name}.yaml").write_text(json.dumps(task))
    return root


# The `lm_eval` command itself, run for several models in ONE process so lm-eval and torch import once.
RUN_CLI = """
import sys
from lm_eval.__main__ import cli_evaluate
for argv in {runs!r}:
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
"""


def run_lm_eval(folders: Path, model_args: dict[str, str]) -> dict[str, tuple[dict, list[str]]]:
    """``lm_eval --model hf --model_args ARGS ...`` offline for each named ARGS; returns, per name, its
    metrics per task and the generated texts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(folders / "cache")}
    runs = [["--model", "hf", "--model_args", args, "--tasks", ",".join(f"odegpt_tiny_{n}" for n in TASKS),
             "--include_path", str(folders / "tasks"), "--device", "cpu", "--batch_size", "2", "--log_samples",
             "--output_path", str(folders / "results" / name)] for name, args in model_args.items()]
    result = subprocess.run([sys.executable, "-c", RUN_CLI.format(runs=runs)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = {}
    for name in model_args:
        out = folders / "results" / name
        samples = next(out.rglob("samples_odegpt_tiny_generation_*.jsonl")).read_text().splitlines()
        outputs[name] = (json.loads(next(out.rglob("results_*.json")).read_text())["results"],
                         [json.loads(line)["resps"][0][0] for line in samples])
    return outputs


def test_native_and_unrolled_exports_run_under_lm_eval_and_agree_at_the_same_step_size(folders):
    runs = run_lm_eval(folders, {
        "native-a2": f"pretrained={folders / 'native'},trust_remote_code=True,step_size=2",
        "unrolled-a2": f"pretrained={folders / 'unrolled-a2'}",
        "native-a1": f"pretrained={folders / 'native'},trust_remote_code=True",
    })
    (native_a2, native_a2_texts), (unrolled, unrolled_texts), (native_a1, _) = runs.values()

    for task in ("odegpt_tiny_completion", "odegpt_tiny_rolling"):
        for metric, value in native_a2[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                # The same weights at the same step size: the same numbers, whichever folder.
                assert value == pytest.approx(unrolled[task][metric], rel=1e-5), (task, metric)
    assert native_a2_texts == unrolled_texts and len(native_a2_texts) == len(PAIRS)
    # step_size=2 in the model arguments reached the config: the default solve (a=1) scores differently.
    rolling = "odegpt_tiny_rolling"
    assert native_a1[rolling]["word_perplexity,none"] != pytest.approx(native_a2[rolling]["word_perplexity,none"],
                                                                       rel=1e-4)
