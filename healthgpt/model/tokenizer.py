"""Text tokenizer and the generation vocabulary.

HealthGPT appends 8195 tokens to the LLM's tokenizer: ``<start_index>``, ``<idx_0>`` ..
``<idx_8191>`` (one per VQ code), ``<end_index>``, ``<pixel_newline>`` (M3: 32011 -> 40206 tokens).
The embedding and lm_head rows of the new tokens start at the mean of the old rows.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "START_TOKEN",
    "END_TOKEN",
    "NEWLINE_TOKEN",
    "NUM_CODES",
    "generation_tokens",
    "load_base_tokenizer",
    "add_generation_vocab",
    "GenerationVocab",
    "resize_embeddings_with_mean",
]

START_TOKEN = "<start_index>"
END_TOKEN = "<end_index>"
NEWLINE_TOKEN = "<pixel_newline>"
NUM_CODES = 8192

PHI3_SPECIAL_TOKENS = (  # Phi-3-mini's added tokens, ids 32000..32010 after the LLaMA-2 32k BPE
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)
_WORDLLAMA_JSON = ("tokenizers", "l2_supercat_tokenizer_config.json")


def code_token(i: int) -> str:
    return f"<idx_{i}>"


def generation_tokens(num_codes: int = NUM_CODES) -> list:
    """The appended tokens, in order: start, one per code, end, pixel newline."""
    return [START_TOKEN] + [code_token(i) for i in range(num_codes)] + [END_TOKEN, NEWLINE_TOKEN]


def _builtin_llama2_tokenizer():
    """LLaMA-2 32k BPE (from the ``wordllama`` wheel) + Phi-3's 11 special tokens: Phi-3-mini's vocabulary."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no tokenizer_path or llm_path is set, and the built-in Phi-3 base vocabulary needs the "
            "`wordllama` package (pip install wordllama), which ships the LLaMA-2 32k BPE"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *_WORDLLAMA_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed wordllama package")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(path),
        bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_SPECIAL_TOKENS], special_tokens=True)
    tok.padding_side = "right"
    return tok


def load_base_tokenizer(path: str | None):
    """The LLM's tokenizer from local directory ``path`` (``None``: the built-in Phi-3 vocabulary)."""
    if path is None:
        return _builtin_llama2_tokenizer()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer directory {path!r} does not exist: expected a local tokenizer "
            f"(tokenizer.json + tokenizer_config.json, as in the Phi-3 / phi-4 model directory)"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path!r} holds no tokenizer.json or tokenizer.model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def add_generation_vocab(tokenizer, num_codes: int = NUM_CODES) -> int:
    """Append the generation tokens (as special tokens) unless all are there; -> number added."""
    tokens = generation_tokens(num_codes)
    vocab = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocab]
    if len(present) == len(tokens):
        return 0
    if present:
        raise ValueError(
            f"tokenizer holds {len(present)} of the {len(tokens)} generation tokens (e.g. {present[0]}); expected none or all"
        )
    return tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)


@dataclass(frozen=True)
class GenerationVocab:
    """Ids of the generation tokens; code ``c`` is token ``code0 + c`` (checked contiguous)."""

    start: int
    end: int
    newline: int
    code0: int
    num_codes: int

    @classmethod
    def from_tokenizer(cls, tokenizer, num_codes: int = NUM_CODES) -> "GenerationVocab":
        ids = tokenizer.convert_tokens_to_ids(generation_tokens(num_codes))
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError("tokenizer lacks the generation tokens: call add_generation_vocab first")
        start, codes, end, newline = ids[0], ids[1:-2], ids[-2], ids[-1]
        if codes != list(range(codes[0], codes[0] + num_codes)):
            raise ValueError("the <idx_*> tokens must have contiguous ids <idx_0> .. <idx_N-1>")
        return cls(start=start, end=end, newline=newline, code0=codes[0], num_codes=num_codes)

    @property
    def base_size(self) -> int:
        """Vocabulary size before the generation tokens were appended (they are the last ids)."""
        return self.start

    def answer_text(self, codes) -> str:
        """VQ codes -> the assistant text ``<start_index><idx_c0>...<end_index>``."""
        codes = torch.as_tensor(codes).flatten().tolist()
        bad = [c for c in codes if not 0 <= c < self.num_codes]
        if bad:
            raise ValueError(f"VQ codes must lie in [0, {self.num_codes}), got e.g. {bad[:3]}")
        return START_TOKEN + "".join(code_token(c) for c in codes) + END_TOKEN


@torch.no_grad()
def resize_embeddings_with_mean(llm, new_size: int, old_size: int) -> None:
    """Resize ``embed_tokens`` and ``lm_head`` to ``new_size`` rows; rows ``old_size:`` become the mean
    of rows ``:old_size`` (the release's init). Tied embeddings are written once."""
    llm.resize_token_embeddings(new_size, mean_resizing=False)
    emb = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    matrices = [emb] if head is None or head.weight is emb else [emb, head.weight]
    for w in matrices:
        if new_size > old_size:
            w[old_size:] = w[:old_size].float().mean(0).to(w.dtype)
