"""Models: MF-BPR, LightGCN, GraphSAGE and the fused hybrid."""
from .base import Recommender, bpr_loss
from .lightgcn import LightGCN
from .mf import MF

__all__ = ["Recommender", "bpr_loss", "MF", "LightGCN"]
