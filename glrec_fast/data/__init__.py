"""Datasets: loaders (LightGCN text, RecBole atomic, CSV, DataFrame-like), splits, synthetic data.

    from glrec_fast.data import load_dataset
    ds = load_dataset("gowalla")                 # the paper's split; GLREC_DATA_DIR/gowalla/*.txt
    ds = load_dataset("ml-100k", split="cold")   # 20% of items held out of train
    ds = load_dataset("synthetic", num_users=2000, num_items=1000, num_interactions=50_000)
    print(ds.summary())

See loaders.py for the formats and the rules on duplicates and unseen ids, splits.py for the split
rules, synthetic.py for the generator and fetch.py for ``download``.
"""
from .dataset import DataError, Dataset, DatasetNotFoundError
from .fetch import download
from .loaders import load_atomic, load_csv, load_frame, load_lightgcn
from .registry import load_dataset, resolve_data_dir
from .splits import split_cold, split_random
from .synthetic import make_synthetic

__all__ = ["Dataset", "DataError", "DatasetNotFoundError", "load_dataset", "make_synthetic", "download",
           "load_lightgcn", "load_atomic", "load_csv", "load_frame", "split_random", "split_cold",
           "resolve_data_dir"]
