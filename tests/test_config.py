"""config.json -> BlueLMConfig: required shape fields are named when absent; documented defaults hold."""

import json

import pytest

from bluelm_jax.config import REQUIRED_FIELDS, BlueLMConfig, ConfigError, preset


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_shape_field_is_named(tmp_path, field):
    raw = preset("tiny").to_hf_dict()
    del raw[field]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        BlueLMConfig.from_json_file(path)
    assert str(e.value) == f"{path}: required field(s) missing: {field}"


def test_null_shape_fields_are_all_named(tmp_path):
    raw = preset("tiny").to_hf_dict()
    raw["vocab_size"] = None
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="required field\\(s\\) missing: hidden_size, vocab_size$"):
        BlueLMConfig.from_json_file(_write(tmp_path, raw))


def test_documented_defaults_still_apply(tmp_path):
    tiny = preset("tiny")
    raw = {name: getattr(tiny, name) for name in REQUIRED_FIELDS}  # nothing else
    config = BlueLMConfig.from_json_file(_write(tmp_path, raw))
    assert config == tiny.replace(num_key_value_heads=tiny.num_attention_heads)
    assert (config.rms_norm_eps, config.rope_theta, config.max_position_embeddings) == (1e-6, 10000.0, 2048)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert config.use_stable_embedding and config.rope_scaling is None
