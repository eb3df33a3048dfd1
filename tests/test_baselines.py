"""Behaviour-cloning baselines (the act-* and diffusion-* presets) train on Meta-World demos,
evaluate without prompts on the same episodes as the in-context policy, and compare.py
tabulates them."""

import json

import pytest
from test_train import tiny_args

from icrt.config import CollectConfig, EvalConfig, parse_config
from icrt.data.collect import collect
from icrt.errors import UserError
from icrt.eval.compare import format_methods, load_methods
from icrt.eval.rollout import evaluate
from icrt.train.loop import train

pytestmark = pytest.mark.sim

TASKS = ("reach-v3", "button-press-topdown-v3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    collect(CollectConfig(tasks=TASKS, episodes_per_task=3, prompt_episodes_per_task=1,
                          out=str(root / "mw.zarr"), workers=1, train_split=0.67),
            progress=False)
    out = {}
    for name in ("icrt-mini", "act-mini", "diffusion-mini"):
        # the preset, then the tiny test recipe (backbone, chunk length) on top
        args = ["--preset", name, *tiny_args(root / "mw.json", root / name,
                                             "--trainer-cfg.epochs", "1",
                                             "--shared-cfg.seq-length", "64")]
        out[name] = train(parse_config(args), progress=False)
    return root, out


def _eval(root, run, out, **kw):
    cfg = EvalConfig(checkpoint=str(run), episodes_per_task=2, workers=1, max_steps=12,
                     out=str(out), **kw)
    return evaluate(cfg, progress=False)


def test_baselines_evaluate_without_prompts_and_compare(runs, tmp_path):
    root, paths = runs
    for name in ("act-mini", "diffusion-mini"):
        config = json.loads((paths[name] / "config.json").read_text())
        assert config["preset"] == name and config["shared_cfg"]["prompt"] is False
        with pytest.raises(UserError, match="--no-prompt"):
            _eval(root, paths[name], tmp_path / "x.json",
                  prompt_dataset=str(root / "mw_prompts.json"))
    _eval(root, paths["icrt-mini"], tmp_path / "icl.json", no_prompt=True)
    _eval(root, paths["act-mini"], tmp_path / "act.json", no_prompt=True)
    _eval(root, paths["diffusion-mini"], tmp_path / "dp.json", no_prompt=True,
          execution="open_loop", open_loop_steps=2)
    methods = load_methods([f"in-context={tmp_path}/icl.json",
                            f"ACT-style={tmp_path}/act.json",
                            f"diffusion-style={tmp_path}/dp.json"])
    table = format_methods(methods, "MW")
    assert table.count("\n| ") == 3 + len(TASKS)  # header, rule, tasks, mean
    assert "| in-context | ACT-style | diffusion-style |" in table
    # other episodes are not comparable
    _eval(root, paths["act-mini"], tmp_path / "other.json", no_prompt=True, seed=1)
    with pytest.raises(UserError, match="different episodes"):
        load_methods([f"a={tmp_path}/act.json", f"b={tmp_path}/other.json"])
    with pytest.raises(UserError, match="LABEL=RESULTS.json"):
        load_methods([str(tmp_path / "act.json")])
