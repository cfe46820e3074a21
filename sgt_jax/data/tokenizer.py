"""The Qwen2 tokenizer (from a checkpoint directory, through transformers) with BAGEL's four
special tokens, and a tiny locally-built byte-level BPE tokenizer in the same format for tests and
the CPU preset (no hub access anywhere: everything is read from local files).

BAGEL (data_utils.add_special_tokens) makes sure ``<|im_start|> <|im_end|> <|vision_start|>
<|vision_end|>`` exist and uses them as bos / eos / start_of_image / end_of_image; text is encoded
with ``tokenizer.encode(text)`` (Qwen2 adds no BOS/EOS itself) and wrapped by the packer.

``Tokenizer`` loads lazily and pickles as its path, so Grain worker processes load their own copy.
A URL path (``gs://...``, any fsspec URL) is copied to local disk first (``local_copy``: once per
process, into ``fileio.local_cache_dir('tokenizers')``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable

from sgt_jax import fileio

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
ENDOFTEXT = "<|endoftext|>"
_LOAD_LOCK = threading.Lock()      # transformers' lazy imports are not thread-safe
# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer uses)
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


_COPIES: dict[str, str] = {}      # URL -> local copy, this process
_COPY_LOCK = threading.Lock()


def local_copy(url: str) -> str:
    """A local directory holding the files of the tokenizer directory ``url`` (its files, not
    subdirectories: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, ... -- a few
    MB). Downloaded once per process into ``local_cache_dir('tokenizers')/<key of url>/<sha1 of
    the contents>``: content-addressed, so a changed tokenizer never mixes with an old copy and
    concurrent processes never overwrite each other's. Raises FileNotFoundError for a URL with no
    files."""
    with _COPY_LOCK:
        if url in _COPIES and os.path.isdir(_COPIES[url]):
            return _COPIES[url]
        names = [n for n in fileio.listdir(url) if fileio.isfile(fileio.join(url, n))]
        if not names:
            raise FileNotFoundError(
                f"tokenizer directory {url!r} does not exist or holds no files: point "
                "data.tokenizer_path at a Qwen2 tokenizer dir (e.g. the tokenizer/ of an imported "
                "model dir: tokenizer.json / vocab.json + merges.txt, tokenizer_config.json)")
        base = fileio.local_cache_dir("tokenizers", fileio.url_key(url))
        tmp = os.path.join(base, f".tmp{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        digest = hashlib.sha1()
        for n in sorted(names):
            data = fileio.read_bytes(fileio.join(url, n))
            digest.update(f"{n}|{len(data)}|".encode())
            digest.update(data)
            with open(os.path.join(tmp, n), "wb") as f:
                f.write(data)
        final = os.path.join(base, digest.hexdigest()[:24])
        try:
            os.rename(tmp, final)
        except OSError:                  # already there (same contents): keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        _COPIES[url] = final
        return final


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int        # <|im_start|>
    eos_token_id: int        # <|im_end|>
    start_of_image: int      # <|vision_start|>
    end_of_image: int        # <|vision_end|>

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Tokenizer:
    """A transformers tokenizer read from ``path`` (``AutoTokenizer``, local files only)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._tok = None
        self._special: SpecialTokens | None = None
        self.num_new_tokens = 0

    def _load(self):
        if self._tok is not None:
            return
        with _LOAD_LOCK:
            if self._tok is None:
                self._load_locked()

    def _load_locked(self):
        path = local_copy(self.path) if fileio.is_remote(self.path) else self.path
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer directory {self.path!r} does not exist: point data.tokenizer_path at a Qwen2 "
                "checkpoint dir (tokenizer.json / vocab.json + merges.txt), or build a tiny one with "
                "sgt_jax.data.tokenizer.build_tiny_tokenizer(dir)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
        if missing:   # BAGEL's add_special_tokens
            self.num_new_tokens = tok.add_special_tokens({"additional_special_tokens": missing})
        ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
        self._special = SpecialTokens(*ids)
        self._tok = tok

    @property
    def special(self) -> SpecialTokens:
        self._load()
        return self._special

    @property
    def vocab_size(self) -> int:
        """Number of ids (incl. added tokens): the model's vocab_size must be >= this."""
        self._load()
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        self._load()
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        self._load()
        return self._tok.decode(list(ids))

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r})"


def load_tokenizer(path: str) -> Tokenizer:
    tok = Tokenizer(path)
    tok._load()
    return tok


def _default_corpus() -> list[str]:
    from sgt_jax.data.instructions import RECON_INSTRUCTIONS, SEGMENT_INSTRUCTIONS

    words = ("red green blue yellow orange purple pink brown black white gray cyan magenta circle "
             "square triangle rectangle ellipse star shape shapes object objects left right top bottom "
             "above below how many is there are the a an of in on to what color which one yes no "
             "image picture scene count number zero one two three four five six seven eight nine ten")
    lines = list(SEGMENT_INSTRUCTIONS) + list(RECON_INSTRUCTIONS) + [words]
    lines += [f"How many {c} {s}s are there? There are {n}." for c in words.split()[:12]
              for s in ("circle", "square", "triangle") for n in range(10)]
    lines += ["Is the red circle left of the blue square? Yes.", "What color is the triangle? Green.",
              "The quick brown fox jumps over the lazy dog. 0123456789 .,;:!?'\"()[]{}<>-+*/=_"]
    return lines


def build_tiny_tokenizer(out_dir: str, texts: Iterable[str] | None = None, vocab_size: int = 512) -> str:
    """Train a byte-level BPE tokenizer (Qwen2's normalizer / pre-tokenizer / decoder) on ``texts``
    (default: the instruction lists and a small VQA vocabulary), add ``<|endoftext|>`` and the four
    special tokens, and save it in HF format (tokenizer.json + tokenizer_config.json, class
    ``Qwen2Tokenizer``) so that ``Tokenizer(out_dir)`` / ``AutoTokenizer`` read it like a real
    Qwen2 checkpoint. At most ``vocab_size`` ids (fewer if the corpus has fewer merges); the
    special tokens are the last five ids. Returns ``out_dir``."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = [ENDOFTEXT, *SPECIAL_TOKENS]
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} < {len(alphabet) + len(specials)} (256 bytes + 5 specials)")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), initial_alphabet=alphabet,
                                  special_tokens=[], show_progress=False, min_frequency=1)
    tok.train_from_iterator(list(texts) if texts is not None else _default_corpus(), trainer=trainer)
    tok.add_special_tokens(specials)

    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                 unk_token=None, additional_special_tokens=list(SPECIAL_TOKENS))
    hf.save_pretrained(out_dir)
    # Make it look like a Qwen2 checkpoint's tokenizer, readable by the slow Qwen2Tokenizer too
    # (BAGEL's loaders use it, with transformers 4.49): vocab.json + merges.txt beside
    # tokenizer.json, and tokenizer_config.json in the classic layout (added_tokens_decoder,
    # additional_special_tokens). transformers 5 writes `extra_special_tokens` as a list, which 4.x
    # reads as a name -> token dict and fails on.
    tok.model.save(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    if isinstance(tcfg.get("extra_special_tokens"), list):
        tcfg.pop("extra_special_tokens")
    tcfg.pop("backend", None)
    tcfg["additional_special_tokens"] = list(SPECIAL_TOKENS)
    tcfg["added_tokens_decoder"] = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True} for t in specials}
    tcfg.setdefault("bos_token", None)
    tcfg.setdefault("clean_up_tokenization_spaces", False)
    tcfg.setdefault("errors", "replace")
    tcfg.setdefault("split_special_tokens", False)
    tcfg["tokenizer_class"] = "Qwen2Tokenizer"
    with open(cfg_path, "w") as f:
        json.dump(tcfg, f, indent=2)
    return out_dir
