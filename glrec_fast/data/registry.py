"""``load_dataset``: dataset names and paths -> Dataset.

Names resolve under ``GLREC_DATA_DIR`` (else ``~/.cache/glrec_fast/data``, or the ``data_dir``
argument): ``gowalla`` -> ``<dir>/gowalla/{train,test}.txt`` (default split "given"), ``ml-100k`` ->
``<dir>/ml-100k/ml-100k.{inter,item,user}`` (default "random"), ``amazon-beauty`` ->
``<dir>/amazon-beauty/amazon-beauty.{inter,item}`` (default "random"; product titles as item text).
``synthetic`` is generated (default
"cold"). Anything else is a path: a folder with LightGCN ``train.txt``/``test.txt`` (default
"given"), a folder with RecBole atomic files or a ``.inter`` file (default "random", or "given" for
``NAME.{train,valid,test}.inter``), or a CSV/TSV file (default "random"). A DataFrame-like object
(``obj["user"]``, ``obj["item"]``) is accepted too.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from .dataset import DataError, Dataset, DatasetNotFoundError
from .loaders import load_atomic, load_csv, load_frame, load_lightgcn
from .synthetic import make_synthetic

ENV_VAR = "GLREC_DATA_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "glrec_fast", "data")

# name -> (folder, files that must exist, default split, loader)
KNOWN = {
    "gowalla": ("gowalla", ("train.txt", "test.txt"), "given", "lightgcn"),
    "ml-100k": ("ml-100k", ("ml-100k.inter", "ml-100k.item", "ml-100k.user"), "random", "atomic"),
    "amazon-beauty": ("amazon-beauty", ("amazon-beauty.inter", "amazon-beauty.item"), "random", "atomic"),
}
ALIASES = {"ml100k": "ml-100k", "movielens-100k": "ml-100k", "beauty": "amazon-beauty",
           "amazon_beauty": "amazon-beauty"}
_SPLIT_KW = ("ratios", "cold_fraction", "on_unseen", "valid_fraction")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(folder, where it came from) for named datasets."""
    if data_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(data_dir))), "the data_dir argument"
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env)), f"${ENV_VAR}"
    return os.path.abspath(os.path.expanduser(DEFAULT_DIR)), f"the default (${ENV_VAR} is not set)"


def _check_kwargs(kwargs: dict, what: str):
    extra = sorted(set(kwargs) - set(_SPLIT_KW))
    if extra:
        raise TypeError(f"load_dataset({what!r}): unexpected keyword arguments {extra}; only the synthetic "
                        f"dataset takes generator arguments, files take {', '.join(_SPLIT_KW)}")


def _load_path(path: str, split, seed, kwargs) -> Dataset:
    if os.path.isdir(path):
        if all(os.path.isfile(os.path.join(path, f)) for f in ("train.txt", "test.txt")):
            return load_lightgcn(path, split=split or "given", seed=seed, **kwargs)
        if any(f.endswith(".inter") for f in os.listdir(path)):
            return load_atomic(path, split=split, seed=seed, **kwargs)
        raise DataError(f"{path}: expected LightGCN train.txt and test.txt, or RecBole atomic .inter files; "
                        f"found {sorted(os.listdir(path))[:10]}")
    if path.endswith(".inter"):
        return load_atomic(os.path.dirname(os.path.abspath(path)), split=split, seed=seed, **kwargs)
    return load_csv(path, split=split or "random", seed=seed, **kwargs)


def load_dataset(name_or_path="synthetic", split: str | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a dataset by name, path or DataFrame-like object (module docstring).

    ``kwargs``: for "synthetic", make_synthetic's arguments; for files, split options ``ratios``
    (train, valid, test fractions, default (0.8, 0.1, 0.1)), ``cold_fraction`` (default 0.2) and
    ``on_unseen`` ("error" default, or "drop": the given split's unseen test users/items) and
    ``valid_fraction`` (given split: carve a seeded validation set out of train, default 0 = none).
    A name that is not built in is also looked up as a folder under the data folder.
    """
    if isinstance(name_or_path, Mapping) or (hasattr(name_or_path, "columns")
                                             and not isinstance(name_or_path, (str, os.PathLike))):
        _check_kwargs(kwargs, "frame")
        return load_frame(name_or_path, split=split or "random", seed=seed, **kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_dataset: expected a dataset name, a path or a DataFrame-like, got "
                        f"{type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    if ALIASES.get(raw.lower(), raw.lower()) == "synthetic":
        return make_synthetic(split=split or "cold", seed=seed, **kwargs)
    _check_kwargs(kwargs, raw)
    where = locate(name_or_path, data_dir)
    if where[0] == "known":
        _, key, folder = where
        _, _, default_split, kind = KNOWN[key]
        loader = load_lightgcn if kind == "lightgcn" else load_atomic
        return loader(folder, name=key, split=split or default_split, seed=seed, **kwargs)
    return _load_path(where[1], split, seed, kwargs)


def locate(name_or_path, data_dir: str | os.PathLike | None = None) -> tuple:
    """Where a dataset name or path points, without reading it: ``("synthetic",)``,
    ``("known", name, folder)`` or ``("path", path)``. Raises DatasetNotFoundError (naming every
    file looked for and where the data folder came from) when it is not on this machine."""
    raw = os.fspath(name_or_path)
    key = ALIASES.get(raw.lower(), raw.lower())
    if key == "synthetic":
        return ("synthetic",)
    root, source = resolve_data_dir(data_dir)
    if key in KNOWN:
        folder_name, files, _, _ = KNOWN[key]
        folder = os.path.join(root, folder_name)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DatasetNotFoundError(
                f"dataset {key!r} not found: looked for {', '.join(os.path.join(folder, f) for f in missing)} "
                f"(data folder {root} from {source}). Set {ENV_VAR} to a folder that holds {folder_name}/"
                f"{{{','.join(files)}}}, or fetch it once while online with "
                f"glrec_fast.data.download({key!r}) (checks sha256).")
        return ("known", key, folder)
    for path in (os.path.expanduser(raw), os.path.join(root, raw)):
        if os.path.exists(path):
            return ("path", path)
    raise DatasetNotFoundError(
        f"{raw!r} is neither a known dataset ({', '.join(['synthetic', *KNOWN])}) nor an existing path, "
        f"nor a folder under the data folder {root} (from {source}). Set {ENV_VAR}, pass a path, or fetch "
        f"a known dataset while online with glrec_fast.data.download(name).")
