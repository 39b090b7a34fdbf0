"""The chat template: conversations <-> token ids, with role markers as reserved special tokens.

    bos <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ... eos

Each message is its role marker, its content's tokens and <|end|>. A prompt for generation ends with
<|assistant|>; the model answers until it emits <|end|>. Loss falls on each assistant message's
content and its <|end|> (so the model learns to stop), never on the markers that open a message.

The four markers take the first four ids after the tokenizer's vocabulary (unless a SentencePiece
model brought from elsewhere has them as pieces of its own), inside the model's padded vocabulary:
char and byte always leave room with model.vocab_multiple=128; a SentencePiece vocabulary that is a
multiple of it does not, and an SFT run from it grows the embedding by one multiple
(llm/spec.py's vocabulary), which the template's ids then use. Nothing of an older run's vocabulary moves.
"""

import dataclasses
from typing import Sequence

import numpy as np

from llm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class TemplateError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class RoleIds:
    system: int
    user: int
    assistant: int
    end: int

    def of(self, role: str) -> int:
        return getattr(self, role)

    @property
    def limit(self) -> int:
        """One past the largest id a chat model may emit."""
        return max(self.system, self.user, self.assistant, self.end) + 1


def marker_pieces(tok: Tokenizer | int) -> RoleIds | None:
    """The markers' ids in a SentencePiece model brought from elsewhere that has them as pieces (an int
    stands for a tokenizer of that many ids and no such pieces)."""
    pieces = tok.piece_ids(MARKERS) if hasattr(tok, "piece_ids") else None
    return None if pieces is None else RoleIds(*pieces)


def role_ids(tok: Tokenizer | int, model_vocab: int) -> RoleIds:
    """The markers' ids: the tokenizer's own pieces, else the first four ids after its vocabulary."""
    pieces = marker_pieces(tok)
    if pieces is not None:
        return pieces
    first = tok if isinstance(tok, int) else tok.vocab_size
    if first + len(MARKERS) > model_vocab:
        raise TemplateError(
            f"the chat template needs {len(MARKERS)} role ids after the tokenizer's {first}, but the model's "
            f"vocabulary has {model_vocab} rows; fine-tune it on 'sft:' data first (which grows the vocabulary) or "
            f"pretrain with model.vocab_size >= {first + len(MARKERS)}"
        )
    return RoleIds(first, first + 1, first + 2, first + 3)


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def messages_of(record: dict, where: str) -> list[Message]:
    """An SFT record, {"prompt", "response"} or {"messages": [...]}, as messages; `where` names it in errors."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise TemplateError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise TemplateError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise TemplateError(f"{where}: the conversation has no assistant message to learn from")
        return messages
    missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
    if missing:
        raise TemplateError(f"{where}: missing the string field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                            f"(an SFT line is {{'prompt', 'response'}} or {{'messages': [...]}})")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def render(tok: Tokenizer, ids: RoleIds, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T], is_response [T]): is_response marks each assistant message's content and its <|end|>."""
    tokens, response = [np.array([tok.bos_id], np.int32)], [np.zeros(1, bool)]
    for m in messages:
        content = np.asarray(tok.encode(m["content"]), np.int32)
        is_assistant = m["role"] == "assistant"
        tokens += [np.array([ids.of(m["role"])], np.int32), content, np.array([ids.end], np.int32)]
        response += [np.zeros(1, bool), np.full(len(content) + 1, is_assistant)]
    if add_generation_prompt:
        tokens.append(np.array([ids.assistant], np.int32))
        response.append(np.zeros(1, bool))
    return np.concatenate(tokens), np.concatenate(response)


def parse(tok: Tokenizer, ids: RoleIds, tokens: Sequence[int]) -> list[Message]:
    """render's inverse: the messages of a token sequence (an unfinished last message included)."""
    by_id = {ids.of(r): r for r in ROLES}
    messages, content = [], []
    for t in [int(t) for t in tokens]:
        if t in by_id:
            messages.append({"role": by_id[t], "content": ""})
            content = []
        elif t == ids.end or t in (tok.bos_id, tok.eos_id, tok.pad_id):
            continue
        elif messages:
            content.append(t)
            messages[-1]["content"] = tok.decode(content)
    return messages
