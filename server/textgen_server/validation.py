"""A wire request → a typed GenerationRequest, or every field violation at once.

The bounds are the Workers AI card's (its JSON schema is the source; a test checks that each
minimum, maximum, minLength and maxLength there is enforced here). Token limits come from the
model directory's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from textgen.v1 import textgen_pb2 as pb

from .generation import GenerationRequest
from .model_config import ModelConfig
from .prompt import ChatMessage, PromptError, encode_chat, encode_prompt
from .sampling import PENALTY_MAX, SEED_MAX, SEED_MIN, TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MAX, SamplingParams
from .tokenizer import Tokenizer

MAX_PROMPT_CHARS = 6144
MAX_CONTENT_CHARS = 6144
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
DEFAULT_MAX_TOKENS = 256

# field: (minimum, maximum), both inclusive: the card's schema bounds, as sampling defines them.
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, TEMPERATURE_MAX),
    "top_p": (0.0, TOP_P_MAX),
    "repetition_penalty": (0.0, PENALTY_MAX),
    "frequency_penalty": (0.0, PENALTY_MAX),
    "presence_penalty": (0.0, PENALTY_MAX),
}
INTEGER_BOUNDS: dict[str, tuple[int, int]] = {
    "top_k": (1, TOP_K_MAX),
    "seed": (SEED_MIN, SEED_MAX),
}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequestError(Exception):
    """INVALID_ARGUMENT, with one violation per offending field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class UnknownAdapterError(Exception):
    """NOT_FOUND: the request names a LoRA adapter this server does not have."""


class UnsupportedFeatureError(Exception):
    """UNIMPLEMENTED: a card feature this model's prompt format cannot carry."""


def build_request(
    message: pb.GenerateRequest,
    *,
    tokenizer: Tokenizer,
    config: ModelConfig,
    adapters: frozenset[str],
    request_id: str,
) -> GenerationRequest:
    violations: list[FieldViolation] = []
    sampling = _sampling(message, violations)
    stop = _stop(message, violations)
    max_tokens = message.max_tokens if message.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        violations.append(FieldViolation("max_tokens", f"must be at least 1, got {max_tokens}"))
    prompt_ids = _prompt_ids(message, tokenizer, violations)
    if prompt_ids is not None:
        _check_token_limits(len(prompt_ids), max_tokens, config, violations)
    if violations:
        raise InvalidRequestError(violations)
    assert prompt_ids is not None  # no violations means the input was tokenized
    if message.lora and message.lora not in adapters:
        known = ", ".join(sorted(adapters)) or "none are loaded"
        raise UnknownAdapterError(f"lora: no adapter named {message.lora!r} ({known})")
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        lora=message.lora or None,
    )


def _sampling(message: pb.GenerateRequest, violations: list[FieldViolation]) -> SamplingParams:
    values: dict[str, float | int | None] = {}
    for name, (low, high) in NUMBER_BOUNDS.items():
        if not message.HasField(name):  # type: ignore[arg-type]
            continue
        value = float(getattr(message, name))
        if math.isnan(value) or not low <= value <= high:
            violations.append(FieldViolation(name, f"must be between {low:g} and {high:g}, got {value:g}"))
        values[name] = value
    for name, (ilow, ihigh) in INTEGER_BOUNDS.items():
        if not message.HasField(name):  # type: ignore[arg-type]
            continue
        ivalue = int(getattr(message, name))
        if not ilow <= ivalue <= ihigh:
            violations.append(FieldViolation(name, f"must be between {ilow} and {ihigh}, got {ivalue}"))
        values[name] = ivalue
    if violations:
        return SamplingParams()
    return SamplingParams(**values)  # type: ignore[arg-type]


def _stop(message: pb.GenerateRequest, violations: list[FieldViolation]) -> tuple[str, ...]:
    if len(message.stop) > MAX_STOP_SEQUENCES:
        violations.append(
            FieldViolation("stop", f"at most {MAX_STOP_SEQUENCES} stop strings, got {len(message.stop)}")
        )
    for index, stop in enumerate(message.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            violations.append(
                FieldViolation(f"stop[{index}]", f"must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
            )
    return tuple(message.stop)


def _prompt_ids(
    message: pb.GenerateRequest, tokenizer: Tokenizer, violations: list[FieldViolation]
) -> list[int] | None:
    which = message.WhichOneof("input")
    if which is None:
        violations.append(FieldViolation("input", "one of prompt or chat is required"))
        return None
    if which == "prompt":
        if not 1 <= len(message.prompt) <= MAX_PROMPT_CHARS:
            violations.append(
                FieldViolation(
                    "prompt", f"must be 1 to {MAX_PROMPT_CHARS} characters, got {len(message.prompt)}"
                )
            )
            return None
        return encode_prompt(tokenizer, message.prompt, message.raw)
    if message.raw:
        violations.append(FieldViolation("raw", "applies to prompt input only, not to chat"))
    chat = message.chat
    if chat.tools:
        raise UnsupportedFeatureError(
            "chat.tools: function calling is not available for "
            "Mistral-7B-Instruct-v0.2 (its v1 chat format has no tool tokens)"
        )
    before = len(violations)
    for index, m in enumerate(chat.messages):
        if len(m.content) > MAX_CONTENT_CHARS:
            violations.append(
                FieldViolation(
                    f"chat.messages[{index}].content",
                    f"must be at most {MAX_CONTENT_CHARS} characters, got {len(m.content)}",
                )
            )
    if len(violations) > before:
        return None
    try:
        return encode_chat(tokenizer, [ChatMessage(m.role, m.content) for m in chat.messages])
    except PromptError as exc:
        field, _, description = str(exc).partition(": ")
        violations.append(FieldViolation(f"chat.{field}", description))
        return None


def _check_token_limits(
    input_tokens: int, max_tokens: int, config: ModelConfig, violations: list[FieldViolation]
) -> None:
    if input_tokens > config.max_input_length:
        violations.append(
            FieldViolation(
                "input", f"{input_tokens} input tokens exceed max_input_length={config.max_input_length}"
            )
        )
    elif input_tokens + max_tokens > config.max_total_tokens:
        violations.append(
            FieldViolation(
                "max_tokens",
                f"{input_tokens} input tokens + max_tokens {max_tokens} = "
                f"{input_tokens + max_tokens} exceed "
                f"max_total_tokens={config.max_total_tokens}",
            )
        )
