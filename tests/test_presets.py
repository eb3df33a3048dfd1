"""Model presets: each expands to the flags docs/training.md lists, flags override them, -h
lists them, and the choice is recorded in the run's config."""

from pathlib import Path

import pytest

from icrt.config import ExperimentConfig, load_config, parse_config, save_config
from icrt.errors import UserError
from icrt.presets import PRESETS, presets_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_docs_list_every_preset_with_its_flags():
    assert presets_markdown() in DOCS.read_text()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_expands_to_its_flags(name):
    cfg = parse_config(["--preset", name])
    by_flags = parse_config(list(PRESETS[name].flags))
    assert cfg == ExperimentConfig(**{**by_flags.__dict__, "preset": name})
    assert cfg != ExperimentConfig()


def test_documented_values_of_the_baselines():
    act = parse_config(["--preset", "act-mini"])
    assert not act.shared_cfg.prompt and act.shared_cfg.sliding_window == 1
    assert act.shared_cfg.num_pred_steps == 20
    assert act.model_cfg.policy_cfg.decoder_pred_head == "cvae"
    assert act.model_cfg.policy_cfg.cvae_kl_weight == 10.0
    assert act.model_cfg.policy_cfg.scratch_llama_config == "config/model_config/mini.json"
    dp = parse_config(["--preset", "diffusion-small"])
    assert not dp.shared_cfg.prompt and dp.shared_cfg.sliding_window == 2
    assert dp.model_cfg.policy_cfg.decoder_pred_head == "diffusion"
    assert dp.model_cfg.policy_cfg.num_inference_diffusion_steps == 10
    assert dp.model_cfg.policy_cfg.scratch_llama_config == "config/model_config/small.json"


def test_flags_override_a_preset_one_by_one(tmp_path):
    cfg = parse_config(["--shared-cfg.num-pred-steps", "50", "--preset", "act-mini",
                        "--model-cfg.policy-cfg.cvae-kl-weight", "0"])
    assert cfg.shared_cfg.num_pred_steps == 50  # a flag wins wherever it stands
    assert cfg.model_cfg.policy_cfg.cvae_kl_weight == 0.0
    assert cfg.shared_cfg.sliding_window == 1  # the rest of the preset stays
    save_config(cfg, tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg and again.preset == "act-mini"
    # a preset on top of a saved config, then flags on top of both
    other = parse_config(["--load-config", str(tmp_path / "config.json"), "--preset",
                          "icrt-mini", "--shared-cfg.seq-length", "64"])
    assert other.model_cfg.policy_cfg.decoder_pred_head == "mlp"
    assert other.shared_cfg.prompt and other.shared_cfg.sliding_window is None
    assert other.shared_cfg.seq_length == 64


def test_help_lists_presets_and_unknown_names_are_one_sentence(capsys):
    with pytest.raises(SystemExit):
        parse_config(["-h"])
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    with pytest.raises(UserError, match="did you mean 'act-mini'"):
        parse_config(["--preset", "act-min"])
