"""Data layer: real datasets, split invariants, id round trips, bad input, synthetic generator."""
import hashlib
import logging
import re

import numpy as np
import pytest
import torch

import glrec_fast
from glrec_fast.data import (DataError, Dataset, DatasetNotFoundError, load_dataset, make_synthetic)
from glrec_fast.data import fetch, loaders, splits, synthetic

from conftest import need_dataset


def pairs(t: torch.Tensor) -> set:
    return set(map(tuple, t.tolist()))


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def assert_split_invariants(ds: Dataset, all_pairs: set | None = None):
    tr, va, te = pairs(ds.train), pairs(ds.valid), pairs(ds.test)
    assert len(tr) == ds.train.size(0) and len(va) == ds.valid.size(0) and len(te) == ds.test.size(0)
    assert not (tr & va) and not (tr & te) and not (va & te)
    if all_pairs is not None:
        assert tr | va | te == all_pairs
    for e in (ds.train, ds.valid, ds.test):
        assert e.dtype == torch.long and e.dim() == 2 and e.size(1) == 2
        if e.numel():
            key = e[:, 0] * ds.num_items + e[:, 1]
            assert bool((key[1:] > key[:-1]).all())          # sorted by (user, item), no duplicates


# ---------------------------------------------------------------------------------------- real data
def test_gowalla_paper_counts():
    folder = need_dataset("gowalla")
    ds = load_dataset("gowalla")
    assert (ds.name, ds.split) == ("gowalla", "given")
    assert (ds.num_users, ds.num_items) == (29_858, 40_981)
    assert ds.train.shape == (810_128, 2) and ds.test.shape == (217_242, 2) and ds.valid.shape == (0, 2)
    assert_split_invariants(ds)
    # Gowalla's ids are already contiguous, so the mapping is the identity; check line 3 by hand.
    assert np.array_equal(ds.user_ids, np.arange(29_858)) and np.array_equal(ds.item_ids, np.arange(40_981))
    line = (folder / "train.txt").read_text().splitlines()[2].split()
    u = int(line[0])
    assert sorted(ds.train[ds.train[:, 0] == ds.user_index(u), 1].tolist()) == sorted(map(int, line[1:]))
    assert ds.item_text is None
    assert "29,858 users" in ds.summary() and "test 217,242" in ds.summary()


def test_ml100k_loads_with_text():
    need_dataset("ml-100k")
    ds = load_dataset("ml-100k")
    assert ds.split == "random" and (ds.num_users, ds.num_items) == (943, 1682)
    n = ds.train.size(0) + ds.valid.size(0) + ds.test.size(0)
    assert n == 100_000
    star_wars = int(ds.item_index(50))
    assert ds.item_text[star_wars] == "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War"
    assert ds.item_fields["movie_title"][star_wars] == "Star Wars"
    assert ds.user_text[int(ds.user_index(1))] == "A 24-year-old male technician."
    assert ds.user_text[int(ds.user_index(2))] == "A 53-year-old female, occupation: other."
    assert all(ds.item_text) and len(ds.item_text) == 1682
    # The given-split contract for this file: one .inter, so "given" is refused clearly.
    with pytest.raises(DataError, match="no given split"):
        load_dataset("ml-100k", split="given")


def test_amazon_beauty_loads_by_name_with_titles():
    need_dataset("amazon-beauty")
    ds = load_dataset("amazon-beauty")
    assert ds.split == "random" and (ds.num_users, ds.num_items) == (22363, 12101)
    assert ds.train.size(0) + ds.valid.size(0) + ds.test.size(0) == 198_502
    first = int(ds.item_index(1))
    assert ds.item_text[first].startswith("OPI Nail Lacquer, Simmer and Shimmer")
    assert len(ds.item_text) == 12101
    assert load_dataset("beauty", split="random").num_items == 12101   # alias


def test_ml100k_random_split_invariants_and_seed():
    need_dataset("ml-100k")
    a = load_dataset("ml-100k", split="random", seed=3)
    b = load_dataset("ml-100k", split="random", seed=3)
    c = load_dataset("ml-100k", split="random", seed=4)
    assert_split_invariants(a)
    for x, y in ((a.train, b.train), (a.valid, b.valid), (a.test, b.test)):
        assert torch.equal(x, y)
    assert not torch.equal(a.test, c.test)
    assert pairs(a.train) | pairs(a.valid) | pairs(a.test) == pairs(c.train) | pairs(c.valid) | pairs(c.test)
    n = 100_000
    # Every ml-100k user has >= 20 ratings, so per-user rounding keeps the global shares near 80/10/10.
    assert abs(a.train.size(0) / n - 0.8) < 0.01 and abs(a.test.size(0) / n - 0.1) < 0.01
    # Per-user quotas are exact: round-half-up of 10% each.
    cnt = torch.bincount(torch.cat([a.train, a.valid, a.test])[:, 0], minlength=a.num_users)
    want = torch.floor(cnt * 0.1 + 0.5).long()
    assert torch.equal(torch.bincount(a.test[:, 0], minlength=a.num_users), want)
    assert torch.equal(torch.bincount(a.valid[:, 0], minlength=a.num_users), want)


def test_ml100k_cold_split():
    need_dataset("ml-100k")
    ds = load_dataset("ml-100k", split="cold", seed=0)
    assert_split_invariants(ds)
    cold = set(ds.cold_items.tolist())
    assert len(cold) == round(0.2 * 1682)
    assert not cold & set(ds.train[:, 1].tolist())
    held = set(ds.valid[:, 1].tolist()) | set(ds.test[:, 1].tolist())
    assert cold <= held
    # Validation-cold and test-cold items are disjoint halves; each keeps all its interactions in one split.
    valid_cold = set(ds.valid[torch.isin(ds.valid[:, 1], ds.cold_items), 1].tolist())
    test_cold = set(ds.test[torch.isin(ds.test[:, 1], ds.cold_items), 1].tolist())
    assert not valid_cold & test_cold and valid_cold | test_cold == cold
    assert len(valid_cold) == len(cold) // 2
    other = load_dataset("ml-100k", split="cold", seed=1)
    assert set(other.cold_items.tolist()) != cold
    # Warm interactions: 80/10/10 per user.
    warm_mask = lambda e: ~torch.isin(e[:, 1], ds.cold_items)  # noqa: E731
    n_warm = sum(int(warm_mask(e).sum()) for e in (ds.train, ds.valid, ds.test))
    assert abs(ds.train.size(0) / n_warm - 0.8) < 0.01
    again = load_dataset("ml-100k", split="cold", seed=0)
    assert torch.equal(again.test, ds.test) and torch.equal(again.cold_items, ds.cold_items)


def test_downloads_expected_hashes_match_the_project_files():
    for name, files in fetch.SHA256.items():
        folder = need_dataset(name)
        for fname, want in files.items():
            assert hashlib.sha256((folder / fname).read_bytes()).hexdigest() == want, fname


def test_ml100k_conversion_reproduces_the_atomic_files(tmp_path):
    """Rebuild GroupLens-format u.data/u.item/u.user from the atomic files (the inverse of the
    conversion, with ml-100k's quirks: item 267 titled "unknown", item 1412's "(1995) (V)"), convert
    back and check the sha256 download() would check."""
    folder = need_dataset("ml-100k")
    inter = (folder / "ml-100k.inter").read_text().splitlines()[1:]
    u_data = "\n".join(inter) + "\n"
    items = []
    for line in (folder / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]:
        iid, title, year, genres = line.split("\t")
        flags = "|".join("1" if g in genres.split() else "0" for g in fetch.ML100K_GENRES)
        raw_title = "unknown" if title == "unkonwn" else f"{title} ({year})"
        items.append(f"{iid}|{raw_title}|01-Jan-{year}||http://us.imdb.com/|{flags}")
    users = ["|".join(l.split("\t")) for l in (folder / "ml-100k.user").read_text().splitlines()[1:]]
    raw = {"u.data": u_data.encode(), "u.item": ("\n".join(items) + "\n").encode("latin-1"),
           "u.user": ("\n".join(users) + "\n").encode("latin-1")}
    fetch.convert_ml100k(raw, tmp_path)
    fetch.verify(tmp_path, "ml-100k")
    (tmp_path / "ml-100k.user").write_text("user_id:token\n1\n")
    with pytest.raises(DataError, match=r"ml-100k\.user: sha256 .* does not match"):
        fetch.verify(tmp_path, "ml-100k")


# ---------------------------------------------------------------------------------------- registry
def test_missing_dataset_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("GLREC_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("gowalla")
    msg = str(e.value)
    assert str(tmp_path / "gowalla" / "train.txt") in msg and "GLREC_DATA_DIR" in msg
    assert "glrec_fast.data.download('gowalla')" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    monkeypatch.delenv("GLREC_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))            # the default folder is under ~
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("ml-100k")
    assert str(tmp_path / "home" / ".cache" / "glrec_fast" / "data" / "ml-100k") in str(e.value)
    assert "$GLREC_DATA_DIR is not set" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="neither a known dataset"):
        load_dataset("no-such-dataset", data_dir=tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_dataset("gowalla", num_users=3)


def test_public_api_exports():
    assert glrec_fast.load_dataset is load_dataset and glrec_fast.Dataset is Dataset
    assert "load_dataset" in glrec_fast.__all__ and "Dataset" in glrec_fast.__all__
    from glrec_fast.data import download
    assert callable(download)


# ---------------------------------------------------------------------------------------- formats
def test_lightgcn_fast_parser_matches_a_plain_parse(tmp_path):
    text = "3 10 11\t12\r\n\n7   11 \n5\n3 13\n  9 10 10\n"
    folder = tmp_path / "lg"
    folder.mkdir()
    write(folder / "train.txt", text)
    part = loaders.read_lightgcn(folder / "train.txt")
    ref = loaders.read_lightgcn_reference(folder / "train.txt")
    got = list(zip(part.users.tolist(), part.items.tolist(), part.lines.tolist()))
    assert got == list(zip(ref.users.tolist(), ref.items.tolist(), ref.lines.tolist()))
    assert got[:3] == [(3, 10, 1), (3, 11, 1), (3, 12, 1)] and got[-1] == (9, 10, 6) and len(got) == 7


def test_id_round_trip_csv(tmp_path):
    rows = [(100, 5000), (7, 3), (42, 5000), (7, 5000), (100, 3), (42, 77)]
    f = write(tmp_path / "x.csv", "user,item,rating\n" + "".join(f"{u},{i},4.5\n" for u, i in rows))
    ds = load_dataset(f, split="random", seed=0)
    assert ds.user_ids.tolist() == [7, 42, 100] and ds.item_ids.tolist() == [3, 77, 5000]
    all_e = torch.cat([ds.train, ds.valid, ds.test])
    back = {(int(ds.user_ids[u]), int(ds.item_ids[i])) for u, i in all_e.tolist()}
    assert back == set(rows)
    assert ds.user_index([100, 7]).tolist() == [2, 0] and int(ds.item_index(77)) == 1
    assert ds.original_items(torch.tensor([2, 0])).tolist() == [5000, 3]
    with pytest.raises(DataError, match=r"\[8\] are not in dataset"):
        ds.user_index(8)
    # No header, tab-separated, 2 columns.
    g = write(tmp_path / "y.tsv", "".join(f"{u}\t{i}\n" for u, i in rows))
    assert load_dataset(g).user_ids.tolist() == [7, 42, 100]


def test_atomic_string_tokens_and_given_split(tmp_path):
    d = tmp_path / "shop"
    d.mkdir()
    head = "user_id:token\titem_id:token\ttimestamp:float\n"
    write(d / "shop.train.inter", head + "alice\tB01\t1\nbob\tB01\t2\nbob\t007\t3\nalice\t7\t4\n")
    write(d / "shop.valid.inter", head + "alice\t007\t5\n")
    write(d / "shop.test.inter", head + "bob\t7\t6\n")
    write(d / "shop.item", "item_id:token\ttitle:token_seq\tbrand:token\n7\tSeven\tAcme\n007\tBond\tMI6\nZZZ\tUnused\tX\n")
    ds = load_dataset(d)
    assert ds.split == "given"
    assert ds.user_ids.tolist() == ["alice", "bob"]
    assert ds.item_ids.tolist() == ["007", "7", "B01"]          # "007" and "7" stay distinct tokens
    assert pairs(ds.valid) == {(0, 0)} and pairs(ds.test) == {(1, 1)}
    assert ds.item_text == ["Bond. Brand: MI6", "Seven. Brand: Acme", ""]
    assert ds.item_fields["title"] == ["Bond", "Seven", None]


def test_frame_like_input():
    ds = load_dataset({"user": np.array([1, 1, 2, 2, 2, 2, 2]), "item": np.array([9, 8, 9, 7, 6, 5, 4])},
                      split="random", seed=1)
    assert ds.name == "frame" and ds.num_users == 2 and ds.num_items == 6
    # User 2 has 5 interactions: exactly 1 valid, 1 test; user 1 has 2: all train.
    assert ds.valid[:, 0].tolist() == [1] and ds.test[:, 0].tolist() == [1]
    assert (ds.train[:, 0] == 0).sum() == 2


# ---------------------------------------------------------------------------------------- splits
def test_random_split_per_user_rule():
    n_per_user = [1, 4, 5, 10, 15, 25]
    edges = np.array([(u, i) for u, n in enumerate(n_per_user) for i in range(n)], dtype=np.int64)
    tr, va, te = splits.split_random(edges, len(n_per_user), 30, rng=0)
    got = [(int((tr[:, 0] == u).sum()), int((va[:, 0] == u).sum()), int((te[:, 0] == u).sum()))
           for u in range(len(n_per_user))]
    assert got == [(1, 0, 0), (4, 0, 0), (3, 1, 1), (8, 1, 1), (11, 2, 2), (19, 3, 3)]
    tr2, _, te2 = splits.split_random(edges[::-1].copy(), len(n_per_user), 30, rng=0)
    assert np.array_equal(te, te2)             # input order does not matter, only the seed
    # Larger ratios that would leave no train interaction: the user keeps everything in train.
    tr, va, te = splits.split_random(np.array([[0, 0], [0, 1]]), 1, 2, ratios=(0.4, 0.3, 0.3), rng=0)
    assert len(tr) == 2 and len(va) == len(te) == 0
    with pytest.raises(DataError, match="ratios"):
        splits.split_random(edges, 6, 30, ratios=(0.5, 0.1, 0.1))


def test_random_split_is_uniform_within_a_user():
    # Over many seeds each of a user's 10 interactions lands in test ~10% of the time.
    edges = np.array([(0, i) for i in range(10)], dtype=np.int64)
    hits = np.zeros(10)
    for s in range(2000):
        hits[splits.split_random(edges, 1, 10, rng=s)[2][:, 1]] += 1
    assert np.all(np.abs(hits / 2000 - 0.1) < 0.025)


# ---------------------------------------------------------------------------------------- bad input
def lgcn(tmp_path, train: str, test: str = "0 1\n"):
    d = tmp_path / "lg"
    d.mkdir(parents=True, exist_ok=True)
    write(d / "train.txt", train)
    write(d / "test.txt", test)
    return d


@pytest.mark.parametrize("train, line, what", [
    ("0 1 2\n1 2 x3\n", 2, "non-integer id 'x3'"),
    ("0 1 2\n\n1 -3 4\n", 3, "negative id '-3'"),
    ("0 1 2.5\n", 1, "non-integer id '2.5'"),
    ("0 1,2\n", 1, "non-integer id '1,2'"),
    ("0 1 1234567890123456789012\n", 1, "id '1234567890123456789012' has more than 18 digits"),
])
def test_lightgcn_bad_ids(tmp_path, train, line, what):
    d = lgcn(tmp_path, train)
    with pytest.raises(DataError, match=re.escape(f"train.txt:{line}: {what}")):
        load_dataset(d)


def test_lightgcn_empty_file(tmp_path):
    d = lgcn(tmp_path, "0 1\n", test="\n  \n")
    with pytest.raises(DataError, match=r"test\.txt: file is empty"):
        load_dataset(d)


def test_given_split_unseen_test_item(tmp_path, caplog):
    d = lgcn(tmp_path, "0 1 2\n1 2\n", test="1 1\n1 9 1\n")
    with pytest.raises(DataError, match=r"test\.txt:2: test item 9 never appears in the training file"):
        load_dataset(d)
    d2 = lgcn(tmp_path / "u", "0 1 2\n", test="0 2\n5 1\n")
    with pytest.raises(DataError, match=r"test\.txt:2: test user 5 never appears"):
        load_dataset(d2)
    with caplog.at_level(logging.WARNING, logger="glrec_fast.data"):
        ds = load_dataset(d, on_unseen="drop")
    assert "dropped 1 test interactions" in caplog.text
    assert ds.num_items == 2 and ds.stats["unseen_dropped"] == 1
    assert "test.txt: 1 duplicate interactions" in caplog.text       # the second (1, 1)
    assert [(int(ds.user_ids[u]), int(ds.item_ids[i])) for u, i in ds.test.tolist()] == [(1, 1)]


def test_duplicates_kept_once_and_logged(tmp_path, caplog):
    d = lgcn(tmp_path, "0 1 2 1 3\n1 2\n1 2\n", test="0 3 3\n1 1\n")
    with caplog.at_level(logging.WARNING, logger="glrec_fast.data"):
        ds = load_dataset(d)
    assert "train.txt: 2 duplicate interactions, each kept once" in caplog.text
    assert "test.txt: 1 duplicate interactions, each kept once" in caplog.text
    assert ds.stats["duplicates_dropped"] == 3
    assert pairs(ds.train) == {(0, 0), (0, 1), (0, 2), (1, 1)}
    # (0, 3) is in train and in test: dropped from test (it would be masked at evaluation), logged.
    assert "also appear in an earlier part" in caplog.text and ds.stats["test_overlap_dropped"] == 1
    assert pairs(ds.test) == {(1, 0)}


@pytest.mark.parametrize("text, line, what", [
    ("user,item\n1,2\n3,4,5\n", 3, "malformed line '3,4,5': found 3 ','-separated fields, expected 2"),
    ("1,2\n3,abc\n", 2, "non-integer id 'abc' in the item column"),
    ("user,item,rating\n1,2,4\n-1,2,3\n", 3, "negative id '-1' in the user column"),
    ("1,2,4.0\n1,3,good\n", 2, "rating 'good' is not a number"),
    ("1,2\n1,\n", 2, "empty id in the item column"),
    ("uid,product\n1,2\n", 1, "header ['uid', 'product'] has no user and item columns"),
    ("1,2,3,4,5\n", 1, "5 columns without a header"),
])
def test_csv_bad_input(tmp_path, text, line, what):
    f = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=re.escape(f"bad.csv:{line}: {what}")):
        load_dataset(f)


def test_csv_empty_and_header_only(tmp_path):
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        load_dataset(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataError, match=r"head\.csv: no data rows after the header"):
        load_dataset(write(tmp_path / "head.csv", "user,item\n"))


@pytest.mark.parametrize("inter, line, what", [
    ("user_id\titem_id:token\n1\t2\n", 1, "header field 'user_id' is not 'name:type'"),
    ("user_id:token\tmovie:token\n1\t2\n", 1, "expected a 'item_id:token' field in the header"),
    ("user_id:token\titem_id:token\n1\t2\n1\t2\t3\n", 3, "malformed line"),
    ("user_id:token\titem_id:token\trating:float\n1\t2\t5\n1\t3\tfive\n", 3, "field 'rating' (float) 'five' is not a number"),
    ("user_id:token\titem_id:token\n1\t2\n\t3\n", 3, "empty user_id"),
    ("user_id:token\titem_id:token\n", 0, "no data rows after the header line"),
])
def test_atomic_bad_input(tmp_path, inter, line, what):
    d = tmp_path / "at"
    d.mkdir()
    write(d / "at.inter", inter)
    where = f"at.inter:{line}: " if line else "at.inter: "
    with pytest.raises(DataError, match=re.escape(where + what)):
        load_dataset(d)


def test_frame_bad_input():
    with pytest.raises(DataError, match=r"frame\['item'\] row 1: negative id -4"):
        load_dataset({"user": [1, 2], "item": [3, -4]})
    with pytest.raises(DataError, match=r"frame\['user'\] row 0: non-integer id 1.5"):
        load_dataset({"user": np.array([1.5, 2.0]), "item": [3, 4]})
    with pytest.raises(DataError, match=r"frame: expected a 'item' column"):
        load_dataset({"user": [1]})


def test_bad_split_name(tmp_path):
    f = write(tmp_path / "x.csv", "1,2\n")
    with pytest.raises(DataError, match="split='temporal': expected one of given, random, cold"):
        load_dataset(f, split="temporal")
    with pytest.raises(DataError, match=r"no given split \(one interaction file"):
        load_dataset(f, split="given")


# ---------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def syn():
    return make_synthetic(num_users=2000, num_items=1000, num_interactions=50_000, seed=0)


def test_synthetic_size_and_cold_items(syn):
    assert (syn.num_users, syn.num_items, syn.split) == (2000, 1000, "cold")
    all_e = torch.cat([syn.train, syn.valid, syn.test])
    assert all_e.size(0) == 50_000 and len(pairs(all_e)) == 50_000
    assert_split_invariants(syn)
    assert syn.cold_items.numel() == 200
    assert not torch.isin(syn.train[:, 1], syn.cold_items).any()
    n_all, n_va, n_te = (torch.bincount(e[:, 1], minlength=1000)[syn.cold_items]
                         for e in (all_e, syn.valid, syn.test))
    # Each cold item sits wholly in valid or wholly in test, half of them each (disjoint cold sets).
    assert torch.equal(n_te + n_va, n_all) and bool(((n_te == 0) | (n_va == 0)).all())
    assert int((n_va > 0).sum()) == 100
    assert (n_all > 0).float().mean() > 0.9
    assert len(syn.item_text) == 1000 and syn.user_ids.tolist() == list(range(2000))
    small = make_synthetic(num_users=50, num_items=40, num_interactions=30, seed=1, split="random")
    assert sum(e.size(0) for e in (small.train, small.valid, small.test)) == 30 and small.cold_items is None


def test_synthetic_power_law_popularity(syn):
    all_e = torch.cat([syn.train, syn.valid, syn.test])
    counts = torch.bincount(all_e[:, 1], minlength=syn.num_items).sort(descending=True).values
    assert counts[:200].sum() / counts.sum() > 0.5          # top 20% of items hold most interactions
    flat = make_synthetic(num_users=2000, num_items=1000, num_interactions=50_000, seed=0, popularity_exponent=0.0)
    c0 = torch.bincount(torch.cat([flat.train, flat.valid, flat.test])[:, 1], minlength=1000)
    assert c0.sort(descending=True).values[:200].sum() / c0.sum() < counts[:200].sum() / counts.sum() - 0.1


def test_synthetic_text_states_the_attributes(syn):
    for attr, values in synthetic.ATTRIBUTES.items():
        for v in values:
            word = v.split()[-1]                      # "a coastal town" -> "town"
            has = np.array([x == v for x in syn.item_fields[attr]])
            mentions = np.array([re.search(rf"\b{re.escape(word)}\b", t) is not None for t in syn.item_text])
            assert has.any() and np.array_equal(has, mentions), (attr, v)


def test_synthetic_text_carries_taste_signal(syn):
    """A user's most frequent training genre predicts the genre of their test items well above that
    genre's overall share: the text's words track what users like."""
    genre = np.array(syn.item_fields["genre"])
    tr, te = syn.train.numpy(), syn.test.numpy()
    share = {g: (genre[tr[:, 1]] == g).mean() for g in synthetic.GENRES}
    hit, base = [], []
    for u in range(syn.num_users):
        a, b = genre[tr[tr[:, 0] == u, 1]], genre[te[te[:, 0] == u, 1]]
        if len(a) >= 5 and len(b):
            vals, c = np.unique(a, return_counts=True)
            top = vals[c.argmax()]
            hit.append((b == top).mean())
            base.append(share[top])
    assert np.mean(hit) > 1.5 * np.mean(base)


def test_synthetic_sampler_is_exact():
    """Empirical item frequencies of the vectorised sampler match the dense softmax x popularity."""
    rng = np.random.default_rng(5)
    m = synthetic.latent_model(4, 97, 8, 1.0, 2.0, rng)
    n = 100_000
    u, i = synthetic._draw(rng, np.arange(4), np.full(4, n), m.user_f, m.group_f, m.log_group_pop, m.scale,
                           m.item_key, m.items_by_group)
    p = m.probabilities(np.arange(4))
    ru, ri = synthetic.draw_reference(m, np.arange(4), np.full(4, n), rng)
    for r in range(4):
        tol = 5 * np.sqrt(p[r] * (1 - p[r]) / n) + 1e-4
        assert np.all(np.abs(np.bincount(i[u == r], minlength=97) / n - p[r]) < tol)
        assert np.all(np.abs(np.bincount(ri[ru == r], minlength=97) / n - p[r]) < tol)


def test_synthetic_seed_determinism_and_validation():
    a = make_synthetic(num_users=300, num_items=200, num_interactions=4000, seed=7)
    b = make_synthetic(num_users=300, num_items=200, num_interactions=4000, seed=7)
    c = make_synthetic(num_users=300, num_items=200, num_interactions=4000, seed=8)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test) and a.item_text == b.item_text
    assert not torch.equal(a.train, c.train)
    assert torch.equal(load_dataset("synthetic", seed=7, num_users=300, num_items=200,
                                    num_interactions=4000).test, a.test)
    with pytest.raises(DataError, match="exceeds num_users \\* num_items"):
        make_synthetic(num_users=3, num_items=3, num_interactions=10)
    with pytest.raises(DataError, match="no given split"):
        make_synthetic(split="given")
