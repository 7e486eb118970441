"""benchmarks/ablation.py reuses a kept evaluation only when it scored what the run asks."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ABLATION = Path(__file__).resolve().parents[2] / "benchmarks" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_benchmark", ABLATION)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def report(step_sizes, seq_len=128) -> dict:
    return {"seq_len": seq_len, "results": [{"step_size": a, "perplexity": 10.0 + a} for a in step_sizes]}


class Progress:
    """Stands in for launcher.stages.Stages: records each command; a run that succeeds writes a new report."""

    def __init__(self, eval_dir: Path, fail: bool = False) -> None:
        self.eval_dir, self.fail, self.commands = eval_dir, fail, []

    def run(self, command, env=None):
        self.commands.append(command)
        if self.fail:
            raise RuntimeError("evaluate failed")
        (self.eval_dir / "results.json").write_text(json.dumps(report([1.0, 2.0, 4.0])))


def test_a_kept_report_at_the_asked_step_sizes_is_reused_and_another_is_evaluated_over(ablation, tmp_path):
    args = SimpleNamespace(step_sizes="1,2,4", seq_len=128, num_samples=8)
    kept = tmp_path / "results.json"

    kept.write_text(json.dumps(report([4.0, 1.0, 2.0])))
    progress = Progress(tmp_path)
    assert ablation.evaluate(tmp_path, tmp_path, tmp_path, args, {}, progress) == report([4.0, 1.0, 2.0])
    assert progress.commands == []

    for stale in (report([0.5, 1.0, 2.0, 3.0, 4.0]), report([1.0, 2.0, 4.0], seq_len=256)):
        kept.write_text(json.dumps(stale))
        progress = Progress(tmp_path)
        assert ablation.evaluate(tmp_path, tmp_path, tmp_path, args, {}, progress) == report([1.0, 2.0, 4.0])
        assert len(progress.commands) == 1 and "evaluate" in progress.commands[0]


def test_a_failed_evaluation_leaves_the_kept_report_in_place(ablation, tmp_path):
    args = SimpleNamespace(step_sizes="1,2", seq_len=128, num_samples=8)
    stale = report([1.0, 2.0, 4.0])
    (tmp_path / "results.json").write_text(json.dumps(stale))
    with pytest.raises(RuntimeError):
        ablation.evaluate(tmp_path, tmp_path, tmp_path, args, {}, Progress(tmp_path, fail=True))
    assert json.loads((tmp_path / "results.json").read_text()) == stale
