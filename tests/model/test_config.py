import pytest

from tests.conftest import tiny_config


@pytest.mark.parametrize("overrides, field", [
    (dict(segments=[]), "segments"),
    (dict(segments=[{"depth": 0, "shared": True}]), "depth"),
    (dict(segments=[{"depth": 2, "shared": "yes"}]), "shared"),
    (dict(segments=[{"depth": 2, "share": True}]), "segments[0]"),
    (dict(step_size=0), "step_size"),
    (dict(step_size=-1.5), "step_size"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(solver="rk4"), "solver"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(**overrides)


def test_num_hidden_layers_is_the_trained_depth():
    config = tiny_config([{"depth": 1, "shared": False}, {"depth": 5, "shared": True}])
    assert config.num_hidden_layers == 6


def test_config_round_trips_through_json(tmp_path):
    from odegpt import OdeGPTConfig

    config = tiny_config([{"depth": 2, "shared": False}, {"depth": 3, "shared": True}], step_size=2.5)
    config.save_pretrained(tmp_path)
    loaded = OdeGPTConfig.from_pretrained(tmp_path)
    assert loaded.segments == config.segments
    assert loaded.step_size == 2.5
    assert loaded.num_key_value_heads == 2
