"""Multi-behaviour recommendation data: loaders, the paper's split protocol, negative sampling, a synthetic default.

Formats
-------
* Folder (the layout of ``shared/data/taobao``): one ``user item`` pair per line, whitespace separated, 0-based
  ids, files ``buy_train``, ``buy_test`` and ``<aux>_train`` with suffix ``.txt`` or ``.txt.gz``.
* Taobao ``UserBehavior.csv``: ``user,item,category,behavior,timestamp``, behavior in pv/cart/fav/buy, no header.
* IJCAI-15 ``user_log_format1.csv``: header ``user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type``,
  action_type 0 click, 1 add-to-cart, 2 purchase, 3 add-to-favourite; time_stamp is ``MMDD``.

Protocol (MetaBalance §5.1)
---------------------------
1. Test: one held-out purchase per user (the folder format ships it; raw logs: each user's latest purchase).
2. Validation: one more purchase per user held out of the target's training pairs (folder: chosen at random with
   the split seed; raw logs: the latest remaining purchase), for users who keep at least one training purchase.
3. Leakage: auxiliary pairs that appear in the target's validation or test set are removed.
4. Training: binary cross-entropy per task on that task's positives and uniformly sampled negatives, resampled
   every epoch (``TrainSampler``).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataFormatError(ValueError):
    """A data file could not be parsed; the message names the file, the line number and the reason."""


@dataclass
class MultiBehaviorData:
    """Train/validation/test split of one target behaviour plus auxiliary behaviours (remapped 0-based ids).

    ``train`` maps task name -> ``[N, 2]`` int64 (user, item) pairs, target first; ``valid`` and ``test`` are the
    target's held-out pairs (at most one per user).
    """

    num_users: int
    num_items: int
    train: dict[str, np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    name: str = "data"
    notes: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return list(self.train)

    @property
    def target(self) -> str:
        return self.tasks[0]

    def summary(self) -> str:
        parts = ", ".join(f"{t}_train={len(p):,}" for t, p in self.train.items())
        return (
            f"{self.name}: {self.num_users:,} users x {self.num_items:,} items; {parts}; "
            f"valid={len(self.valid):,}, test={len(self.test):,}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_pairs(path: str | Path) -> np.ndarray:
    """Read a ``user item`` pair file (.txt or .txt.gz) into ``[N, 2]`` int64; blank lines are skipped.

    Raises DataFormatError with file and line number on a malformed line, a negative id or an unreadable file.
    """
    path = Path(path)
    rows: list[tuple[int, int]] = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise DataFormatError(
                        f"{path}:{lineno}: expected 2 fields 'user item', got {len(fields)}: {line.strip()[:80]!r}"
                    )
                try:
                    u, i = int(fields[0]), int(fields[1])
                except ValueError:
                    raise DataFormatError(f"{path}:{lineno}: ids must be integers, got {line.strip()[:80]!r}") from None
                if u < 0 or i < 0:
                    raise DataFormatError(f"{path}:{lineno}: ids must be non-negative, got {line.strip()[:80]!r}")
                rows.append((u, i))
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise DataFormatError(f"{path}: cannot read: {err}") from err
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".txt", ".txt.gz"):
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def load_folder(path: str | Path, target: str = "buy", seed: int = 0) -> MultiBehaviorData:
    """Load the folder format (``<target>_train``, ``<target>_test``, ``<aux>_train``) and apply the protocol."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    train_path, test_path = _find(folder, f"{target}_train"), _find(folder, f"{target}_test")
    if train_path is None or test_path is None:
        raise FileNotFoundError(
            f"{folder}: needs {target}_train.txt[.gz] and {target}_test.txt[.gz] (found: "
            f"{sorted(p.name for p in folder.iterdir())})"
        )
    aux_names = sorted(
        {
            m.group(1)
            for p in folder.iterdir()
            if (m := re.fullmatch(r"(\w+?)_train\.txt(?:\.gz)?", p.name)) and m.group(1) != target
        }
    )
    if not aux_names:
        raise FileNotFoundError(f"{folder}: no auxiliary behaviour files '<aux>_train.txt[.gz]' found")
    train = {target: _unique(read_pairs(train_path))}
    for name in aux_names:
        train[name] = _unique(read_pairs(_find(folder, f"{name}_train")))
    test = _unique(read_pairs(test_path))
    num_users = 1 + max(int(a[:, 0].max(initial=-1)) for a in [*train.values(), test])
    num_items = 1 + max(int(a[:, 1].max(initial=-1)) for a in [*train.values(), test])
    train_target, valid = holdout_random(train[target], seed)
    train[target] = train_target
    return _finish(train, valid, test, num_users, num_items, name=folder.name)


# Raw logs -------------------------------------------------------------------------------------------------------

TAOBAO_BEHAVIORS = {"buy": "buy", "pv": "view", "cart": "cart", "fav": "fav"}
IJCAI_ACTIONS = {"2": "buy", "0": "view", "1": "cart", "3": "fav"}


def load_taobao_userbehavior(path: str | Path, max_rows: int | None = None) -> MultiBehaviorData:
    """Load Taobao ``UserBehavior.csv`` (user,item,category,behavior,timestamp; no header)."""
    path = Path(path)
    events = _Events()
    for lineno, row in _csv_rows(path, max_rows):
        if len(row) != 5:
            raise DataFormatError(
                f"{path}:{lineno}: expected 5 fields user,item,category,behavior,timestamp, got {len(row)}"
            )
        user, item, _, behavior, ts = row
        if behavior not in TAOBAO_BEHAVIORS:
            raise DataFormatError(
                f"{path}:{lineno}: unknown behavior {behavior!r}; expected one of {sorted(TAOBAO_BEHAVIORS)}"
            )
        events.add(user, item, TAOBAO_BEHAVIORS[behavior], _int(ts, path, lineno, "timestamp"))
    return _from_events(events, path)


def load_ijcai15(path: str | Path, max_rows: int | None = None) -> MultiBehaviorData:
    """Load IJCAI-15 ``user_log_format1.csv`` (header; action_type 0 click, 1 cart, 2 purchase, 3 favourite)."""
    path = Path(path)
    events = _Events()
    header: list[str] | None = None
    for lineno, row in _csv_rows(path, max_rows):
        if header is None:
            header = [h.strip() for h in row]
            missing = {"user_id", "item_id", "time_stamp", "action_type"} - set(header)
            if missing:
                raise DataFormatError(f"{path}:{lineno}: header lacks columns {sorted(missing)}; got {header}")
            cols = {name: header.index(name) for name in ("user_id", "item_id", "time_stamp", "action_type")}
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        action = row[cols["action_type"]].strip()
        if action not in IJCAI_ACTIONS:
            raise DataFormatError(f"{path}:{lineno}: unknown action_type {action!r}; expected 0, 1, 2 or 3")
        ts = _int(row[cols["time_stamp"]], path, lineno, "time_stamp")
        events.add(row[cols["user_id"]].strip(), row[cols["item_id"]].strip(), IJCAI_ACTIONS[action], ts)
    if header is None:
        raise DataFormatError(f"{path}: empty file")
    return _from_events(events, path)


def load(path: str | Path, seed: int = 0) -> MultiBehaviorData:
    """Load a folder or a raw log, recognised by name (UserBehavior*.csv, user_log*.csv) or by first line."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path, seed=seed)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    name = path.name.lower()
    if name.startswith("user_log"):
        return load_ijcai15(path)
    if name.startswith("userbehavior"):
        return load_taobao_userbehavior(path)
    with _open_text(path) as f:
        first = f.readline()
    return load_ijcai15(path) if "action_type" in first else load_taobao_userbehavior(path)


def _csv_rows(path: Path, max_rows: int | None) -> Iterator[tuple[int, list[str]]]:
    try:
        with _open_text(path) as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if max_rows is not None and lineno > max_rows:
                    return
                if row:
                    yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile, csv.Error) as err:
        raise DataFormatError(f"{path}: cannot read: {err}") from err


def _int(text: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {what} must be an integer, got {text!r}") from None


BEHAVIOR_CODES = ("buy", "view", "cart", "fav")


class _Events:
    """Raw interactions with ids remapped on arrival, in compact typed arrays (raw logs have tens of millions)."""

    def __init__(self) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.u, self.i, self.ts, self.b = array("q"), array("q"), array("q"), array("b")

    def add(self, user: str, item: str, behavior: str, ts: int) -> None:
        self.u.append(self.users.setdefault(user, len(self.users)))
        self.i.append(self.items.setdefault(item, len(self.items)))
        self.ts.append(ts)
        self.b.append(BEHAVIOR_CODES.index(behavior))


def _from_events(events: _Events, path: Path) -> MultiBehaviorData:
    """Hold out each user's latest purchase (test) and the next latest (validation); ids are already remapped."""
    if not events.u:
        raise DataFormatError(f"{path}: no interactions")
    users, items = events.users, events.items
    u, i, ts = (np.frombuffer(a, dtype=np.int64) for a in (events.u, events.i, events.ts))
    beh = np.frombuffer(events.b, dtype=np.int8)  # index into BEHAVIOR_CODES
    if not (beh == 0).any():
        raise DataFormatError(f"{path}: no purchase events; the target behaviour 'buy' is required")
    buy = np.flatnonzero(beh == 0)
    # Latest purchase of each (user, item) pair, then each user's purchases newest first (ties: later line first).
    order = buy[np.lexsort((-buy, -ts[buy], u[buy]))]
    pairs = np.stack([u[order], i[order]], 1)
    _, first = np.unique(pairs[:, 0] * len(items) + pairs[:, 1], return_index=True)
    pairs = pairs[np.sort(first)]
    rank = _rank_within_user(pairs[:, 0])
    count = np.bincount(pairs[:, 0], minlength=len(users))[pairs[:, 0]]
    test = pairs[(rank == 0) & (count >= 2)]
    valid = pairs[(rank == 1) & (count >= 3)]
    train = {"buy": _unique(pairs[(rank >= 2) | ((rank == 1) & (count == 2)) | (count == 1)])}
    for code, name in enumerate(BEHAVIOR_CODES[1:], 1):
        sel = beh == code
        if sel.any():
            train[name] = _unique(np.stack([u[sel], i[sel]], 1))
    if len(train) == 1:
        raise DataFormatError(f"{path}: no auxiliary behaviour (view/cart/fav) events")
    return _finish(train, valid, test, len(users), len(items), name=path.name)


def _rank_within_user(users: np.ndarray) -> np.ndarray:
    """Position of each row within its user's run (rows grouped by user, in order)."""
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    lengths = np.diff(np.r_[starts, len(users)])
    return np.arange(len(users)) - np.repeat(starts, lengths)


# ---------------------------------------------------------------------------------------------------------------
# Protocol


def _unique(pairs: np.ndarray) -> np.ndarray:
    return np.unique(pairs.reshape(-1, 2), axis=0) if len(pairs) else pairs.reshape(0, 2)


def pair_keys(pairs: np.ndarray, num_items: int) -> np.ndarray:
    return pairs[:, 0] * num_items + pairs[:, 1]


def holdout_random(pairs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold one random pair per user out (users with >= 2 pairs); returns ``(train, held_out)``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(pairs))
    shuffled = pairs[perm]
    order = np.argsort(shuffled[:, 0], kind="stable")
    grouped = shuffled[order]
    rank = _rank_within_user(grouped[:, 0])
    count = np.bincount(grouped[:, 0])[grouped[:, 0]]
    held = (rank == 0) & (count >= 2)
    return _unique(grouped[~held]), _unique(grouped[held])


def remove_leakage(train: dict[str, np.ndarray], held_out: np.ndarray, num_items: int) -> dict[str, int]:
    """Drop auxiliary pairs that are also target validation/test pairs (in place); returns removed counts."""
    held = np.unique(pair_keys(held_out, num_items))
    removed = {}
    for name in list(train)[1:]:
        keep = ~np.isin(pair_keys(train[name], num_items), held)
        removed[name] = int((~keep).sum())
        train[name] = train[name][keep]
    return removed


def subsample_users(data: MultiBehaviorData, count: int, seed: int = 0) -> MultiBehaviorData:
    """The same data restricted to ``count`` random users (every interaction of theirs), user ids renumbered.

    Items keep their ids and all stay candidates in the ranking, so the ranking task is as hard per user; what
    shrinks is the training set and the number of users to score (for budgets where all users do not fit).
    """
    if count >= data.num_users:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(data.num_users, size=count, replace=False))
    new_id = np.full(data.num_users, -1, np.int64)
    new_id[keep] = np.arange(count)

    def sub(pairs: np.ndarray) -> np.ndarray:
        mapped = new_id[pairs[:, 0]]
        sel = mapped >= 0
        return np.stack([mapped[sel], pairs[sel, 1]], 1)

    return MultiBehaviorData(
        count,
        data.num_items,
        {t: sub(p) for t, p in data.train.items()},
        sub(data.valid),
        sub(data.test),
        name=f"{data.name} ({count:,} random users, seed {seed})",
        notes=[*data.notes, f"restricted to {count:,} of {data.num_users:,} users (seed {seed}); all items kept"],
    )


def _finish(train, valid, test, num_users, num_items, name) -> MultiBehaviorData:
    target_keys = np.isin(pair_keys(test, num_items), pair_keys(train[next(iter(train))], num_items))
    notes = []
    if target_keys.any():
        notes.append(f"{int(target_keys.sum())} test pairs also in the target's training pairs")
    removed = remove_leakage(train, np.concatenate([valid, test]), num_items)
    notes.append("leakage removed from auxiliaries: " + ", ".join(f"{k} {v:,}" for k, v in removed.items()))
    return MultiBehaviorData(num_users, num_items, train, _unique(valid), _unique(test), name=name, notes=notes)


# ---------------------------------------------------------------------------------------------------------------
# Training examples


class TrainSampler:
    """Epochs of per-task batches: every task gets ``batch_size`` of its positive pairs plus ``neg_ratio`` times
    as many uniformly sampled negatives (fresh every epoch), labelled 1/0 for that task only.

    One epoch is one pass over the target's training pairs; each auxiliary task walks through a fresh
    permutation of its (usually larger) pair set at the same pace, wrapping around when it is smaller. A step
    yields ``(users, items, labels, segments)`` with the tasks' rows contiguous: ``segments[t]`` is task t's slice.
    """

    def __init__(self, data: MultiBehaviorData, neg_ratio: int = 1, tasks: int | None = None) -> None:
        if neg_ratio < 0:
            raise ValueError(f"neg_ratio must be >= 0, got {neg_ratio}")
        self.data = data
        self.neg_ratio = neg_ratio
        self.pairs = list(data.train.values())[: tasks or len(data.train)]

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, -(-len(self.pairs[0]) // batch_size))

    def epoch(
        self, rng: np.random.Generator, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[slice]]]:
        n_items = self.data.num_items
        orders = [rng.permutation(len(p)) for p in self.pairs]
        for step in range(self.steps_per_epoch(batch_size)):
            users, items, labels, segments, offset = [], [], [], [], 0
            for pairs, order in zip(self.pairs, orders):
                if len(pairs) == 0:
                    segments.append(slice(offset, offset))
                    continue
                idx = order[np.arange(step * batch_size, (step + 1) * batch_size) % len(pairs)]
                if pairs is self.pairs[0]:
                    idx = idx[: max(0, min(batch_size, len(pairs) - step * batch_size))]
                pos = pairs[idx]
                neg_u = np.repeat(pos[:, 0], self.neg_ratio)
                neg_i = rng.integers(0, n_items, size=len(neg_u))
                users += [pos[:, 0], neg_u]
                items += [pos[:, 1], neg_i]
                labels += [np.ones(len(pos), np.float32), np.zeros(len(neg_u), np.float32)]
                size = len(pos) + len(neg_u)
                segments.append(slice(offset, offset + size))
                offset += size
            yield np.concatenate(users), np.concatenate(items), np.concatenate(labels), segments


# ---------------------------------------------------------------------------------------------------------------
# Synthetic default


def synthetic(
    num_users: int = 1000,
    num_items: int = 300,
    dim: int = 8,
    views_per_user: int = 40,
    carts_per_user: int = 10,
    buys_per_user: int = 8,
    taste: float = 2.0,
    popularity: float = 0.3,
    seed: int = 0,
) -> MultiBehaviorData:
    """A deterministic multi-behaviour data set whose tasks share latent structure.

    Users and items have latent factors; every behaviour follows the same user-item affinity
    a = taste * <u, v> + item popularity, with deeper behaviours drawn from sharper preferences: views ~
    softmax(a/2), carts ~ softmax(a), buys ~ softmax(2a), each without replacement (Gumbel top-k). Purchases are
    few, views plentiful, so the auxiliary tasks carry information the target alone lacks — the setting
    MetaBalance is about (Single-Loss clearly trails the multi-task methods here). One purchase per user is the
    test pair, one the validation pair.
    """
    rng = np.random.default_rng(seed)
    user_f = rng.normal(size=(num_users, dim)) / dim**0.25
    item_f = rng.normal(size=(num_items, dim)) / dim**0.25
    affinity = taste * (user_f @ item_f.T) + rng.normal(scale=popularity, size=num_items)

    def draw(temp: float, k: int) -> np.ndarray:
        logits = affinity / temp
        # Gumbel top-k: k distinct items per user, sampled without replacement from softmax(logits).
        keys = logits + rng.gumbel(size=logits.shape)
        top = np.argpartition(-keys, k, axis=1)[:, :k]
        return np.stack([np.repeat(np.arange(num_users), k), top.ravel()], 1)

    view = draw(2.0, views_per_user)
    cart = draw(1.0, carts_per_user)
    buy = draw(0.5, buys_per_user)
    order = rng.permutation(len(buy))
    buy = buy[order][np.argsort(buy[order][:, 0], kind="stable")]
    rank = _rank_within_user(buy[:, 0])
    train = {"buy": _unique(buy[rank >= 2]), "cart": _unique(cart), "view": _unique(view)}
    return _finish(train, buy[rank == 1], buy[rank == 0], num_users, num_items, name="synthetic")
