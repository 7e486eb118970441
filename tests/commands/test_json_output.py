"""Output that scripts can parse: with --json a command prints only JSON on stdout, and a command that does not
train never imports DeepSpeed (whose accelerator warning used to land on stdout before the JSON)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import sys, runpy; sys.argv = ['odegpt', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('odegpt', run_name='__main__')\n"
         "finally:\n    print('deepspeed imported' if 'deepspeed' in sys.modules else 'no deepspeed', file=sys.stderr)")


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "def ", "--max-new-tokens", "4", "--json"],
    ["generate", "--prompt", "def ", "--max-new-tokens", "4", "--draft-step-size", "2", "--json"],
    ["evaluate", "--data", "{text}", "--step-sizes", "1,2", "--seq-len", "16", "--no-speed", "--json"],
    ["bench", "--step-sizes", "1", "--batch-sizes", "1", "--rounds", "1", "--prompt-tokens", "8", "--new-tokens", "4",
     "--json"],
])
def test_json_commands_print_only_json_and_import_no_deepspeed(model_folder, tmp_path, command):  # noqa: F811
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    argv = [a.replace("{text}", str(text)) for a in command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DS_ACCELERATOR", None)
    result = subprocess.run([sys.executable, "-c", PROBE, argv[0], "--model", str(model_folder), *argv[1:]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    try:  # one document (evaluate, bench) or one record per line (generate)
        documents = [json.loads(result.stdout)]
    except json.JSONDecodeError:
        documents = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert documents and all(isinstance(document, dict) for document in documents), result.stdout
    assert "no deepspeed" in result.stderr and "real_accelerator" not in result.stdout + result.stderr
