"""An output folder is claimed for the whole of a command's work: a folder that appears meanwhile is never replaced,
a second writer is refused, --overwrite replaces only an earlier output of the same kind, and an interrupted write
leaves nothing that a later command would mistake for a result.

The races are made deterministic with the seam ``output_folder.before_publish`` (called with the lock held, after the
work and before the final check and rename), patched by each test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.folder_kinds import CORPUS, MODEL, RUN, TOKENIZER, UNKNOWN, folder_kind
from odegpt.commands.cli import main as odegpt_main
from odegpt.folders import output_folder

REPO = Path(__file__).resolve().parents[2]


def _odegpt(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = odegpt_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_folder_that_appears_while_an_export_works_is_never_replaced(model_folder, tmp_path, capsys, monkeypatch):
    output = tmp_path / "o"

    def someone_writes_there(staging: Path, target: Path) -> None:
        output.mkdir()
        (output / "notes.txt").write_text("mine")

    monkeypatch.setattr(output_folder, "before_publish", someone_writes_there)
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", output, "--overwrite")
    assert code == 2 and err.count("\n") == 1, err
    assert "changed while this command ran; nothing was replaced" in err and "notes.txt" in err, err
    assert (output / "notes.txt").read_text() == "mine" and sorted(p.name for p in output.iterdir()) == ["notes.txt"]
    kept = tmp_path / "o.new-1"
    assert f"kept in {kept}" in err and (kept / "model.safetensors").is_file()  # the finished work is not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "o.new-1"]  # no staging folder, no lock file


def test_a_second_writer_of_the_same_output_is_refused_naming_the_first(model_folder, tmp_path, capsys,
                                                                       monkeypatch):
    output, seen = tmp_path / "o", {}

    def second_export_meanwhile(staging: Path, target: Path) -> None:
        second = subprocess.run([sys.executable, "-m", "odegpt", "export", "--model", str(model_folder), "--output",
                                 str(output), "--step-size", "2", "--overwrite"], capture_output=True, text=True,
                                cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        seen.update(code=second.returncode, err=second.stderr)

    monkeypatch.setattr(output_folder, "before_publish", second_export_meanwhile)
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", output)
    assert code == 0, err
    assert seen["code"] == 2 and seen["err"].count("\n") == 1, seen
    assert "is being written by another process" in seen["err"] and f"pid {os.getpid()}" in seen["err"], seen
    assert json.loads((output / "config.json").read_text())["step_size"] == 1.0  # the first writer's export


@pytest.mark.parametrize("kind", ["run", "corpus", "tokenizer", "notes"])
def test_overwrite_replaces_an_earlier_model_folder_and_nothing_else(model_folder, tmp_path, capsys, kind):
    output = tmp_path / "v"
    output.mkdir()
    files = {"run": {"config.json": json.dumps({"model": {}, "train": {}, "data": {}, "run": {}}),
                     "checkpoints/step_00000001/COMPLETE": "x"},
             "corpus": {"manifest.json": "{}", "train-00000.bin": "tokens"},
             "tokenizer": {"tokenizer.json": "{}", "odegpt_tokenizer.json": "{}"},
             "notes": {"notes.txt": "mine"}}[kind]
    for name, text in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(text)
    before = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", output, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "is never replaced" in err, err
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == before

    earlier = tmp_path / "earlier"
    assert _odegpt(capsys, "export", "--model", model_folder, "--output", earlier)[0] == 0
    assert folder_kind(earlier).kind == MODEL
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", earlier, "--step-size", "2",
                        "--overwrite")
    assert code == 0, err
    assert json.loads((earlier / "config.json").read_text())["step_size"] == 2.0


def test_folder_kinds_name_what_they_found(tmp_path):
    def folder(name: str, **files: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file, text in files.items():
            (path / file.replace("__", ".")).write_text(text)
        return path

    model = folder("model", config__json=json.dumps({"model_type": "odegpt"}), model__safetensors="")
    assert folder_kind(model).kind == MODEL
    assert folder_kind(folder("gguf", odegpt__gguf="")).kind == MODEL
    assert folder_kind(folder("corpus", manifest__json="{}")).kind == CORPUS
    assert folder_kind(folder("tok", tokenizer__json="{}", tokenizer_config__json="{}")).kind == TOKENIZER
    assert folder_kind(folder("run", metrics__jsonl="")).kind == RUN
    mixed = folder("mixed", config__json=json.dumps({"model_type": "llama"}), notes__txt="")
    assert folder_kind(mixed).kind == UNKNOWN and "notes.txt" in folder_kind(mixed).evidence
    shards = folder("shards", **{"train-00000__bin": "", "train-00000__idx": ""})
    assert folder_kind(shards).kind == UNKNOWN and "train-00000.bin" in folder_kind(shards).evidence


def test_sigterm_during_an_export_leaves_no_staged_folder(model_folder, tmp_path):
    output, ready = tmp_path / "o", tmp_path / "ready"
    script = (f"import sys, time\nfrom pathlib import Path\nfrom odegpt.folders import output_folder\n"
              f"def wait(staging, target):\n    Path({str(ready)!r}).write_text(str(staging))\n    time.sleep(300)\n"
              f"output_folder.before_publish = wait\nfrom odegpt.commands.cli import main\n"
              f"sys.exit(main(['export', '--model', {str(model_folder)!r}, '--output', {str(output)!r}]))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    staging = Path(ready.read_text())
    assert (staging / "model.safetensors").is_file()  # the work was done, not yet renamed into place
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]  # no output, no staging, no lock


def test_the_next_claim_removes_a_killed_writers_staging_and_restores_a_folder_set_aside(model_folder, tmp_path,
                                                                                      capsys):
    output = tmp_path / "o"
    (tmp_path / ".o.abc123.partial").mkdir()  # killed while writing
    (tmp_path / ".o.abc123.partial" / "model.safetensors").write_text("half")
    assert _odegpt(capsys, "export", "--model", model_folder, "--output", output)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    shutil.move(output, tmp_path / ".o.def456.old")  # killed after setting the old folder aside, before the rename
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", output, "--step-size", "2")
    assert code == 2 and "exists and is not empty" in err, err  # the restored folder is there again ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert json.loads((output / "config.json").read_text())["step_size"] == 1.0  # ... as it was
