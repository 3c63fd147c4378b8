"""The card's `prompt` and `messages` inputs → token ids, exactly as mistral-common's v1 instruct tokenizer.

Mistral-7B-Instruct-v0.2 uses the v1 format:
    <s>[INST] {system}\n\n{user 1} [/INST]{assistant 1}</s>[INST] {user 2} [/INST]
Every `[INST] ... [/INST]` turn and every assistant reply is encoded on its own (each gets SentencePiece's
dummy-prefix space), and only the BOS/EOS ids are control tokens: `<s>`, `</s>` or `[INST]` typed in content
stay text, so nobody can close a turn by typing `</s>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_SYSTEM_JOIN = "\n\n"  # mistral-common's separator between system messages and before the first user text


class PromptError(ValueError):
    """A conversation the Mistral v1 instruct format cannot express; the message names the offending field."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def encode_prompt(tok: Tokenizer, prompt: str, raw: bool) -> list[int]:
    """The card's `prompt` input: one user turn, or with `raw` the text as given behind a BOS."""
    if not raw:
        return encode_chat(tok, [ChatMessage("user", prompt)])
    # A raw prompt written in the model's own format starts with "<s>"; that one becomes the BOS id
    # rather than text, so "<s>[INST] hi [/INST]" and "[INST] hi [/INST]" give the same ids.
    text = prompt.removeprefix("<s>")
    return [tok.bos_id, *tok.encode(text)]


def encode_chat(tok: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """The card's `messages` input rendered as `MistralTokenizer.v1().encode_chat_completion` does."""
    check_conversation(messages)
    first_turn = _leading_system_count(messages)
    # Leading system messages are joined and put in front of the first user message; empty ones are
    # skipped, as mistral-common does.
    system = _SYSTEM_JOIN.join(m.content for m in messages[:first_turn] if m.content)
    ids = [tok.bos_id]
    for index in range(first_turn, len(messages)):
        message = messages[index]
        if message.role == "user":
            content = message.content
            if index == first_turn and system:
                content = system + _SYSTEM_JOIN + content
            ids += tok.encode(f"[INST] {content} [/INST]")
        else:
            ids += tok.encode(message.content)
            ids.append(tok.eos_id)
    return ids


def check_conversation(messages: Sequence[ChatMessage]) -> None:
    """Raise PromptError unless `messages` is: system*, then user (assistant user)*.

    mistral-common is laxer in ways that silently rewrite the conversation (it merges consecutive user
    messages and moves a system message from anywhere to the first turn); those shapes are rejected here
    so that what the model sees is what the caller sent. Leading system messages, several of them
    included, are accepted and rendered as mistral-common renders them.
    """
    if not messages:
        raise PromptError("messages: the conversation is empty; expected at least one 'user' message")
    first_turn = _leading_system_count(messages)
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise PromptError(
                f"messages[{index}].role: unknown role {message.role!r}; expected 'system', 'user' or 'assistant'"
            )
        if index < first_turn:
            continue
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if message.role == "system":
            raise PromptError(
                f"messages[{index}].role: 'system' is only allowed at the start of the conversation, "
                f"before the first 'user' message"
            )
        if message.role != expected:
            after = f"after {messages[index - 1].role!r}" if index > 0 else "as the first message"
            raise PromptError(f"messages[{index}].role: expected {expected!r} {after}, got {message.role!r}")
        if message.role == "assistant" and not message.content:
            # mistral-common refuses it too: an empty reply has no tokens before its </s>.
            raise PromptError(f"messages[{index}].content: an 'assistant' message must not be empty")
    last = messages[-1]
    if last.role != "user":
        raise PromptError(
            f"messages[{len(messages) - 1}].role: the conversation must end with a 'user' message, "
            f"got {last.role!r}"
        )


def _leading_system_count(messages: Sequence[ChatMessage]) -> int:
    count = 0
    while count < len(messages) and messages[count].role == "system":
        count += 1
    return count
