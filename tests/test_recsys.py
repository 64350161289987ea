"""The multi-task recommender: model, loaders and protocol, full-ranking metrics, an end-to-end run."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.recsys import data as D
from experiments.recsys.metrics import rank_metrics
from experiments.recsys.model import MultiTaskNCF
from experiments.recsys.train import METHODS, TrainConfig, evaluate, evaluate_test, fixed_users, summarize, train

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao"


# ---- model ------------------------------------------------------------------------------------------------------
def test_model_shapes_and_shared_parameters():
    torch.manual_seed(0)
    model = MultiTaskNCF(7, 11, 3)
    users, items = torch.tensor([0, 3, 6]), torch.tensor([1, 10, 4])
    assert model(users, items).shape == (3, 3)
    shared = {id(p) for p in model.shared_parameters()}
    towers = {id(p) for p in model.task_parameters()}
    assert not shared & towers
    assert shared | towers == {id(p) for p in model.parameters()}
    assert model.shared(users, items).shape == (3, 64 + 8)


def test_score_all_items_matches_forward():
    torch.manual_seed(0)
    model = MultiTaskNCF(5, 13, 2).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # away from the near-constant initial outputs
        users = torch.tensor([4, 0, 2])
        for task in (0, 1):
            full = model.score_all_items(users, task=task, item_chunk=4)
            pairs = model(users.repeat_interleave(13), torch.arange(13).repeat(3))[:, task].view(3, 13)
            torch.testing.assert_close(full, pairs, rtol=1e-12, atol=1e-12)


# ---- loaders ----------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _folder(tmp_path: Path, gz: bool) -> Path:
    ext = ".txt.gz" if gz else ".txt"
    # 3 users, 6 items. Test pairs: (0,5), (1,4), (2,3).
    _write(tmp_path / f"buy_train{ext}", "0 0\n0 1\n0 2\n1 0\n1 3\n2 1\n")
    _write(tmp_path / f"buy_test{ext}", "0 5\n1 4\n2 3\n")
    _write(tmp_path / f"cart_train{ext}", "0 5\n0 3\n1 1\n\n")  # (0,5) leaks the test pair
    _write(tmp_path / f"view_train{ext}", "0 0\n0 5\n1 4\n2 2\n2 3\n2 3\n")
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_load_folder_protocol(tmp_path, gz):
    d = D.load_folder(_folder(tmp_path, gz), seed=1)
    assert d.tasks == ["buy", "cart", "view"]
    assert (d.num_users, d.num_items) == (3, 6)
    held = {tuple(p) for p in np.concatenate([d.valid, d.test])}
    # One validation purchase per user with >= 2 training purchases (users 0 and 1), taken out of training.
    assert sorted(d.valid[:, 0].tolist()) == [0, 1]
    train_buy = {tuple(p) for p in d.train["buy"]}
    assert not train_buy & {tuple(p) for p in d.valid}
    assert len(train_buy) + len(d.valid) == 6
    # Leakage: no auxiliary pair is a validation or test purchase; duplicates are dropped.
    for task in ("cart", "view"):
        assert not {tuple(p) for p in d.train[task]} & held
    assert (2, 3) not in {tuple(p) for p in d.train["view"]}
    assert (0, 0) in {tuple(p) for p in d.train["view"]} or (0, 0) in held


def test_holdout_is_deterministic_per_seed(tmp_path):
    folder = _folder(tmp_path, False)
    a, b = D.load_folder(folder, seed=3), D.load_folder(folder, seed=3)
    np.testing.assert_array_equal(a.valid, b.valid)


@pytest.mark.parametrize(
    ("line", "reason"),
    [("0 1 2", "expected 2 fields"), ("0 x", "integers"), ("-1 2", "non-negative")],
)
@pytest.mark.parametrize("gz", [False, True])
def test_bad_pair_line_names_file_and_line(tmp_path, line, reason, gz):
    path = _write(tmp_path / ("pairs.txt.gz" if gz else "pairs.txt"), f"0 1\n\n2 3\n{line}\n")
    with pytest.raises(D.DataFormatError, match=rf"pairs\.txt(\.gz)?:4: .*{reason}"):
        D.read_pairs(path)


def test_corrupt_gzip_and_missing_files(tmp_path):
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DataFormatError, match=r"bad\.txt\.gz: cannot read"):
        D.read_pairs(tmp_path / "bad.txt.gz")
    with pytest.raises(FileNotFoundError, match="buy_train"):
        D.load_folder(tmp_path)


TAOBAO_CSV = """\
100,7,1,pv,10
100,7,1,buy,11
100,8,1,cart,12
100,8,1,buy,13
100,9,1,buy,14
100,9,1,pv,9
200,7,1,buy,5
200,8,1,buy,6
200,9,1,fav,7
300,9,1,buy,1
"""


def test_taobao_userbehavior(tmp_path):
    d = D.load(_write(tmp_path / "UserBehavior.csv", TAOBAO_CSV))
    assert (d.num_users, d.num_items) == (3, 3)
    assert d.tasks[0] == "buy" and set(d.tasks[1:]) == {"view", "cart", "fav"}
    # user 100 (id 0): latest purchase item 9 (id 2) is the test pair, the next latest (item 8, id 1) validation.
    assert [0, 2] in d.test.tolist() and [0, 1] in d.valid.tolist()
    # user 200 (id 1): two purchases -> test only; user 300: one purchase -> training only.
    assert [1, 1] in d.test.tolist() and 1 not in d.valid[:, 0]
    assert [2, 2] in d.train["buy"].tolist()
    # (100, 9) was viewed: that view leaks the test pair and is removed.
    assert [0, 2] not in d.train["view"].tolist() and [0, 0] in d.train["view"].tolist()


def test_taobao_bad_line(tmp_path):
    path = _write(tmp_path / "UserBehavior.csv", TAOBAO_CSV + "100,7,1,click,15\n")
    with pytest.raises(D.DataFormatError, match=r"UserBehavior\.csv:11: unknown behavior 'click'"):
        D.load(path)
    path = _write(tmp_path / "UserBehavior.csv", "1,2,3,buy\n")
    with pytest.raises(D.DataFormatError, match=r":1: expected 5 fields"):
        D.load(path)


IJCAI_CSV = """\
user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type
1,10,5,3,,1101,0
1,10,5,3,,1102,2
1,11,5,3,7,1105,2
1,12,5,3,7,1106,2
1,12,5,3,7,1103,1
2,10,5,3,7,1001,2
2,11,5,3,7,1002,2
2,12,5,3,7,1003,3
"""


def test_ijcai15(tmp_path):
    d = D.load(_write(tmp_path / "user_log_format1.csv.gz", IJCAI_CSV))
    assert (d.num_users, d.num_items) == (2, 3)
    assert set(d.tasks) == {"buy", "view", "cart", "fav"}
    assert [0, 2] in d.test.tolist() and [0, 1] in d.valid.tolist() and [0, 0] in d.train["buy"].tolist()
    assert [0, 2] not in d.train["cart"].tolist()  # cart of the test purchase: leakage, removed


def test_ijcai15_bad_lines(tmp_path):
    with pytest.raises(D.DataFormatError, match=r"user_log\.csv:3: unknown action_type '7'"):
        D.load_ijcai15(
            _write(tmp_path / "user_log.csv", IJCAI_CSV.splitlines()[0] + "\n1,2,3,4,5,1101,0\n1,2,3,4,5,1101,7\n")
        )
    with pytest.raises(D.DataFormatError, match=r"user_log\.csv:2: time_stamp must be an integer"):
        D.load_ijcai15(_write(tmp_path / "user_log.csv", IJCAI_CSV.splitlines()[0] + "\n1,2,3,4,5,nov,0\n"))
    with pytest.raises(D.DataFormatError, match=r":1: header lacks columns \['action_type'\]"):
        D.load_ijcai15(_write(tmp_path / "user_log.csv", "user_id,item_id,time_stamp\n1,2,3\n"))


def test_synthetic_is_deterministic_and_protocol_holds():
    a, b = D.synthetic(num_users=200, num_items=150, seed=4), D.synthetic(num_users=200, num_items=150, seed=4)
    for t in a.tasks:
        np.testing.assert_array_equal(a.train[t], b.train[t])
    np.testing.assert_array_equal(a.test, b.test)
    assert len(a.test) == len(a.valid) == 200
    held = set(map(tuple, np.concatenate([a.valid, a.test]).tolist()))
    for t in a.tasks:
        assert not held & set(map(tuple, a.train[t].tolist()))


def test_sampler_segments_and_labels():
    d = D.synthetic(num_users=100, num_items=80, seed=0)
    sampler = D.TrainSampler(d, neg_ratio=2)
    rng = np.random.default_rng(0)
    batches = list(sampler.epoch(rng, 64))
    assert len(batches) == sampler.steps_per_epoch(64) == math.ceil(len(d.train["buy"]) / 64)
    seen = []
    for users, items, labels, segments in batches:
        assert len(segments) == 3 and segments[-1].stop == len(users) == len(items) == len(labels)
        for t, sl in enumerate(segments):
            pos = labels[sl] == 1
            assert pos.sum() * 3 == sl.stop - sl.start  # 2 negatives per positive
            keys = set((users[sl][pos] * d.num_items + items[sl][pos]).tolist())
            assert keys <= set(D.pair_keys(d.train[d.tasks[t]], d.num_items).tolist())
        seen.append(users[segments[0]][labels[segments[0]] == 1])
    # One epoch covers every target training pair exactly once.
    assert len(np.concatenate(seen)) == len(d.train["buy"])


# ---- metrics ----------------------------------------------------------------------------------------------------
def _brute_force(scores, relevant, exclude, k):
    out = {"ndcg": [], "recall": [], "precision": []}
    for u in sorted({u for u, _ in relevant}):
        rel = {i for v, i in relevant if v == u}
        masked = {i for v, i in exclude if v == u}
        ranking = sorted((i for i in range(scores.shape[1]) if i not in masked), key=lambda i: (-scores[u, i], i))
        top = ranking[:k]
        hits = [i in rel for i in top]
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        out["ndcg"].append(dcg / idcg)
        out["recall"].append(sum(hits) / len(rel))
        out["precision"].append(sum(hits) / k)
    return {f"{m}@{k}": float(np.mean(v)) for m, v in out.items()}


def test_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 53
    scores = torch.from_numpy(rng.permutation(n_users * n_items).reshape(n_users, n_items).astype(np.float32))
    relevant = np.unique(np.stack([rng.integers(0, n_users, 60), rng.integers(0, n_items, 60)], 1), axis=0)
    exclude = np.unique(np.stack([rng.integers(0, n_users, 400), rng.integers(0, n_items, 400)], 1), axis=0)
    exclude = exclude[~np.isin(exclude[:, 0] * n_items + exclude[:, 1], relevant[:, 0] * n_items + relevant[:, 1])]
    got = rank_metrics(lambda ub: scores[ub], relevant, exclude, n_users, n_items, ks=(10, 20), block=5)
    expected = {**_brute_force(scores.numpy(), relevant.tolist(), exclude.tolist(), 10)}
    expected.update(_brute_force(scores.numpy(), relevant.tolist(), exclude.tolist(), 20))
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_metrics_user_subsample_skips_users_without_relevant_items():
    scores = torch.arange(12.0).repeat(3, 1)  # item 11 ranks first for everyone
    relevant = np.array([[0, 11], [2, 0]])
    full = rank_metrics(lambda ub: scores[ub], relevant, np.zeros((0, 2), np.int64), 3, 12, ks=(10,))
    assert full["recall@10"] == pytest.approx(0.5) and full["ndcg@10"] == pytest.approx(0.5)
    sub = rank_metrics(lambda ub: scores[ub], relevant, np.zeros((0, 2), np.int64), 3, 12, ks=(10,), users=[0, 1])
    assert sub["recall@10"] == 1.0 and sub["precision@10"] == pytest.approx(0.1)


def test_metrics_at_taobao_scale():
    """15K users x 12K items from a score matrix, in blocks (its speed is a benchmark's business)."""
    torch.manual_seed(0)
    n_users, n_items = 15449, 11953
    user_f, item_f = torch.randn(n_users, 8), torch.randn(n_items, 8)
    rng = np.random.default_rng(0)
    relevant = np.stack([np.arange(n_users), rng.integers(0, n_items, n_users)], 1)
    exclude = np.stack([rng.integers(0, n_users, 90_000), rng.integers(0, n_items, 90_000)], 1)
    metrics = rank_metrics(lambda ub: user_f[ub] @ item_f.T, relevant, exclude, n_users, n_items, block=1024)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


# ---- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_tiny_end_to_end(method):
    torch.set_num_threads(1)
    d = D.synthetic(num_users=120, num_items=90, views_per_user=12, carts_per_user=4, seed=1)
    cfg = TrainConfig(method=method, strategy="C", relax_factor=0.7, epochs=2, batch_size=64, trace_every=2)
    lines = []
    result = train(d, cfg, progress=lines.append)
    metrics = evaluate_test(result, d)
    assert set(metrics) == {f"{m}@{k}" for m in ("ndcg", "recall", "precision") for k in (10, 20)} | {"ndcg@10_se"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert 0.0 < metrics["ndcg@10_se"] < 0.1
    if method == "mostpop":
        return
    assert len(result.history) == 2 and 1 <= result.best_epoch <= 2
    assert all(np.isfinite(h["loss"]).all() for h in result.history)
    if method in ("mb", "vanilla"):
        trace = result.trace
        assert trace["tasks"] == ["buy", "cart", "view"] and len(trace["step"]) > 0
        norms = np.array(trace["norm_ema"])  # [records, params, tasks]
        assert norms.shape[1:] == (len(result.model.shared_parameters()), 3) and (norms > 0).all()
        weights = np.array(trace["weights"])
        np.testing.assert_array_equal(weights[..., 0], 1.0)
        if method == "vanilla":  # traced through MetaBalance with r = 0: every weight is 1
            np.testing.assert_array_equal(weights, 1.0)
    assert any("epoch 2/2" in line for line in lines)


def test_metabalance_changes_the_update_vanilla_does_not():
    """Same seed, same data: MetaBalance with r = 0 reproduces Vanilla-Multi; r = 1 does not."""
    torch.set_num_threads(1)
    d = D.synthetic(num_users=80, num_items=60, views_per_user=10, carts_per_user=3, seed=2)
    base = dict(epochs=1, batch_size=32, dropout=0.0)
    vanilla = train(d, TrainConfig(method="vanilla", **base)).model
    r0 = train(d, TrainConfig(method="mb", relax_factor=0.0, **base)).model
    r1 = train(d, TrainConfig(method="mb", relax_factor=1.0, **base)).model
    for a, b in zip(vanilla.parameters(), r0.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, c, rtol=1e-4, atol=1e-6) for a, c in zip(vanilla.parameters(), r1.parameters()))


def test_summarize_mean_std():
    class R:
        def __init__(self, v):
            self.test = {"ndcg@10": v}

    mean, std = summarize([R(0.1), R(0.2), R(0.3)])["ndcg@10"]
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)


def test_experiment_cli_smoke(tmp_path, capsys):
    from experiments.recsys import __main__ as experiment

    out = tmp_path / "results.json"
    trace = tmp_path / "trace.json"
    folder = tmp_path / "data"
    folder.mkdir()
    experiment.main(
        [
            "--data",
            str(_folder(folder, True)),
            "--methods",
            "mostpop",
            "vanilla",
            "mb-C",
            "--seeds",
            "2",
            "--relax-grid",
            "0.5",
            "0.9",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--trace",
            str(trace),
            "--trace-every",
            "1",
            "--quiet",
        ]
    )
    text = capsys.readouterr().out
    assert "MetaBalance-C" in text and "Vanilla-Multi" in text and "±" in text
    payload = json.loads(out.read_text())
    assert set(payload["grid"]["mb-C"]) == {"0.5", "0.9"}
    assert len(payload["runs"]["mb-C"]) == 2
    assert set(json.loads(trace.read_text())) == {"Vanilla-Multi", "MetaBalance-C (r=0.5)"} or set(
        json.loads(trace.read_text())
    ) == {"Vanilla-Multi", "MetaBalance-C (r=0.9)"}


# ---- the real data ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Taobao data not found at {REAL_DATA}")
def test_real_taobao_protocol_and_short_training():
    torch.set_num_threads(1)
    d = D.load_folder(REAL_DATA)
    assert (d.num_users, d.num_items) == (15449, 11953)
    assert d.tasks == ["buy", "cart", "view"]
    assert len(d.test) == 15449 and len(d.valid) == 15449
    assert len(d.train["buy"]) == 92180 - 15449
    held = np.unique(D.pair_keys(np.concatenate([d.valid, d.test]), d.num_items))
    for t in ("cart", "view"):
        assert not np.isin(D.pair_keys(d.train[t], d.num_items), held).any()
    # MostPop on all users: the data README's reference point (target-only mask), within the held-out change.
    pop = torch.as_tensor(np.bincount(d.train["buy"][:, 1], minlength=d.num_items), dtype=torch.float32)
    most_pop = evaluate(None, d, "test", popularity=pop, mask="target")
    assert 0.009 < most_pop["recall@10"] < 0.013
    # A few hundred MetaBalance steps run and evaluate on a user subsample.
    cfg = TrainConfig(method="mb", epochs=1, batch_size=4096)
    result = train(d, cfg, val_users=fixed_users(d, "valid", 300))
    assert np.isfinite(result.history[0]["loss"]).all()
    assert 0.0 <= evaluate_test(result, d, fixed_users(d, "test", 300))["ndcg@10"] <= 1.0


def test_shared_output_training_matches_the_plain_metabalance_step():
    """--shared-output (the default) changes how the per-task gradients are computed, not what they are: one epoch
    of MetaBalance lands on the same parameters (up to float32 rounding of a differently ordered computation)."""
    torch.set_num_threads(1)
    d = D.synthetic(num_users=80, num_items=60, views_per_user=10, carts_per_user=3, seed=4)
    base = dict(method="mb", relax_factor=0.7, epochs=1, batch_size=32, dropout=0.0)
    plain = train(d, TrainConfig(shared_output=False, **base)).model
    fast = train(d, TrainConfig(shared_output=True, **base)).model
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
