"""The card's `prompt` and `messages` inputs → token ids, exactly as mistral-common's v1 instruct tokenizer.

Mistral-7B-Instruct-v0.2 uses the v1 format:
    <s>[INST] {system}\n\n{user 1} [/INST]{assistant 1}</s>[INST] {user 2} [/INST]
Every `[INST] ... [/INST]` turn and every assistant reply is encoded on its own (each gets SentencePiece's
dummy-prefix space), and only the BOS/EOS ids are control tokens: `<s>`, `</s>` or `[INST]` typed in content
stay text, so nobody can close a turn by typing `</s>`.

The v1 format has no tool tokens, so tools ride in that format as text (tools.py holds the texts):

- the tools offered are listed, with how to call them, at the end of the last user turn, after a
  blank line (`tools_prompt`), as text-generation-inference does for templates without tools;
- an assistant message holding calls (its content the JSON of a call, as Workers AI's runWithTools
  sends it, or an array of calls) is the assistant's reply, written as this server generates calls:
  `[{"name":"get_weather","arguments":{"city":"Paris"}}]`; consecutive ones make one reply;
- the `tool` messages after it are the next user turn: "Function results:" and a JSON array of
  {"name", "result"} (a result that is JSON is inserted as JSON); a user message right after them
  joins that turn after a blank line.

Conversations without tools encode exactly as mistral-common's (tests/test_prompt.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .excerpt import excerpt
from .tokenizer import Tokenizer
from .tools import ToolCall, parse_call_message, render_calls, render_results

ROLES = ("system", "user", "assistant", "tool")
_SYSTEM_JOIN = "\n\n"  # mistral-common's separator between system messages and before the first user text
_TURN_JOIN = "\n\n"  # between a turn's parts: tool results, the user's text, the tools offered


class PromptError(ValueError):
    """A conversation the Mistral v1 instruct format cannot express; the message names the offending field."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""  # a `tool` message: the function whose result it is (else the matching call's)


def encode_prompt(tok: Tokenizer, prompt: str, raw: bool, tools_prompt: str = "") -> list[int]:
    """The card's `prompt` input: one user turn, or with `raw` the text as given behind a BOS."""
    if not raw:
        return encode_chat(tok, [ChatMessage("user", prompt)], tools_prompt)
    # A raw prompt written in the model's own format starts with "<s>"; that one becomes the BOS id
    # rather than text, so "<s>[INST] hi [/INST]" and "[INST] hi [/INST]" give the same ids.
    text = prompt.removeprefix("<s>")
    return [tok.bos_id, *tok.encode(text)]


def encode_chat(tok: Tokenizer, messages: Sequence[ChatMessage], tools_prompt: str = "") -> list[int]:
    """The card's `messages` input rendered as `MistralTokenizer.v1().encode_chat_completion` does, with
    tool turns and `tools_prompt` (the tools offered, tools.tools_prompt) as the module docstring says.

    Raises PromptError, before tokenizing anything, unless `messages` is: system*, then a user turn,
    then (assistant, user turn)*, where a user turn is a user message, or the `tool` results of the
    assistant's calls just before (optionally followed by a user message). mistral-common is laxer in
    ways that silently rewrite the conversation (it merges consecutive user messages and moves a
    system message from anywhere to the first turn); those shapes are rejected here so that what the
    model sees is what the caller sent. Leading system messages, several of them included, are
    accepted and rendered as mistral-common renders them.
    """
    system, turns = _turns(messages)
    ids = [tok.bos_id]
    first_user = True
    for index, turn in enumerate(turns):
        if turn.user:
            parts = [turn.content]
            if first_user and system:
                parts.insert(0, system)
            if index == len(turns) - 1 and tools_prompt:
                parts.append(tools_prompt)
            first_user = False
            ids += tok.encode(f"[INST] {_SYSTEM_JOIN.join(parts)} [/INST]")
        else:
            ids += tok.encode(turn.content)
            ids.append(tok.eos_id)
    return ids


@dataclass
class _Turn:
    user: bool  # a [INST] turn (user text, tool results or both), else an assistant reply
    content: str
    calls: list[ToolCall] | None = None  # an assistant reply made of calls
    results: list[tuple[str, str]] | None = None  # a user turn opened by tool results: (name, content)
    text: str | None = None  # a user turn opened by tool results: the user message after them


def _turns(messages: Sequence[ChatMessage]) -> tuple[str, list[_Turn]]:
    """The joined system text and the turns, or PromptError naming the first offending message."""
    if not messages:
        raise PromptError("messages: the conversation is empty; expected at least one 'user' message")
    first_turn = _leading_system_count(messages)
    turns: list[_Turn] = []
    calls_at = -1  # index of the message that opened the latest assistant calls
    for index, message in enumerate(messages):
        role = message.role
        if role not in ROLES:
            raise PromptError(
                f"messages[{index}].role: unknown role {excerpt(role)}; "
                "expected 'system', 'user', 'assistant' or 'tool'"
            )
        if index < first_turn:
            continue
        last = turns[-1] if turns else None
        if role == "system":
            raise PromptError(
                f"messages[{index}].role: 'system' is only allowed at the start of the conversation, "
                f"before the first 'user' message"
            )
        if role == "tool":
            if last is None or (last.calls is None and last.results is None) or (last.results and last.text):
                raise PromptError(
                    f"messages[{index}].role: a 'tool' message must follow an 'assistant' message "
                    "holding a tool call"
                )
            if last.calls is not None:
                last = _Turn(user=True, content="", results=[])
                turns.append(last)
            calls = turns[-2].calls
            assert calls is not None and last.results is not None
            if len(last.results) == len(calls):
                raise PromptError(
                    f"messages[{index}].role: more 'tool' results than the {len(calls)} call(s) in "
                    f"messages[{calls_at}]"
                )
            last.results.append((message.name or calls[len(last.results)].name, message.content))
            last.text = None  # an empty user message before this result is not part of the turn
            continue
        if role == "user":
            if last is not None and last.results is not None and not last.text:
                last.text = message.content
                continue
            if last is not None and last.user:
                raise PromptError(f"messages[{index}].role: expected 'assistant' after 'user', got 'user'")
            turns.append(_Turn(user=True, content=message.content))
            continue
        # assistant
        calls = parse_call_message(message.content)
        if last is not None and last.calls is not None and calls is not None:
            last.calls += calls  # several call messages in a row (runWithTools sends one per call)
            continue
        if last is None or not last.user:
            after = f"after {excerpt(messages[index - 1].role)}" if index > 0 else "as the first message"
            raise PromptError(f"messages[{index}].role: expected 'user' {after}, got 'assistant'")
        if not message.content:
            # mistral-common refuses it too: an empty reply has no tokens before its </s>.
            raise PromptError(f"messages[{index}].content: an 'assistant' message must not be empty")
        if calls is not None:
            calls_at = index
            turns.append(_Turn(user=False, content="", calls=calls))
        else:
            turns.append(_Turn(user=False, content=message.content))
    last_message = messages[-1]
    if not turns or not turns[-1].user:
        raise PromptError(
            f"messages[{len(messages) - 1}].role: the conversation must end with a 'user' or 'tool' "
            f"message, got {excerpt(last_message.role)}"
        )
    # Merged turns are rendered once they are whole: rendered at each merge, a chat of n tool
    # results cost n^2 / 2 renders (2000 calls and 2000 results took 18 s of a validation worker).
    for turn in turns:
        if turn.calls is not None:
            turn.content = render_calls(turn.calls)
        elif turn.results is not None:
            rendered = render_results(turn.results)
            turn.content = rendered if turn.text is None else rendered + _TURN_JOIN + turn.text
    system = _SYSTEM_JOIN.join(m.content for m in messages[:first_turn] if m.content)
    return system, turns


def _leading_system_count(messages: Sequence[ChatMessage]) -> int:
    count = 0
    while count < len(messages) and messages[count].role == "system":
        count += 1
    return count
