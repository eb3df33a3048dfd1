"""Config: ICRT's documented command lines parse; save/load round trip; errors name the flag."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest

from icrt.config import (
    CollectConfig,
    ExperimentConfig,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)
from icrt.errors import UserError

# The training commands of ICRT's guide, verbatim except for the placeholder paths.
ICRT_COMMANDS = [
    "python scripts/train.py --dataset-cfg.dataset-json /path/to/dataset_config.json --logging-cfg.output-dir /path/to/output_dir --logging-cfg.log-name log_name --optimizer-cfg.warmup-epochs 1.25 --trainer-cfg.epochs 125 --model-cfg.vision-encoder-cfg.vision-encoder /path/to/vision/encoder.pth --model-cfg.policy-cfg.scratch-llama-config config/model_config/custom_transformer.json --dataset-cfg.non-overlapping 32 --trainer-cfg.accum-iter 32 --shared-cfg.batch-size 2",  # noqa: E501
    "torchrun --nproc_per_node=8 --master_port=2450 scripts/train.py --dataset-cfg.dataset-json /path/to/dataset_config.json --logging-cfg.output-dir /path/to/output_dir --logging-cfg.log-name log_name --optimizer-cfg.warmup-epochs 1.25 --trainer-cfg.epochs 125 --model-cfg.vision-encoder-cfg.vision-encoder /path/to/vision/encoder.pth --model-cfg.policy-cfg.scratch-llama-config config/model_config/custom_transformer.json --dataset-cfg.non-overlapping 32 --trainer-cfg.accum-iter 4 --shared-cfg.batch-size 2",  # noqa: E501
    "torchrun --nproc_per_node=8 --master_port=2450 scripts/train.py --dataset-cfg.dataset-json config/droid_10k_dataset_config.json --logging-cfg.output-dir /path/to/output_dir --logging-cfg.log-name pretrain_droid --optimizer-cfg.warmup-epochs 0.5 --trainer-cfg.epochs 4 --model-cfg.vision-encoder-cfg.vision-encoder /path/to/vision/encoder.pth --dataset-cfg.non-overlapping 50 --optimizer-cfg.lr 1e-3 --model-cfg.policy-cfg.phase pretrain --shared-cfg.save-every 1 --model-cfg.policy-cfg.scratch-llama-config config/model_config/custom_transformer.json",  # noqa: E501
    "torchrun --nproc_per_node=8 --master_port=2450 scripts/train.py --dataset-cfg.dataset-json config/dataset_config.json --logging-cfg.output-dir /path/to/output_dir --logging-cfg.log-name finetune_icrt_mt --optimizer-cfg.warmup-epochs 1.25 --trainer-cfg.epochs 125 --model-cfg.vision-encoder-cfg.vision-encoder /path/to/vision/encoder.pth --dataset-cfg.num-repeat-traj 2 --model-cfg.policy-cfg.no-prompt-loss --model-cfg.policy-cfg.phase pretrain --model-cfg.policy-cfg.scratch-llama-config config/model_config/custom_transformer.json --dataset-cfg.non-overlapping 32 --shared-cfg.save-every 5 --dataset-cfg.shuffle-repeat-traj --optimizer-cfg.lr 5e-4 --model-cfg.policy-cfg.pretrained-path /path/to/output_dir/pretrain_droid/checkpoint-3.pth",  # noqa: E501
    "torchrun --nproc_per_node=8 --master_port=2450 scripts/train.py --dataset-cfg.dataset-json config/dataset_config.json --logging-cfg.output-dir /path/to/output_dir --logging-cfg.log-name finetune_icrt_llama2_7b --optimizer-cfg.warmup-epochs 1.25 --trainer-cfg.epochs 125 --model-cfg.vision-encoder-cfg.vision-encoder /path/to/vision/encoder.pth --dataset-cfg.num-repeat-traj 2 --model-cfg.policy-cfg.no-prompt-loss --model-cfg.policy-cfg.phase finetune --dataset-cfg.non-overlapping 32 --shared-cfg.save-every 5 --dataset-cfg.rebalance-tasks --dataset-cfg.shuffle-repeat-traj --optimizer-cfg.lr 5e-4 --model-cfg.policy-cfg.lora-rank 32 --model-cfg.policy-cfg.llama-ckpt-dir /path/to/llama-2/llama-2-7b",  # noqa: E501
]


def icrt_args(command: str, substitutions: dict[str, str]) -> list[str]:
    """The flags of a documented command with its placeholder paths replaced."""
    for old, new in substitutions.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    return argv[argv.index("scripts/train.py") + 1 :]


@pytest.fixture
def real_paths(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / "encoder.pth").write_bytes(b"")
    (tmp_path / "llama").mkdir()
    return {
        "/path/to/dataset_config.json": str(tmp_path / "dataset.json"),
        "config/droid_10k_dataset_config.json": str(tmp_path / "dataset.json"),
        "config/dataset_config.json": str(tmp_path / "dataset.json"),
        "/path/to/vision/encoder.pth": str(tmp_path / "encoder.pth"),
        "/path/to/output_dir": str(tmp_path / "out"),
        "/path/to/llama-2/llama-2-7b": str(tmp_path / "llama"),
    }


@pytest.mark.parametrize("index", range(len(ICRT_COMMANDS)))
def test_icrt_command_lines_parse(index, real_paths):
    cfg = parse_config(icrt_args(ICRT_COMMANDS[index], real_paths))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.dataset_cfg.dataset_json == real_paths["/path/to/dataset_config.json"]
    assert cfg.model_cfg.vision_encoder_cfg.vision_encoder.endswith("encoder.pth")
    assert cfg.logging_cfg.output_dir.endswith("out")


def test_icrt_flags_keep_their_meaning(real_paths):
    cfg = parse_config(icrt_args(ICRT_COMMANDS[3], real_paths))
    assert cfg.dataset_cfg.num_repeat_traj == 2
    assert cfg.model_cfg.policy_cfg.no_prompt_loss is True
    assert cfg.dataset_cfg.non_overlapping == 32
    assert cfg.shared_cfg.save_every == 5
    assert cfg.dataset_cfg.shuffle_repeat_traj is True
    assert cfg.optimizer_cfg.lr == 5e-4
    assert cfg.optimizer_cfg.warmup_epochs == 1.25
    assert cfg.trainer_cfg.epochs == 125
    assert cfg.model_cfg.policy_cfg.pretrained_path.endswith("checkpoint-3.pth")
    assert cfg.logging_cfg.run_dir.name == "finetune_icrt_mt"
    cfg = parse_config(icrt_args(ICRT_COMMANDS[4], real_paths))
    assert cfg.model_cfg.policy_cfg.phase == "finetune"
    assert cfg.model_cfg.policy_cfg.lora_rank == 32
    # ICRT's LoRA: all seven projections, scale 1 (alpha = rank), biases on wq wo w1 w2 w3
    assert cfg.model_cfg.policy_cfg.lora_targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    assert cfg.model_cfg.policy_cfg.lora_alpha is None
    assert cfg.model_cfg.policy_cfg.lora_bias is True
    assert cfg.dataset_cfg.rebalance_tasks is True
    cfg = parse_config(icrt_args(ICRT_COMMANDS[0], real_paths))
    assert cfg.trainer_cfg.accum_iter == 32 and cfg.shared_cfg.batch_size == 2
    assert cfg.model_cfg.policy_cfg.scratch_llama_config == (
        "config/model_config/custom_transformer.json"
    )


def test_save_load_round_trip(tmp_path):
    cfg = parse_config([
        "--dataset-cfg.task-names", "a", "b",
        "--dataset-cfg.non-overlapping", "True",
        "--optimizer-cfg.lr", "None",
        "--optimizer-cfg.betas", "0.8", "0.9",
        "--model-cfg.policy-cfg.decoder-pred-head", "flow",
        "--model-cfg.policy-cfg.lora-layer-idxs", "0", "3",
        "--shared-cfg.seq-length", "77",
    ])
    path = tmp_path / "config.json"
    save_config(cfg, path)
    text = path.read_text()
    assert '"seq_length": 77' in text  # human-readable JSON
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.dataset_cfg.non_overlapping is True
    assert loaded.optimizer_cfg.lr is None
    assert loaded.model_cfg.policy_cfg.lora_layer_idxs == (0, 3)
    # --load-config starts from the file; later flags override it
    again = parse_config(["--load-config", str(path), "--trainer-cfg.epochs", "3"])
    assert again.shared_cfg.seq_length == 77 and again.trainer_cfg.epochs == 3
    assert again.model_cfg.policy_cfg.decoder_pred_head == "flow"
    assert dataclasses.replace(again, load_config=None, trainer_cfg=cfg.trainer_cfg) == cfg


def test_load_config_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    data = config_to_dict(ExperimentConfig())
    data["shared_cfg"]["colour"] = 1
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"shared_cfg: unknown field\(s\) colour"):
        load_config(bad)
    data = config_to_dict(ExperimentConfig())
    data["model_cfg"]["policy_cfg"]["phase"] = "midtrain"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="phase"):
        load_config(bad)
    data["model_cfg"]["policy_cfg"]["phase"] = "full"
    bad.write_text(json.dumps(data))
    assert load_config(bad).model_cfg.policy_cfg.phase == "full"


def test_lora_flags():
    cfg = parse_config(["--model-cfg.policy-cfg.phase", "full",
                        "--model-cfg.policy-cfg.lora-alpha", "16",
                        "--model-cfg.policy-cfg.no-lora-bias"]).model_cfg.policy_cfg
    assert (cfg.phase, cfg.lora_alpha, cfg.lora_bias) == ("full", 16.0, False)
    with pytest.raises(SystemExit):
        parse_config(["--model-cfg.policy-cfg.phase", "midtrain"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shared-cfg.seq-length", "0"], "--shared-cfg.seq-length must be > 0"),
        (["--dataset-cfg.num-repeat-traj", "0"], "--dataset-cfg.num-repeat-traj must be >= 1"),
        (["--dataset-cfg.dataset-fraction", "1.5"], "--dataset-cfg.dataset-fraction"),
        (["--model-cfg.policy-cfg.num-inference-diffusion-steps", "500"],
         "must not exceed --model-cfg.policy-cfg.num-train-diffusion-steps"),
        (["--optimizer-cfg.lr", "-1"], "--optimizer-cfg.lr must be > 0"),
    ],
)
def test_validation_names_the_flag(flags, message):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from icrt.config import parse_config; "
         "parse_config(sys.argv[1:])", *flags],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split() + result.stderr.split()).replace("│", "")


def test_help_shows_groups():
    result = subprocess.run(
        [sys.executable, "-c", "from icrt.config import parse_config; parse_config(['-h'])"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    for group in ("dataset-cfg", "model-cfg.policy-cfg", "model-cfg.vision-encoder-cfg",
                  "optimizer-cfg", "trainer-cfg", "shared-cfg", "logging-cfg"):
        assert f"{group} options" in result.stdout
    assert "Timesteps per training sequence" in result.stdout


def test_collect_config_validation():
    with pytest.raises(ValueError, match="--out must end in .zarr"):
        CollectConfig(out="data/x")
    with pytest.raises(ValueError, match="--tasks needs at least one"):
        CollectConfig(tasks=())


def test_the_rest_of_icrts_flags_have_their_meaning_or_one_sentence(tmp_path, real_paths,
                                                                     capsys):
    base = ["--dataset-cfg.dataset-json", real_paths["/path/to/dataset_config.json"]]
    cfg = parse_config([*base, "--local_rank=3", "--world-size", "2", "--dist-url", "env://",
                        "--shared-cfg.num-cameras", "2", "--model-cfg.policy-cfg.load-llama",
                        "--model-cfg.policy-cfg.pred-action-only", "--train"])
    assert cfg.local_rank == 3 and cfg.world_size == 2 and cfg.shared_cfg.num_cameras == 2
    refused = {
        "--no-train": "evaluation is scripts/eval.py",
        "--dist-on-itp": "not supported; launch with torchrun",
        "--dist-url tcp://10.0.0.1:23456": "only env:// is supported",
        "--shared-cfg.start-epoch 3": "continues at its checkpoint's epoch",
        "--shared-cfg.num-stages 2": "not implemented",
        "--shared-cfg.split-epoch 2": "not implemented",
        "--shared-cfg.scale-action stats.json": "normalised with the stores' statistics",
        "--model-cfg.policy-cfg.multikv-attn-pool": "not implemented",
        "--model-cfg.policy-cfg.no-pred-action-only": "predicts actions only",
        "--model-cfg.policy-cfg.kl-div-loss": "not implemented",
    }
    for flags, message in refused.items():
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse_config([*base, *flags.split()])
        printed = capsys.readouterr()
        text = " ".join((printed.err + printed.out).replace("│", " ").split())
        assert message in text, (flags, text)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    import torch

    from icrt.train.dist import resolve_device

    def available(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    available(cuda=True, mps=True)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("auto", local_rank=3) == torch.device("cuda:3")
    available(cuda=False, mps=True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    available(cuda=False, mps=False)
    assert resolve_device("auto") == torch.device("cpu")
    for flag, message in (("mps", "MPS is not available"), ("cuda", "no CUDA device")):
        with pytest.raises(UserError, match=message):
            resolve_device(flag)


@pytest.mark.parametrize("flag", ["tpu", "gpu0", "xla", "meta", "cuda:x", ""])
def test_unknown_device_is_one_sentence(flag):
    from icrt.train.dist import resolve_device

    with pytest.raises(UserError) as info:
        resolve_device(flag)
    message = str(info.value)
    assert f"--device '{flag}'" in message and "use auto, cpu, cuda, cuda:N or mps" in message
    assert message.endswith(".") and ". " not in message and "\n" not in message


def test_training_device_help_lists_the_accepted_devices():
    result = subprocess.run(
        [sys.executable, "-c", "from icrt.config import parse_config; parse_config(['-h'])"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"},  # one column
    )
    text = " ".join(result.stdout.replace("│", " ").split())
    assert ("auto (this rank's CUDA GPU if available, else Apple's MPS, else the CPU), cpu, "
            "cuda, cuda:N or mps; anything else is refused") in text
