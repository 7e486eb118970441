"""benchmarks/adaptive_headroom.py's exit to the tail: which steps are cut, and the cut solve's read-outs."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FULLY_SHARED, PARTIALLY_SHARED, TEXT, tiny_config, tiny_model

HEADROOM = Path(__file__).resolve().parents[2] / "benchmarks" / "adaptive_headroom.py"


@pytest.fixture(scope="module")
def headroom():
    spec = importlib.util.spec_from_file_location("adaptive_headroom_benchmark", HEADROOM)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def batches(count=2, length=17):
    ids = torch.tensor([ord(c) % 97 for c in TEXT])
    return [ids[i * length:(i + 1) * length][None] for i in range(count)]


def test_the_tail_is_the_unshared_steps_after_the_last_shared_segment(headroom):
    segment, tail = headroom.tail_segment(tiny_config(PARTIALLY_SHARED))  # 1u, 3s, 2s, 1u
    assert (segment, tail) == (range(4, 6), range(6, 7))
    assert headroom.tail_segment(tiny_config(FULLY_SHARED)) is None
    assert headroom.tail_segment(tiny_config([{"depth": 1, "shared": False}, {"depth": 3, "shared": True}])) is None


def test_the_segment_cut_after_all_its_steps_is_the_full_solve(headroom):
    model = tiny_model(PARTIALLY_SHARED)
    quantities = headroom._tail_quantities(model, batches(), range(4, 6), range(6, 7))
    full = torch.cat([F.cross_entropy(model(b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten(), reduction="none")
                      for b in batches()])
    torch.testing.assert_close(quantities["nll"][:, -1], full, rtol=0, atol=1e-4)
    torch.testing.assert_close(quantities["truncated_nll"][:, -1], full, rtol=0, atol=1e-4)
    assert quantities["kl"][:, -1].abs().max() < 1e-5 and quantities["kl"][:, 0].min() > 0


def test_a_segment_whose_block_adds_nothing_loses_nothing_when_cut(headroom):
    model = tiny_model(PARTIALLY_SHARED)
    with torch.no_grad():  # the last shared block's residual branches write zero: its steps are the identity
        model.model.blocks[2].self_attn.o_proj.weight.zero_()
        model.model.blocks[2].mlp.down_proj.weight.zero_()
    report = headroom.tail_headroom(model, model.config, batches(), batches(3)[2:])
    row = report["rows"][0]  # the segment cut after 1 of its 2 steps: 6 steps executed of 7
    assert row["mean_steps"] == 6
    assert row["tail_cut"] == pytest.approx(report["full"], rel=1e-5)
    assert row["truncated"] != pytest.approx(report["full"], rel=1e-3)  # reading out mid-solve skips the tail
