import numpy as np
import pandas as pd
import pytest

from training.data import (
    DataError,
    from_interactions,
    load_dataset,
    load_folder,
    make_demo,
    read_ratings_csv,
    read_ratings_dat,
    read_u_data,
)


def frame(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def histories(data):
    """{user: set of train items}, built the slow obvious way."""
    out = {}
    for u, i in zip(data.train_users, data.train_items, strict=True):
        out.setdefault(int(u), set()).add(int(i))
    return out


def random_frame(seed=0, users=40, items=200, rows=2000):
    rng = np.random.default_rng(seed)
    return frame(
        np.stack(
            [
                rng.integers(1, users + 1, rows),
                rng.integers(1, items + 1, rows) * 10,
                rng.integers(0, 10**6, rows),
            ],
            axis=1,
        )
    )


def test_leave_one_out_holds_out_each_users_latest_item():
    raw = random_frame()
    data = from_interactions("t", raw, seed=3)
    train = histories(data)
    for u, held_out in zip(data.test_users, data.test_items, strict=True):
        rows = raw[raw.user == data.user_ids[u]]
        # the latest row; ties in time go to the larger item id, as documented
        latest = rows.sort_values(["timestamp", "item"]).iloc[-1]["item"]
        assert data.item_ids[held_out] == latest
        assert held_out not in train[int(u)]  # nothing leaks into training
        assert len(train[int(u)]) == rows.item.nunique() - 1
    assert (
        len(data.train_users) + len(data.test_users)
        == raw.drop_duplicates(["user", "item"]).shape[0]
    )


def test_test_negatives_are_distinct_unseen_and_deterministic():
    raw = random_frame()
    data = from_interactions("t", raw, seed=3)
    train = histories(data)
    assert data.test_negatives.shape == (len(data.test_users), 99)
    for u, target, negatives in zip(
        data.test_users, data.test_items, data.test_negatives, strict=True
    ):
        assert len(set(negatives.tolist())) == 99
        assert not (set(negatives.tolist()) & (train[int(u)] | {int(target)}))
    again = from_interactions("t", raw, seed=3)
    np.testing.assert_array_equal(again.test_negatives, data.test_negatives)
    other = from_interactions("t", raw, seed=4)
    assert not np.array_equal(other.test_negatives, data.test_negatives)


def test_test_negatives_are_uniform_over_unseen_items():
    # User 1 saw items 1..6 of 206; every unseen item should be picked about equally often.
    rows = (
        [(1, i, i) for i in range(1, 7)]
        + [(2, i, i) for i in range(1, 207, 2)]
        + [(3, i, i) for i in range(2, 207, 2)]
    )
    counts = np.zeros(206)
    for seed in range(60):
        data = from_interactions("t", frame(rows), seed=seed)
        row = int(np.flatnonzero(data.user_ids[data.test_users] == 1)[0])
        np.add.at(counts, data.item_ids[data.test_negatives[row]] - 1, 1)
    assert counts[:6].sum() == 0  # never an item the user has seen (held-out item 6 included)
    unseen = counts[6:]
    # 60 draws of 99 from 200 items: 29.7 expected each; chi-square with 199 dof, p ~ 0.001.
    expected = 60 * 99 / 200
    chi2 = ((unseen - expected) ** 2 / expected).sum()
    assert unseen.min() > 0 and chi2 < 270, chi2


def test_repeated_interactions_count_once_and_single_item_users_only_train():
    others = [(u, u, u) for u in range(3, 203)]  # users with one item each: training only
    data = from_interactions("t", frame([(1, 1, 1), (1, 1, 5), (1, 2, 3), (2, 1, 1)] + others))
    assert data.num_users == 202 and len(data.test_users) == 1
    assert data.user_ids[data.test_users[0]] == 1
    # (1, 1) is latest at time 5, so item 1 is held out and item 2 alone trains
    assert data.item_ids[data.test_items[0]] == 1
    train = histories(data)
    assert {int(data.item_ids[i]) for i in train[int(data.test_users[0])]} == {2}
    assert len(data.train_users) == 1 + 1 + 200


@pytest.mark.parametrize(
    "name,text,reader",
    [
        ("u.data", "1\t10\t5\t100\n1\t20\t3\t200\n2\t10\t4\t50\n", read_u_data),
        ("ratings.dat", "1::10::5::100\n1::20::3::200\n2::10::4::50\n", read_ratings_dat),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,10,5.0,100\n1,20,3.5,200\n2,10,4.0,50\n",
            read_ratings_csv,
        ),
    ],
)
def test_raw_readers(tmp_path, name, text, reader):
    path = tmp_path / name
    path.write_text(text)
    out = reader(path)
    assert out.user.tolist() == [1, 1, 2] and out.item.tolist() == [10, 20, 10]
    assert out.timestamp.tolist() == [100, 200, 50]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("u.data", "1\t10\t5\t100\n1\tten\t3\t200\n", "malformed"),
        ("u.data", "1\t10\t5\t100\n1\t20\n", "line 2"),
        ("u.data", "", "no interactions|malformed"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,1.5,3,4\n", "integers"),
    ],
)
def test_malformed_raw_files_give_one_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_folder(tmp_path, "t")


def test_missing_and_unknown_datasets(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope", tmp_path)
    with pytest.raises(DataError, match="make data DATASET=ml-100k"):
        load_dataset("ml-100k", tmp_path)


def write_ncf_split(folder, name="ml-1m", negatives_line=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.train.rating").write_text("0\t0\t5\t1\n0\t1\t4\t2\n1\t2\t3\t3\n1\t0\t3\t4\n")
    (folder / f"{name}.test.rating").write_text("0\t2\t5\t9\n1\t3\t4\t9\n")
    negatives_line = negatives_line or "(0,2)\t3\t4\n(1,3)\t1\t4\n"
    (folder / f"{name}.test.negative").write_text(negatives_line)


def test_ncf_split_reader(tmp_path):
    write_ncf_split(tmp_path / "ml-1m")
    raw = tmp_path / "ml-1m" / "raw"
    raw.mkdir()
    (raw / "ncf_item_map.tsv").write_text("0\t1193\n1\t661\n2\t914\n3\t3408\n4\t2355\n")
    (raw / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n914::Caf\xe9 (1964)::Musical\n".encode(
            "latin-1"
        )
    )
    data = load_dataset("ml-1m", tmp_path)
    assert (data.num_users, data.num_items) == (2, 5)
    assert data.user_ids.tolist() == [1, 2]  # GroupLens UserID = NCF user + 1
    assert data.item_ids.tolist() == [1193, 661, 914, 3408, 2355]
    assert data.item_titles[0].startswith("One Flew") and data.item_titles[2] == "Caf\xe9 (1964)"
    assert data.test_negatives.tolist() == [[3, 4], [1, 4]]
    assert set(data.files) == {
        "ml-1m.train.rating",
        "ml-1m.test.rating",
        "ml-1m.test.negative",
        "raw/ncf_item_map.tsv",
    }


def test_ncf_split_refuses_negatives_out_of_step(tmp_path):
    write_ncf_split(tmp_path / "ml-1m", negatives_line="(0,2)\t3\t4\n(1,2)\t1\t4\n")
    with pytest.raises(DataError, match="do not follow"):
        load_dataset("ml-1m", tmp_path)


def test_demo_is_deterministic_with_a_long_tail():
    a, b = make_demo(), make_demo()
    np.testing.assert_array_equal(a.train_items, b.train_items)
    np.testing.assert_array_equal(a.test_negatives, b.test_negatives)
    popularity = np.sort(np.bincount(a.train_items, minlength=a.num_items))[::-1]
    top_tenth = popularity[: a.num_items // 10].sum() / popularity.sum()
    assert 0.3 < top_tenth < 0.8  # a head, and a tail that still matters
    assert a.item_titles[0].startswith("Demo ")


@pytest.mark.dataset
def test_real_ml1m_split_matches_its_published_counts(data_root):
    if not (data_root / "ml-1m" / "ml-1m.train.rating").is_file():
        pytest.skip("ml-1m not in NCF_DATA_DIR")
    data = load_dataset("ml-1m", data_root)
    assert (data.num_users, data.num_items) == (6040, 3706)
    assert len(data.train_users) == 994169 and len(data.test_users) == 6040
    assert data.test_negatives.shape == (6040, 99)
    assert data.item_titles[data.item_ids.tolist().index(2571)] == "Matrix, The (1999)"


@pytest.mark.dataset
@pytest.mark.parametrize(
    "name,users,items", [("ml-100k", 943, 1682), ("ml-latest-small", 610, 9724)]
)
def test_real_raw_releases(data_root, name, users, items):
    if not (data_root / name).is_dir():
        pytest.skip(f"{name} not in NCF_DATA_DIR")
    data = load_dataset(name, data_root)
    assert (data.num_users, data.num_items) == (users, items)
    assert len(data.test_users) == users
    assert data.item_titles[0] == "Toy Story (1995)"


def test_every_readable_dataset_can_be_downloaded():
    # training/data.py lists what it reads, training/download.py what it fetches: keep them one set.
    from training import download
    from training.data import DATASETS

    assert set(DATASETS) == set(download.NAMES)
