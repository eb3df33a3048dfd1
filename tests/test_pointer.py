"""The object pointer (--model-cfg.policy-cfg.object-slots): the head reads the current step's
objects through attention, identically in training, teacher forcing and cached acting."""

import numpy as np
import pytest
import torch
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.spec import write_dataset_json
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import BatchedInContextPolicy, InContextPolicy
from icrt.models.pointer import ObjectPointer
from icrt.train.checkpoint import load_policy
from icrt.train.loop import train

NUM_OBJECTS = 3


def fetch_episode(target: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A point robot moves to object ``target`` among three at random places; the task (which
    object) is only in the prompt."""
    objects = rng.uniform(-1, 1, size=(NUM_OBJECTS, 2))
    pos = np.zeros(2)
    robots, objs, actions = [], [], []
    for _ in range(30):
        action = np.clip((objects[target] - pos) * 4.0, -1.0, 1.0)
        robots.append(pos.copy())
        objs.append(objects.reshape(-1).copy())
        actions.append(action)
        pos = pos + 0.1 * action
    return {"robot": np.asarray(robots, np.float32), "objects": np.asarray(objs, np.float32),
            "action": np.asarray(actions, np.float32)}


@pytest.fixture(scope="module")
def fetch(tmp_path_factory):
    root = tmp_path_factory.mktemp("pointer")
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(root / "fetch.zarr", env={"name": "synthetic"}, fps=10)
    for target in range(NUM_OBJECTS):
        for _ in range(4):
            store.add_episode(fetch_episode(target, rng), task=f"fetch{target}", success=True)
    store.close()
    data = root / "fetch.json"
    write_dataset_json(data, stores=[root / "fetch.zarr"], proprio_keys=["robot", "objects"],
                       action_keys=["action"], train_split=1.0)
    run = train(parse_config(tiny_args(data, root / "run", "--trainer-cfg.epochs", "1",
                                       "--model-cfg.policy-cfg.object-slots", NUM_OBJECTS)),
                progress=False)
    return root, data, run


def test_pointer_is_built_from_the_last_low_dim_key(fetch):
    _, _, run = fetch
    model, _ = load_policy(run)
    assert isinstance(model.pointer, ObjectPointer)
    assert (model.pointer.num_slots, model.pointer.slot_dim, model.pointer.robot_dim) == (3, 2, 2)
    h = torch.randn(5, model.d_model)
    proprio = torch.randn(5, 8)
    w = model.pointer.weights(h, proprio)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    out = model.head_input(h, {"proprio": proprio})
    moved = proprio.clone()
    moved[:, 2:4] += 1.0  # the first object moves: what the head reads changes
    assert not torch.allclose(model.head_input(h, {"proprio": moved}), out)
    torch.testing.assert_close(model.head_input(h, {"proprio": proprio}), out)


def assert_acting_is_teacher_forcing(run, demo, query, n: int = 12) -> InContextPolicy:
    """Cached acting with the recorded actions fed back equals one teacher-forced forward."""
    policy = InContextPolicy.from_checkpoint(run, execution="open_loop", open_loop_steps=1)
    policy.prompt([demo])
    policy.reset()
    forced, _ = policy.teacher_forced([demo], query, n)
    acted = []
    for t in range(n):
        policy.act({"robot": query["robot"][t], "objects": query["objects"][t]})
        acted.append(policy._pending_action)
        policy.executed(query["action"][t])
    acted = policy.codec.encode_actions(np.asarray(acted))
    np.testing.assert_allclose(acted, forced, atol=1e-4)
    return policy


def test_acting_reads_the_pointer_as_training_does(fetch):
    """Cached acting with the recorded actions fed back equals one teacher-forced forward
    (the training computation, pointer included), step by step."""
    root, _, run = fetch
    store = EpisodeStore.open(root / "fetch.zarr")
    demo, query = store.episode(0), store.episode(1)
    policy = assert_acting_is_teacher_forcing(run, demo, query)
    # the batched policy reads each row's own objects
    batched = BatchedInContextPolicy.from_checkpoint(run, rows=2, execution="open_loop",
                                                     open_loop_steps=1)
    for row in range(2):
        batched.prompt(row, [demo])
        batched.reset(row)
    obs = {"robot": query["robot"][0], "objects": query["objects"][0]}
    other = dict(obs, objects=query["objects"][0][::-1].copy())
    a, b = batched.act([obs, other])
    policy.reset()
    np.testing.assert_allclose(a, policy.act(obs), atol=1e-4)
    assert not np.allclose(a, b)


def test_object_slots_that_do_not_split_are_one_sentence(fetch, tmp_path):
    _, data, _ = fetch
    with pytest.raises(UserError, match="do not split into 4 equal objects"):
        train(parse_config(tiny_args(data, tmp_path, "--model-cfg.policy-cfg.object-slots", 4)),
              progress=False)
    with pytest.raises((UserError, ValueError, SystemExit)):
        parse_config(tiny_args(data, tmp_path, "--model-cfg.policy-cfg.object-slots", -1))


def test_moved_object_labels_and_pointer_loss(fetch, tmp_path):
    """Each trajectory is labelled with the object it moves; the pointer loss trains the
    pointer to look at it, and needs those labels."""
    root, _, _ = fetch
    rng = np.random.default_rng(1)
    store = EpisodeStore.create(root / "carry.zarr", env={"name": "synthetic"}, fps=10)
    targets = []
    for target in (2, 0, 1, 2, 1, 0) * 2:
        ep = fetch_episode(target, rng)
        # the robot carries its target from step 10 on: that object's position moves
        objs = ep["objects"].reshape(len(ep["objects"]), NUM_OBJECTS, 2)
        objs[10:, target] = ep["robot"][10:]
        ep["objects"] = objs.reshape(len(objs), -1)
        store.add_episode(ep, task=f"fetch{target}", success=True)
        targets.append(target)
    store.close()
    data = root / "carry.json"
    write_dataset_json(data, stores=[root / "carry.zarr"], proprio_keys=["robot", "objects"],
                       action_keys=["action"], train_split=1.0)
    args = ("--model-cfg.policy-cfg.object-slots", NUM_OBJECTS,
            "--model-cfg.policy-cfg.pointer-loss-weight", 1.0, "--trainer-cfg.epochs", 3)
    with pytest.raises(SystemExit):  # tyro prints the one sentence and exits
        parse_config(tiny_args(data, tmp_path, *args))
    cfg = parse_config(tiny_args(data, tmp_path, *args,
                                 "--dataset-cfg.moved-object-slots", NUM_OBJECTS))
    from icrt.data.sequence import SequenceDataset
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg)
    assert sorted(targets) == sorted(int(e.task[-1]) for e in ds.episodes)
    assert [int(m) for m in ds._moved] == [int(e.task[-1]) for e in ds.episodes]
    item = ds[0]
    assert item["moved_object"].shape == item["prompt_mask"].shape
    run = train(cfg, progress=False)
    model, _ = load_policy(run)
    batch = {k: v[None] for k, v in ds[0].items()}
    with torch.no_grad():
        out = model(batch)
    assert "pointer_loss" in out and torch.isfinite(out["pointer_loss"])
    # the pointer learnt to look at the carried object (chance: 1/3)
    looked = []
    for i in range(len(ds)):
        b = {k: v[None] for k, v in ds[i].items()}
        with torch.no_grad():
            tokens = model.interleave(model.state_tokens(b), model.action_tokens(b["action"]))
            hidden = model.backbone(tokens)[0, 0::2]
            w = model.pointer.weights(hidden, b["proprio"][0])
        query = ~b["prompt_mask"][0]
        looked.append(w[query, b["moved_object"][0][query]])
    looked = torch.cat(looked)
    assert len(looked) > 100 and looked.mean() > 0.5
    log = (run / "log.txt").read_text()
    assert "train/pointer_loss" in log


def test_goal_loss_predicts_where_the_trajectory_ends(fetch, tmp_path):
    root, data, _ = fetch
    args = ("--model-cfg.policy-cfg.goal-loss-weight", 1.0, "--trainer-cfg.epochs", 3)
    with pytest.raises(SystemExit):  # no labels: one sentence
        parse_config(tiny_args(data, tmp_path, *args))
    cfg = parse_config(tiny_args(data, tmp_path, *args, "--dataset-cfg.goal-dims", 0, 1))
    from icrt.data.sequence import SequenceDataset
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg)
    item = ds[0]
    ends = item["episode_start"].nonzero()[:, 0].tolist() + [len(item["goal"])]
    for a, b in zip(ends[:-1], ends[1:], strict=True):
        assert (item["goal"][a:b] == item["goal"][a]).all()  # one goal per trajectory
    run = train(cfg, progress=False)
    model, _ = load_policy(run)
    assert model.spec.goal_dims == (0, 1)
    with torch.no_grad():
        out = model({k: v[None] for k, v in item.items()})
    assert torch.isfinite(out["goal_loss"])
    assert "train/goal_loss" in (run / "log.txt").read_text()
    with pytest.raises(UserError, match="low-dim vector has 8 values"):
        SequenceDataset(parse_config(tiny_args(data, tmp_path, *args, "--dataset-cfg.goal-dims",
                                               9)).dataset_cfg, cfg.shared_cfg)


def test_goal_conditioned_head(fetch, tmp_path):
    """The head reads the step to the goal: the recorded end in training, the goal head's
    prediction when acting; it starts at zero, so a goal-loss checkpoint loads unchanged."""
    root, data, _ = fetch
    goal = ("--model-cfg.policy-cfg.goal-loss-weight", 1.0, "--dataset-cfg.goal-dims", 0, 1,
            "--model-cfg.policy-cfg.object-slots", NUM_OBJECTS, "--trainer-cfg.epochs", 1)
    with pytest.raises(SystemExit):  # no goal head to read when acting: one sentence
        parse_config(tiny_args(data, tmp_path, "--model-cfg.policy-cfg.goal-conditioned"))
    base = train(parse_config(tiny_args(data, tmp_path / "base", *goal)), progress=False)
    cfg = parse_config(tiny_args(data, tmp_path / "cond", *goal,
                                 "--model-cfg.policy-cfg.goal-conditioned",
                                 "--model-cfg.policy-cfg.pretrained-path", str(base)))
    from icrt.models.policy import ICRTPolicy
    from icrt.train.checkpoint import load_checkpoint_weights, read_checkpoint

    old, _ = load_policy(base)
    fresh = ICRTPolicy(cfg.model_cfg, old.spec)
    load_checkpoint_weights(fresh, read_checkpoint(base))
    h = torch.randn(2, 5, old.d_model)
    obs = {"proprio": torch.randn(2, 5, old.spec.proprio_dim)}
    with torch.no_grad():
        torch.testing.assert_close(fresh.head_input(h, obs), old.head_input(h, obs))
    run = train(cfg, progress=False)
    model, _ = load_policy(run)
    assert model.goal_in.weight.abs().sum() > 0
    with torch.no_grad():  # the goal it is given changes what the head reads
        near = model.head_input(h, obs, goal=obs["proprio"][..., :2])
        assert not torch.allclose(near, model.head_input(h, obs, goal=obs["proprio"][..., :2] + 5))
    store = EpisodeStore.open(root / "fetch.zarr")
    assert_acting_is_teacher_forcing(run, store.episode(0), store.episode(1))


def test_factored_head_reads_the_backbone_only_through_the_pointer(fetch, tmp_path):
    root, data, _ = fetch
    with pytest.raises(SystemExit):  # nothing to read without the pointer: one sentence
        parse_config(tiny_args(data, tmp_path, "--model-cfg.policy-cfg.factored-head"))
    run = train(parse_config(tiny_args(
        data, tmp_path / "run", "--model-cfg.policy-cfg.object-slots", NUM_OBJECTS,
        "--model-cfg.policy-cfg.factored-head", "--trainer-cfg.epochs", 1)), progress=False)
    model, _ = load_policy(run)
    assert not model.pointer.residual
    obs = {"proprio": torch.randn(2, 5, model.spec.proprio_dim)}
    h, other = torch.randn(2, 2, 5, model.d_model)
    with torch.no_grad():
        assert not torch.allclose(model.head_input(h, obs), model.head_input(other, obs))
        model.pointer.q.weight.zero_()  # attention no longer depends on the feature ...
        torch.testing.assert_close(model.head_input(h, obs), model.head_input(other, obs))
    store = EpisodeStore.open(root / "fetch.zarr")  # ... which reaches the head no other way
    assert_acting_is_teacher_forcing(run, store.episode(0), store.episode(1))
