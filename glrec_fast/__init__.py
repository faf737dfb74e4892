"""glrec_fast: graph + language-model recommendation with context-aware gated fusion.

    import glrec_fast as gl
    ds = gl.load_dataset("ml-100k", split="random", seed=0)
    g = gl.BipartiteGraph.from_interactions(ds.train, ds.num_users, ds.num_items)
    out = gl.ops.propagate(g, x, num_layers=3)
"""
from . import ops, reference
from .graph import (ITEM_COLD, ITEM_HEAD, ITEM_TAIL, USER_COLD, USER_WARM, BipartiteGraph)
from .data import Dataset, load_dataset
from .grokking import GrokkingMonitor
from .models.filters import GraphFilter
from .models.hybrid import FusedHybridRec, ScoreFusion
from .models.score_hybrid import ScoreHybrid


def recommend(checkpoint_path, user_ids, k: int = 20, **kwargs):
    """Top-``k`` original item ids per original user id from a best.pt (``train.recommend``).

    Imported on call: importing ``glrec_fast.train`` with the package makes ``python -m
    glrec_fast.train`` warn that the module was already in ``sys.modules``."""
    from .train import recommend as _recommend
    return _recommend(checkpoint_path, user_ids, k, **kwargs)


__version__ = "0.1.0"

__all__ = ["ops", "reference", "Dataset", "load_dataset", "GrokkingMonitor", "FusedHybridRec", "ScoreFusion", "ScoreHybrid",
           "GraphFilter",
           "recommend",
           "BipartiteGraph", "ITEM_COLD", "ITEM_HEAD", "ITEM_TAIL", "USER_COLD",
           "USER_WARM", "__version__"]
