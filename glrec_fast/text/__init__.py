"""The language branch: item/user text -> content vectors.

    from glrec_fast.text import get_encoder, encode_items, user_vectors
    enc = get_encoder("auto")                    # Qwen2.5-3B NF4 on CUDA when local, else MiniLM
    item_vecs = encode_items(ds, enc)            # [num_items, enc.dim] float32 CPU, disk-cached
    user_vecs = user_vectors(item_vecs, ds.train, ds.num_users)

transformers (and bitsandbytes + accelerate for Qwen) are imported only when an encoder is built,
so ``import glrec_fast`` stays light.
"""
from .cache import VectorCache, default_cache_dir, text_hash
from .encoders import (ENCODER_NAMES, MINILM_NAME, PLACEHOLDER_TEXT, QWEN_HUB_ID, QWEN_NAME,
                       HFTextEncoder, QwenEncoder, TextEncoder, check_texts, get_encoder,
                       last_token_pool, mean_pool, minilm_model_dir)
from .prompts import DEFAULT_PROMPT, build_item_text, build_prompt, format_item
from .vectors import encode_items, encode_users, user_vectors

__all__ = ["get_encoder", "encode_items", "encode_users", "user_vectors", "build_item_text",
           "build_prompt", "format_item", "TextEncoder", "HFTextEncoder", "QwenEncoder",
           "VectorCache", "default_cache_dir", "text_hash", "check_texts", "mean_pool",
           "last_token_pool", "minilm_model_dir", "ENCODER_NAMES", "MINILM_NAME", "QWEN_NAME",
           "QWEN_HUB_ID", "DEFAULT_PROMPT", "PLACEHOLDER_TEXT"]
