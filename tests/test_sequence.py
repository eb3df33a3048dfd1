"""In-context sequence dataset: prompt/query windows, masks, chunk targets, ICRT options."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from icrt.config import DatasetConfig, SharedConfig
from icrt.data.sequence import SequenceDataset, collate
from icrt.data.spec import DatasetSpec, write_dataset_json
from icrt.data.store import EpisodeStore
from icrt.data.transforms import (
    Normalizer,
    from_delta_action,
    rotation_from_6d,
    rotation_to_6d,
    to_delta_action,
)
from icrt.errors import UserError

TASKS = ["a", "b", "c"]


def _make_store(path, n_per_task=(6, 4, 5), lengths=(7, 13), image=False, quat=False):
    """Episodes whose values encode (episode, step) so windows can be checked exactly."""
    store = EpisodeStore.create(path)
    rng = np.random.default_rng(0)
    e = 0
    for task, n in zip(TASKS, n_per_task, strict=True):
        for _ in range(n):
            length = int(rng.integers(*lengths))
            t = np.arange(length, dtype=np.float32)
            state = np.stack([np.full(length, e), t, np.full(length, TASKS.index(task))], 1)
            ep = {"state": state.astype(np.float32),
                  "action": np.stack([t, np.full(length, e)], 1).astype(np.float32)}
            if quat:
                ep["pose"] = np.concatenate(
                    [rng.normal(size=(length, 3)), Rotation.random(length, rng).as_quat()], 1
                ).astype(np.float32)
            if image:
                ep["image_cam"] = np.broadcast_to(
                    (t % 256).astype(np.uint8)[:, None, None, None], (length, 4, 4, 3)
                ).copy()
            store.add_episode(ep, task=task, success=True, seed=e)
            e += 1
    if quat:
        store.set_key_meta("pose", rotation={"start": 3, "format": "quat_xyzw"})
    store.close()
    return store


@pytest.fixture
def dataset_json(tmp_path):
    _make_store(tmp_path / "s.zarr", image=True)
    path = tmp_path / "d.json"
    write_dataset_json(path, stores=[tmp_path / "s.zarr"], proprio_keys=["state"],
                       action_keys=["action"], image_keys=["image_cam"], train_split=1.0)
    return path


def _cfgs(path, **kw):
    shared_fields = {f.name for f in dataclasses.fields(SharedConfig)}
    shared = {k: v for k, v in kw.items() if k in shared_fields}
    data = {k: v for k, v in kw.items() if k not in shared_fields}
    data = {"proprio_norm": "none", "action_norm": "none", "proprio_noise": 0.0, **data}
    dcfg = DatasetConfig(dataset_json=str(path), **data)
    scfg = SharedConfig(**{"seq_length": 24, "num_pred_steps": 3, **shared})
    return dcfg, scfg


def _decode(ds, item):
    """(episode id, step) per timestep, read back from the raw state values."""
    state = item["proprio"].numpy()
    return state[:, 0].astype(int), state[:, 1].astype(int)


def test_item_shapes_and_contents(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json))
    assert len(ds) > 0
    item = ds[3]
    T, K = 24, 3
    assert item["proprio"].shape == (T, 3) and item["proprio"].dtype == torch.float32
    assert item["action"].shape == (T, 2)
    assert item["action_chunk"].shape == (T, K, 2)
    assert item["action_mask"].shape == (T, K) and item["action_mask"].dtype == torch.bool
    assert item["prompt_mask"].shape == (T,) and item["weighted_step"].shape == (T,)
    assert item["image_cam"].shape == (T, 4, 4, 3) and item["image_cam"].dtype == torch.uint8
    store = EpisodeStore.open(ds.spec.stores[0])
    lengths = store.episode_lengths
    for idx in range(0, len(ds), 7):
        item = ds[idx]
        ep_ids, steps = _decode(ds, item)
        # the action token is the action at that step; images are that step's frame
        np.testing.assert_array_equal(item["action"][:, 0].numpy(), steps)
        np.testing.assert_array_equal(item["image_cam"][:, 0, 0, 0].numpy(), steps % 256)
        # chunk targets: a_t .. a_{t+K-1}, padded with the last action, masked past the end
        for j in range(T):
            length = lengths[ep_ids[j]]
            for k in range(K):
                assert item["action_chunk"][j, k, 0] == min(steps[j] + k, length - 1)
                assert item["action_chunk"][j, k, 1] == ep_ids[j]
                assert bool(item["action_mask"][j, k]) == (steps[j] + k < length)
        # consecutive steps within an occurrence; a new trajectory starts at step 0
        new = np.flatnonzero(np.diff(steps) != 1) + 1
        assert np.all(steps[new] == 0)
        assert item["episode_start"].numpy().tolist() == (steps == 0).tolist()


def test_prompt_and_query_share_task_and_mask_is_a_trajectory_boundary(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, task_barrier=True))
    store = EpisodeStore.open(ds.spec.stores[0])
    lengths = store.episode_lengths
    saw_query = 0
    for idx in range(len(ds)):
        item = ds[idx]
        tasks = item["task"].numpy()
        assert len(set(tasks.tolist())) == 1, "task barrier violated"
        assert len(set(item["proprio"][:, 2].numpy().tolist())) == 1
        pm = item["prompt_mask"].numpy()
        ep_ids, steps = _decode(ds, item)
        if not pm.all():
            saw_query += 1
            cut = np.flatnonzero(~pm)[0]  # first query step
            assert pm[:cut].all() and not pm[cut:].any()  # prompt strictly before query
            assert steps[cut - 1] == lengths[ep_ids[cut - 1]] - 1  # prompt ends an episode
            assert steps[cut] == 0  # query starts a trajectory
            assert cut - 1 >= 0
    assert saw_query > len(ds) // 2


def test_without_task_barrier_windows_can_cross_tasks(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, task_barrier=False))
    crossing = sum(len(set(ds[i]["task"].tolist())) > 1 for i in range(len(ds)))
    assert crossing > 0
    ds_barrier = SequenceDataset(*_cfgs(dataset_json, task_barrier=True))
    assert len(ds) > len(ds_barrier)


def test_weighted_steps_follow_prompt_cut(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, num_weighted_steps=2))
    for idx in range(0, len(ds), 5):
        item = ds[idx]
        pm, w = item["prompt_mask"].numpy(), item["weighted_step"].numpy()
        assert not (w & pm).any()  # only query steps are weighted
        _, steps = _decode(ds, item)
        assert np.all(steps[w] < 2)  # the first two steps of query trajectories


def test_repeat_and_shuffle_repeat(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, num_repeat_traj=3, shuffle_repeat_traj=False,
                                rebalance_tasks=False))
    plan = ds._plan(0)
    occ = plan.occ_episode
    repeats = [len(list(g)) for _, g in __import__("itertools").groupby(occ.tolist())]
    assert max(repeats) > 1 and max(repeats) <= 3
    # every episode appears once per epoch (as 1..3 consecutive copies)
    assert sorted(set(occ.tolist())) == list(range(len(ds.episodes)))


def test_rebalance_tasks_resamples_to_median(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, rebalance_tasks=True, num_repeat_traj=1))
    plan = ds._plan(1)
    per_task = np.bincount(ds._task_index[plan.occ_episode])
    assert per_task.tolist() == [5, 5, 5]  # median of (6, 4, 5)
    ds2 = SequenceDataset(*_cfgs(dataset_json, rebalance_tasks=False))
    assert np.bincount(ds2._task_index[ds2._plan(1).occ_episode]).tolist() == [6, 4, 5]


def test_non_overlapping_stride(dataset_json):
    full = SequenceDataset(*_cfgs(dataset_json, rebalance_tasks=False))
    k8 = SequenceDataset(*_cfgs(dataset_json, rebalance_tasks=False, non_overlapping=8))
    seq = SequenceDataset(*_cfgs(dataset_json, rebalance_tasks=False, non_overlapping=True))
    assert len(k8) == -(-len(full) // 8)
    assert len(seq) == -(-len(full) // 24)
    starts = k8._plan(0).starts
    assert np.all(np.isin(starts, full._plan(0).starts))


def test_deterministic_per_seed_and_epoch(dataset_json):
    a = SequenceDataset(*_cfgs(dataset_json, proprio_noise=0.01, seed=3))
    b = SequenceDataset(*_cfgs(dataset_json, proprio_noise=0.01, seed=3))
    for i in (0, 5):
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k])
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["proprio"], b[i]["proprio"]) for i in range(5))
    b.set_epoch(1)
    assert torch.equal(a[4]["proprio"], b[4]["proprio"])


def test_dataloader_workers_and_distributed_sampler(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, seed=1))
    ds.set_epoch(2)
    expected = [ds[i]["action_chunk"] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = torch.cat([b["action_chunk"] for b in loader])
    assert torch.equal(got, torch.stack(expected))
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(2)
        seen += list(sampler)
    assert set(seen) == set(range(len(ds)))


def test_split_saved_and_reloaded(dataset_json, tmp_path):
    data = json.loads(dataset_json.read_text())
    data["train_split"] = 0.6
    dataset_json.write_text(json.dumps(data))
    train = SequenceDataset(*_cfgs(dataset_json, seq_length=10), split="train")
    val = SequenceDataset(*_cfgs(dataset_json, seq_length=10), split="val")
    tr = {(e.store, e.index) for e in train.episodes}
    va = {(e.store, e.index) for e in val.episodes}
    assert tr and va and not tr & va
    assert {e.task for e in train.episodes} == set(TASKS)  # every task trains
    train.save_split(tmp_path / "split.json")
    # a different seed would split differently, but the saved split wins
    d, s = _cfgs(dataset_json, seq_length=10, seed=99)
    again = SequenceDataset(d, s, split="train", split_file=tmp_path / "split.json")
    assert {(e.store, e.index) for e in again.episodes} == tr


def test_task_filter_fraction_and_errors(dataset_json, tmp_path):
    ds = SequenceDataset(*_cfgs(dataset_json, task_names=("b",), seq_length=10))
    assert {e.task for e in ds.episodes} == {"b"}
    assert set(ds[0]["task"].tolist()) == {ds.tasks.index("b")}
    half = SequenceDataset(*_cfgs(dataset_json, dataset_fraction=0.5, seq_length=10))
    assert len(half.episodes) == 3 + 2 + 3
    with pytest.raises(UserError, match=r"Task\(s\) zz are not in"):
        SequenceDataset(*_cfgs(dataset_json, task_names=("zz",)))
    with pytest.raises(UserError, match="seq-length 5000 is longer"):
        SequenceDataset(*_cfgs(dataset_json, seq_length=5000))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stores": ["s.zarr"], "proprio_keys": ["nope"],
                               "action_keys": ["action"]}))
    with pytest.raises(UserError, match=r"no key 'nope'"):
        SequenceDataset(*_cfgs(bad))


def test_dataset_json_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        DatasetSpec.load(tmp_path / "missing.json")
    p = tmp_path / "d.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        DatasetSpec.load(p)
    p.write_text(json.dumps({"stores": ["x.zarr"], "proprio_keys": ["s"], "action_keys": ["a"],
                             "colour": 1}))
    with pytest.raises(UserError, match="unknown field.*colour"):
        DatasetSpec.load(p)
    p.write_text(json.dumps({"stores": ["x.zarr"], "proprio_keys": ["s"], "action_keys": ["a"]}))
    with pytest.raises(UserError, match=r"lists store .*x.zarr.*does not exist"):
        DatasetSpec.load(p)
    p.write_text(json.dumps({"stores": ["x.zarr"], "proprio_keys": ["s"]}))
    with pytest.raises(UserError, match="non-empty list 'action_keys'"):
        DatasetSpec.load(p)
    # an ICRT config is converted (tests/test_convert.py); an incomplete one is one sentence
    p.write_text(json.dumps({"dataset_path": ["x.hdf5"], "hdf5_keys": ["k.json"]}))
    with pytest.raises(UserError, match="is not an ICRT dataset JSON: it lacks verb_to_episode"):
        DatasetSpec.load(p)


def test_several_stores_merge(tmp_path):
    _make_store(tmp_path / "one.zarr", n_per_task=(3, 3, 3))
    _make_store(tmp_path / "two.zarr", n_per_task=(2, 2, 2))
    path = tmp_path / "d.json"
    write_dataset_json(path, stores=[tmp_path / "one.zarr", tmp_path / "two.zarr"],
                       proprio_keys=["state"], action_keys=["action"], train_split=1.0)
    ds = SequenceDataset(*_cfgs(path, seq_length=10))
    assert len(ds.episodes) == 15
    assert {e.store for e in ds.episodes} == {0, 1}
    assert ds.tasks == TASKS


def _query_store_fractions(ds, epochs=4):
    counts = np.zeros(2)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        plan = ds._plan(epoch)
        last = np.searchsorted(plan.occ_end, plan.starts + ds.seq_length - 1, side="right")
        stores = np.array([e.store for e in ds.episodes])[plan.occ_episode[last]]
        counts += np.bincount(stores, minlength=2)
    return counts / counts.sum(), int(counts.sum())


def test_store_weights_set_where_query_sequences_come_from(tmp_path):
    _make_store(tmp_path / "big.zarr", n_per_task=(12, 12, 12))
    _make_store(tmp_path / "small.zarr", n_per_task=(2, 2, 2))
    plain = tmp_path / "plain.json"
    write_dataset_json(plain, stores=[tmp_path / "big.zarr", tmp_path / "small.zarr"],
                       proprio_keys=["state"], action_keys=["action"], train_split=1.0)
    frac, _ = _query_store_fractions(SequenceDataset(*_cfgs(plain, seq_length=10)))
    assert frac[1] < 0.3  # without weights, by size
    for w_small in (0.5, 0.8):
        mixed = tmp_path / f"mix{w_small}.json"
        body = json.loads(plain.read_text())
        body["stores"] = [{"path": body["stores"][0], "weight": 1.0 - w_small},
                          {"path": body["stores"][1], "weight": w_small}]
        mixed.write_text(json.dumps(body))
        ds = SequenceDataset(*_cfgs(mixed, seq_length=10))
        frac, n = _query_store_fractions(ds)
        sigma = np.sqrt(w_small * (1 - w_small) / n)
        assert abs(frac[1] - w_small) < 4 * sigma, (frac, n)
        item = ds[0]  # windows of the mixture are ordinary windows
        assert item["proprio"].shape == (10, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(plain.read_text()),
                               "stores": [{"path": "big.zarr", "weight": 1}, "small.zarr"]}))
    with pytest.raises(UserError, match="give every store a weight, or none"):
        DatasetSpec.load(bad)
    bad.write_text(json.dumps({**json.loads(plain.read_text()),
                               "stores": [{"path": "big.zarr", "weight": -1}]}))
    with pytest.raises(UserError, match="a store entry must be a path or"):
        DatasetSpec.load(bad)


def test_normalisation_uses_store_stats(dataset_json):
    d, s = _cfgs(dataset_json)
    ds = SequenceDataset(dataclasses.replace(d, proprio_norm="mean_std", action_norm="min_max"), s)
    actions = torch.cat([ds[i]["action_chunk"].reshape(-1, 2) for i in range(len(ds))])
    assert actions.min() >= -1.0 - 1e-5 and actions.max() <= 1.0 + 1e-5
    store = EpisodeStore.open(ds.spec.stores[0])
    np.testing.assert_allclose(ds.normalizer.stats["proprio"]["mean"], store.stats("state")["mean"])
    restored = Normalizer.from_dict(json.loads(ds.normalizer.to_json()))
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_allclose(restored.unnormalize("action", restored.normalize("action", x)), x,
                               rtol=1e-5, atol=1e-5)


def test_rot6d_on_declared_rotation(tmp_path):
    _make_store(tmp_path / "s.zarr", quat=True)
    path = tmp_path / "d.json"
    write_dataset_json(path, stores=[tmp_path / "s.zarr"], proprio_keys=["pose"],
                       action_keys=["action"], train_split=1.0)
    ds = SequenceDataset(*_cfgs(path, rot_6d=True))
    assert ds.proprio_dim == 3 + 6
    ds_q = SequenceDataset(*_cfgs(path, rot_6d=False))
    assert ds_q.proprio_dim == 7
    item, item_q = ds[0], ds_q[0]
    mat = Rotation.from_quat(item_q["proprio"][:, 3:].numpy()).as_matrix()
    np.testing.assert_allclose(item["proprio"][:, 3:].numpy(), mat[:, :2].reshape(-1, 6),
                               atol=1e-5)


@pytest.mark.parametrize("fmt", ["quat_xyzw", "quat_wxyz", "euler_xyz", "axis_angle"])
def test_rotation_round_trip(fmt):
    rng = np.random.default_rng(0)
    rot = Rotation.random(16, rng)
    r = {"quat_xyzw": rot.as_quat(), "quat_wxyz": rot.as_quat()[:, [3, 0, 1, 2]],
         "euler_xyz": rot.as_euler("xyz"), "axis_angle": rot.as_rotvec()}[fmt]
    x = np.concatenate([rng.normal(size=(16, 2)), r, rng.normal(size=(16, 1))], 1)
    spec = {"start": 2, "format": fmt}
    r6 = rotation_to_6d(x, spec)
    assert r6.shape == (16, 2 + 6 + 1)
    back = rotation_from_6d(r6, spec)
    got = Rotation.from_matrix(Rotation.from_matrix(
        __import__("icrt.data.transforms", fromlist=["x"]).rot6d_to_matrix(r6[:, 2:8])
    ).as_matrix())
    assert np.allclose((got.inv() * rot).magnitude(), 0, atol=1e-6)
    np.testing.assert_allclose(back[:, [0, 1, -1]], x[:, [0, 1, -1]])


def test_delta_action_round_trip():
    rng = np.random.default_rng(1)
    n = 10
    cur = np.concatenate([rng.normal(size=(n, 3)),
                          Rotation.random(n, rng).as_matrix()[:, :2].reshape(n, 6)], 1)
    act = np.concatenate([rng.normal(size=(n, 3)),
                          Rotation.random(n, rng).as_matrix()[:, :2].reshape(n, 6),
                          rng.uniform(size=(n, 1))], 1)
    cur_full = np.concatenate([cur, np.zeros((n, 1))], 1)
    delta = to_delta_action(act, cur_full, pos_dims=3, rot6d_start=3)
    np.testing.assert_allclose(delta[:, -1], act[:, -1])  # gripper stays absolute
    # zero delta when the target is the current pose
    same = to_delta_action(cur_full, cur_full, 3, 3)
    np.testing.assert_allclose(same[:, :3], 0, atol=1e-9)
    np.testing.assert_allclose(same[:, 3:9], np.tile([1, 0, 0, 0, 1, 0], (n, 1)), atol=1e-9)
    back = from_delta_action(delta, cur_full, pos_dims=3, rot6d_start=3)
    np.testing.assert_allclose(back, act, atol=1e-9)


def test_frames_from_memory_equal_frames_from_store(dataset_json):
    in_memory = SequenceDataset(*_cfgs(dataset_json))
    from_store = SequenceDataset(*_cfgs(dataset_json, image_cache_gb=0.0))
    assert in_memory._frames is not None and from_store._frames is None
    for i in range(0, len(in_memory), 9):
        assert torch.equal(in_memory[i]["image_cam"], from_store[i]["image_cam"])


@pytest.mark.parametrize("cache_gb, threads, workers", [
    (4.0, 1, 0), (0.0, 1, 0), (0.0, 3, 0), (0.0, 0, 0), (0.0, 2, 1), (0.0, 0, 1)],
    ids=["in-memory", "out-of-core", "reader-threads", "auto", "worker-threads", "worker"])
def test_batches_read_together_equal_windows_read_one_by_one(dataset_json, cache_gb, threads,
                                                             workers):
    ds = SequenceDataset(*_cfgs(dataset_json, image_cache_gb=cache_gb, read_threads=threads))
    indices = list(range(0, len(ds), 2))[:12]
    expected = [ds[i] for i in indices]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=4,
                                         num_workers=workers, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        assert set(batch) == set(expected[0])
        for key, value in batch.items():
            assert torch.equal(value, torch.stack([e[key] for e in expected[4 * b:4 * b + 4]])), key


def test_collate_hands_on_the_frame_batch_without_a_copy(dataset_json):
    ds = SequenceDataset(*_cfgs(dataset_json, image_cache_gb=0.0))
    items = ds.__getitems__([0, 5, 9])
    batch = collate(items)
    assert batch["image_cam"].shape == (3, *items[0]["image_cam"].shape)
    assert batch["image_cam"].data_ptr() == items[0]["image_cam"].data_ptr()
    assert batch["proprio"].data_ptr() != items[0]["proprio"].data_ptr()  # stacked
    # rows of one tensor out of order, or not all of it, are stacked like default_collate
    whole = torch.arange(12.0).view(3, 4)
    for rows in ([whole[1], whole[0], whole[2]], [whole[0], whole[1]]):
        got = collate([{"x": r} for r in rows])["x"]
        assert torch.equal(got, torch.stack(rows)) and got.data_ptr() != whole.data_ptr()


def test_dagger_store_keeps_successes_and_supervises_only_corrected_steps(tmp_path, caplog):
    from test_train import tiny_args

    from icrt.config import parse_config
    from icrt.models.policy import ICRTPolicy
    from icrt.train.loop import policy_spec

    rng = np.random.default_rng(0)
    store = EpisodeStore.create(tmp_path / "dagger.zarr")
    sources = []
    for e, success in enumerate((True, False, True, True)):
        n = 20
        source = (rng.random(n) < 0.6).astype(np.int8)  # 1: the policy acted, 0: corrected
        sources.append(source)
        # the state encodes (episode, step) so every window step can be traced back
        state = np.stack([np.full(n, e), np.arange(n), np.zeros(n)], 1).astype(np.float32)
        store.add_episode({"state": state,
                           "action": rng.normal(size=(n, 2)).astype(np.float32),
                           "step_source": source}, task="t", success=success, source=1)
    store.close()
    path = tmp_path / "dagger.json"
    write_dataset_json(path, stores=[tmp_path / "dagger.zarr"], proprio_keys=["state"],
                       action_keys=["action"], train_split=1.0, include_failures=True)
    with caplog.at_level("INFO"):
        cfg = parse_config(tiny_args(path, tmp_path / "run", "--shared-cfg.seq-length", "24",
                                     "--dataset-cfg.non-overlapping", "1",
                                     "--dataset-cfg.proprio-norm", "none",
                                     "--dataset-cfg.proprio-noise", "0"))
        ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg, "train")
    assert sorted(e.index for e in ds.episodes) == [0, 2, 3]  # the failure is left out
    corrected = sum(int((sources[i] == 0).sum()) for i in (0, 2, 3))
    assert f"DAgger dataset (per-step source), 3 successful episodes of 4 / 60 steps kept; " \
           f"loss on the {corrected} corrected steps only" in caplog.text
    for i in range(0, len(ds), 7):  # loss exactly on the corrected steps
        it = ds[i]
        e, t = it["proprio"][:, 0].long().numpy(), it["proprio"][:, 1].long().numpy()
        want = np.array([sources[a][b] == 0 for a, b in zip(e, t, strict=True)])
        np.testing.assert_array_equal(it["loss_mask"].numpy(), want)
    item = ds[0]
    # the loss ignores the targets of the policy's steps, and only those
    model = ICRTPolicy(cfg.model_cfg, policy_spec(ds, cfg)).train()
    batch = {k: v[None] for k, v in item.items()}
    torch.manual_seed(0)
    base = model(batch)["loss"]
    changed = dict(batch)
    chunk = batch["action_chunk"].clone()
    chunk[0, ~batch["loss_mask"][0]] += 5.0
    changed["action_chunk"] = chunk
    torch.manual_seed(0)
    assert torch.allclose(model(changed)["loss"], base)
    chunk = batch["action_chunk"].clone()
    chunk[0, batch["loss_mask"][0]] += 5.0
    changed["action_chunk"] = chunk
    torch.manual_seed(0)
    assert not torch.allclose(model(changed)["loss"], base)
    assert 0 < int(item["loss_mask"].sum()) < 24


def test_comma_separated_dataset_jsons_combine(tmp_path):
    _make_store(tmp_path / "one.zarr", n_per_task=(3, 3, 3))
    _make_store(tmp_path / "two.zarr", n_per_task=(2, 2, 2))
    for name in ("one", "two"):
        write_dataset_json(tmp_path / f"{name}.json", stores=[tmp_path / f"{name}.zarr"],
                           proprio_keys=["state"], action_keys=["action"], train_split=1.0)
    both = f"{tmp_path / 'one.json'},{tmp_path / 'two.json'}"
    spec = DatasetSpec.load(both)
    assert [p.name for p in spec.stores] == ["one.zarr", "two.zarr"]
    ds = SequenceDataset(*_cfgs(both, seq_length=10))
    assert len(ds.episodes) == 15 and {e.store for e in ds.episodes} == {0, 1}
    write_dataset_json(tmp_path / "other.json", stores=[tmp_path / "two.zarr"],
                       proprio_keys=["action"], action_keys=["action"], train_split=1.0)
    with pytest.raises(UserError, match="differ in proprio_keys"):
        DatasetSpec.load(f"{tmp_path / 'one.json'},{tmp_path / 'other.json'}")


def test_icrt_episode_filters_min_demos_and_task_grouping(tmp_path, caplog):
    _make_store(tmp_path / "s.zarr", n_per_task=(6, 4, 5), lengths=(7, 13))
    path = tmp_path / "d.json"
    write_dataset_json(path, stores=[tmp_path / "s.zarr"], proprio_keys=["state"],
                       action_keys=["action"], train_split=1.0)
    ds = SequenceDataset(*_cfgs(path, seq_length=10, min_episode_length=10,
                                max_episode_length=12))
    assert ds.episodes and all(10 <= e.length <= 12 for e in ds.episodes)
    with caplog.at_level("INFO"):
        ds = SequenceDataset(*_cfgs(path, seq_length=10, min_demos=5))
    assert TASKS[1] not in {e.task for e in ds.episodes} and "fewer than 5" in caplog.text
    # ICRT's task_grouping: the groups' ratios scale each task's episodes per epoch
    (tmp_path / "grouping.json").write_text(json.dumps(
        {"tasks": {"many": [TASKS[0]], "few": [TASKS[1], TASKS[2]]},
         "ratios": {"many": 2.0, "few": 0.5}}))
    body = json.loads(path.read_text())
    path.write_text(json.dumps({**body, "task_grouping": "grouping.json"}))
    ds = SequenceDataset(*_cfgs(path, seq_length=10))
    occ = ds._plan(0).occ_episode
    per_task = {t: sum(ds.episodes[i].task == t for i in occ) for t in TASKS}
    median = 5  # episodes per task: 6, 4, 5
    assert per_task == {TASKS[0]: 2 * median, TASKS[1]: median // 2, TASKS[2]: median // 2}
    (tmp_path / "grouping.json").write_text(json.dumps({"groups": {}}))
    with pytest.raises(UserError, match="task_grouping file .* is unreadable"):
        DatasetSpec.load(path)


def test_min_spread_floor_keeps_nearly_constant_inputs_small():
    """A dimension that barely moves in the data (a resting object's tilt) is scaled by at most
    1/min_spread, constant ones only centred, and checkpoints written without the field load
    with the old rule."""
    stats = {"proprio": {"mean": np.zeros(3, np.float32),
                         "std": np.array([1e-4, 0.5, 0.0], np.float32)}}
    x = np.array([[0.01, 0.5, 0.01]], np.float32)  # the tilt moved 100 stds at test time
    floored = Normalizer(stats=stats, modes={"proprio": "mean_std"},
                         min_spread={"proprio": 0.01})
    np.testing.assert_allclose(floored.normalize("proprio", x), [[1.0, 1.0, 0.01]], rtol=1e-5)
    restored = Normalizer.from_dict(json.loads(floored.to_json()))
    np.testing.assert_allclose(restored.normalize("proprio", x), [[1.0, 1.0, 0.01]], rtol=1e-5)
    old = floored.to_dict()
    del old["min_spread"]  # a checkpoint from before the floor existed
    np.testing.assert_allclose(Normalizer.from_dict(old).normalize("proprio", x),
                               [[100.0, 1.0, 0.01]], rtol=1e-4)


def test_min_spread_reaches_the_dataset_normaliser(tmp_path):
    _make_store(tmp_path / "s.zarr")
    path = tmp_path / "d.json"
    write_dataset_json(path, stores=[tmp_path / "s.zarr"], proprio_keys=["state"],
                       action_keys=["action"], train_split=1.0)
    d, s = _cfgs(path)
    d = dataclasses.replace(d, proprio_norm="mean_std", proprio_min_spread=50.0)
    ds = SequenceDataset(d, s)
    std = ds.normalizer.stats["proprio"]["std"]
    np.testing.assert_allclose(ds.normalizer.scale("proprio"), 1.0 / np.maximum(std, 50.0))
    with pytest.raises(ValueError, match="proprio-min-spread"):
        dataclasses.replace(d, proprio_min_spread=-1.0)


def test_prompt_dropout_windows_start_at_a_trajectory_and_have_no_prompt(dataset_json):
    def items(p):
        ds = SequenceDataset(*_cfgs(dataset_json, seq_length=16, prompt_dropout=p), split="train")
        ds.set_epoch(0)
        return [ds[i] for i in range(len(ds))]

    dropped = items(1.0)
    for it in dropped:
        assert not it["prompt_mask"].any()
        assert it["proprio"][0, 1] == 0 and it["episode_start"][0]  # a trajectory's first step
        assert len(set(it["task"].tolist())) == 1  # the task barrier still holds
    kept = items(0.0)
    assert all(it["prompt_mask"].any() for it in kept)
    assert any(it["proprio"][0, 1] > 0 for it in kept)
    half = items(0.5)
    share = np.mean([not it["prompt_mask"].any() for it in half])
    assert 0.25 < share < 0.75
    again = items(0.5)  # a pure function of (seed, epoch, index)
    assert all(torch.equal(a["proprio"], b["proprio"]) for a, b in zip(half, again, strict=True))
    with pytest.raises(ValueError, match="prompt-dropout"):
        _cfgs(dataset_json, prompt_dropout=1.5)
