"""Chat templates and conversation -> (input_ids, labels) encoding.

A conversation renders as (the release's MPT-style templates)::

    system_prefix + system + sep + (role + message + sep) per turn [+ assistant role + prefix]

Phi-3: ``<|system|>\\nYou are a helpful AI assistant.<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>``.

``<image>`` in a user message becomes ``num_image_tokens`` copies of ``IMAGE_TOKEN_INDEX`` (-200),
the positions the model fills with projected patch features. Labels supervise the assistant
messages and the separator closing each (so the model learns to stop); every other position,
image positions included, is ``IGNORE_INDEX`` (-100).
"""

from __future__ import annotations

from dataclasses import dataclass

from healthgpt.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

__all__ = [
    "ChatTemplate",
    "TEMPLATES",
    "normalize_messages",
    "encode_conversation",
]


_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}


@dataclass(frozen=True)
class ChatTemplate:
    """One model family's prompt format (see the module docstring for how the parts combine)."""

    name: str
    system_prefix: str
    default_system: str
    user: str
    assistant: str
    sep: str

    def render(self, messages: list, system: str | None = None, generation_prefix: str | None = None) -> tuple:
        """-> (text, assistant spans): spans are [start, end) character ranges to supervise.

        ``messages``: (role, text) pairs, role ``"user"`` or ``"assistant"``. ``generation_prefix``:
        when not ``None``, an open assistant turn starting with it ends the text (inference prompt).
        """
        text = self.system_prefix + (self.default_system if system is None else system) + self.sep
        spans = []
        for role, message in messages:
            text += self.user if role == "user" else self.assistant
            start = len(text)
            text += message + self.sep
            if role == "assistant":
                spans.append((start, len(text)))
        if generation_prefix is not None:
            text += self.assistant + generation_prefix
        return text, spans


TEMPLATES = {
    "phi3": ChatTemplate(
        name="phi3",
        system_prefix="<|system|>\n",
        default_system="You are a helpful AI assistant.",
        user="\n<|user|>\n",
        assistant="\n<|assistant|>\n",
        sep="<|end|>",
    ),
    # The release's phi4 template, system message included: it is what its phi-4 weights were
    # served with. Override it with HealthGPTConfig.system_prompt.
    "phi4": ChatTemplate(
        name="phi4",
        system_prefix="<|im_start|>system<|im_sep|>\n",
        default_system="You are a medieval knight and must provide explanations to modern people.",
        user="\n<|im_start|>user<|im_sep|>\n",
        assistant="\n<|im_start|>assistant<|im_sep|>\n",
        sep="<|im_end|>",
    ),
}


def normalize_messages(conversation) -> list:
    """LLaVA turns ``{"from": "human"|"gpt", "value": ...}`` or chat turns ``{"role": "user"|"assistant",
    "content": ...}`` -> [(role, text)], checked to alternate user/assistant starting with the user."""
    out = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, dict):
            role = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
        else:
            role, text = turn
        if role in _USER_ROLES:
            role = "user"
        elif role in _ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise ValueError(f"turn {i}: role {role!r} is neither human/user nor gpt/assistant")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: message must be a string, got {type(text).__name__}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i} is from {role!r} but turns must alternate user/assistant, starting with the user")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise ValueError(f"turn {i}: {IMAGE_PLACEHOLDER} may appear in user turns only")
        out.append((role, text))
    if not out:
        raise ValueError("empty conversation")
    return out


def encode_conversation(
    tokenizer,
    template: ChatTemplate,
    messages: list,
    num_image_tokens: int,
    system: str | None = None,
    generation_prefix: str | None = None,
) -> tuple:
    """Tokenize a rendered conversation -> (input_ids, labels) as int lists of equal length.

    The text is split at each ``<image>``; each chunk is tokenized on its own (the first with the
    tokenizer's own special tokens, e.g. BOS), as LLaVA's ``tokenizer_image_token`` does, and
    ``num_image_tokens`` ``IMAGE_TOKEN_INDEX`` entries go between chunks. A token is supervised when
    its first character lies in an assistant span (offsets from the fast tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("HealthGPT needs a fast (tokenizers-backed) tokenizer: labels come from its offset mapping")
    text, spans = template.render(messages, system, generation_prefix)
    input_ids, labels, base = [], [], 0
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            input_ids += [IMAGE_TOKEN_INDEX] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            base += len(IMAGE_PLACEHOLDER)
        enc = tokenizer(chunk, add_special_tokens=(i == 0), return_offsets_mapping=True)
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            pos = base + start
            supervised = end > start and any(a <= pos < b for a, b in spans)
            input_ids.append(tid)
            labels.append(tid if supervised else IGNORE_INDEX)
        base += len(chunk)
    return input_ids, labels
