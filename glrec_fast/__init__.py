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
from .train import recommend

__version__ = "0.1.0"

__all__ = ["ops", "reference", "Dataset", "load_dataset", "GrokkingMonitor", "FusedHybridRec", "ScoreFusion", "GraphFilter",
           "recommend",
           "BipartiteGraph", "ITEM_COLD", "ITEM_HEAD", "ITEM_TAIL", "USER_COLD",
           "USER_WARM", "__version__"]
