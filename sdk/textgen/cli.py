"""The `textgen` command: talk to a textgen server from a shell.

    textgen generate "Tell me a joke" --max-tokens 32 --stream
    textgen generate "A user as JSON" --json-schema user.schema.json
    textgen chat --system "Answer briefly." --message user:"What is gRPC?"
    textgen chat --message user:"Weather in Paris?" --tools tools.json --tool-choice required
    textgen run '{"prompt": "Hi", "max_tokens": 16, "stream": true}'
    textgen info
    textgen adapters

Text goes to stdout (streamed text as it arrives), the finish reason and usage to stderr;
--json prints one JSON object instead (one per chunk when streaming); tool calls print as
`tool_call: NAME ARGUMENTS-JSON` lines after the text. An error prints one line,
`error: CODE: field: description`, to stderr and exits 1 (2 for a bad command line or body);
Ctrl-C exits 130, and output read by something that stops reading (`| head`) ends quietly, 141.
A server with TLS takes --tls-ca (or --tls for gRPC's bundled roots), mutual TLS adds --tls-cert
and --tls-key; a bearer token comes from $TEXTGEN_TOKEN (or --token, which `ps` can show).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, Final

import grpc

from ._base import TOKEN_ENV
from ._channel import tls_credentials
from ._client import Client, Stream
from ._exceptions import APIStatusError, InvalidRequestError
from ._types import Chunk, Completion, FlatTool, Message, ModelInfo, ResponseFormat, Tool, ToolCall, Usage
from ._version import __version__

__all__ = ["main"]

DEFAULT_TARGET: Final = "localhost:50051"
ROLES: Final = ("system", "user", "assistant")
EXIT_API_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, as a tool the signal ends reports

_Handler = Callable[[Client, argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: _Handler = args.handler
    try:
        client = Client(
            args.target,
            timeout=args.timeout,
            max_retries=args.max_retries,
            credentials=_credentials(args),
            token=args.token,
        )
    except (OSError, ValueError) as exc:  # unreadable TLS files, an empty target, a token with spaces
        parser.error(str(exc))
    try:
        with client:
            return handler(client, args)
    except APIStatusError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_API_ERROR
    except InvalidRequestError as exc:  # a bad --messages/--tools/run body, or a value out of range
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # What reads the output went away (`textgen ... | head`): stop quietly, as Unix tools do.
        # Python flushes stdout once more at exit and would complain about the pipe: no more output.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return tls_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def describe_error(exc: APIStatusError) -> str:
    """One line: the status code, then the field violations (or the server's message)."""
    if exc.field_violations:
        detail = "; ".join(f"{v.field}: {v.description}" for v in exc.field_violations)
    else:
        detail = exc.message
    return f"{exc.code.name}: {detail}"


# -- commands -----------------------------------------------------------------------------------


def _generate(client: Client, args: argparse.Namespace) -> int:
    result = client.generate(
        args.prompt,
        raw=args.raw,
        lora=args.lora,
        stream=args.stream,
        response_format=_response_format(args),
        **_sampling(args),
    )
    return _output(result, args.json)


def _chat(client: Client, args: argparse.Namespace) -> int:
    messages: list[Message] = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    if args.messages is not None:
        messages.extend(_json_arg(args.messages, "--messages", list))
    messages.extend(args.message)
    if not messages:
        raise InvalidRequestError("chat needs at least one message (--message ROLE:TEXT or --messages JSON)")
    # Either tool form goes; the SDK refuses a wrong shape, showing the shapes expected.
    tools: list[Tool | FlatTool] | None = (
        _json_arg(_file_or_json(args.tools, "--tools"), "--tools", list) if args.tools is not None else None
    )
    result = client.chat(
        messages,
        tools=tools,
        tool_choice=args.tool_choice,
        lora=args.lora,
        stream=args.stream,
        response_format=_response_format(args),
        **_sampling(args),
    )
    return _output(result, args.json)


def _run(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.body == "-" else args.body
    body: dict[str, Any] = _json_arg(text, "body", dict)
    return _output(client.run(body), args.json)


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        _print_json(dataclasses.asdict(info))
    else:
        for field in dataclasses.fields(ModelInfo):
            value = getattr(info, field.name)
            if isinstance(value, list):
                value = ", ".join(value) or "(none)"
            print(f"{field.name}: {value}")
    return 0


def _adapters(client: Client, args: argparse.Namespace) -> int:
    adapters = client.model_info().adapters
    if args.json:
        _print_json({"adapters": adapters})
    else:
        for name in adapters:
            print(name)
        if not adapters:
            print("(no adapters: the server was started without --lora-dir, or it is empty)", file=sys.stderr)
    return 0


# -- output -------------------------------------------------------------------------------------


def _output(result: Completion | Stream, as_json: bool) -> int:
    if isinstance(result, Stream):
        with result:
            _print_stream(result, as_json)
    elif as_json:
        _print_json(dataclasses.asdict(result))
    else:
        if result.response:
            print(result.response)
        _print_tool_calls(result.tool_calls)
        _print_summary(result.finish_reason, result.usage)
    return 0


def _print_tool_calls(calls: list[ToolCall]) -> None:
    for call in calls:
        print(f"tool_call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)}")


def _print_stream(chunks: Iterable[Chunk], as_json: bool) -> None:
    last: Chunk | None = None
    mid_line = False
    try:
        for chunk in chunks:
            if as_json:
                _print_json(dataclasses.asdict(chunk))
            else:
                sys.stdout.write(chunk.response)
                sys.stdout.flush()
                mid_line = mid_line or bool(chunk.response)
            last = chunk
    finally:
        if mid_line:  # end the text's line, also when an error or ^C cuts the stream
            print()
    if not as_json and last is not None:
        _print_tool_calls(last.tool_calls)
        _print_summary(last.finish_reason, last.usage)


def _print_summary(finish_reason: str | None, usage: Usage | None) -> None:
    parts = [f"finish_reason={finish_reason or 'none'}"]
    if usage is not None:
        parts += [f"{f.name}={getattr(usage, f.name)}" for f in dataclasses.fields(usage)]
    print(f"[{' '.join(parts)}]", file=sys.stderr)


def _print_json(value: object) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- arguments ----------------------------------------------------------------------------------


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "frequency_penalty": args.frequency_penalty,
        "presence_penalty": args.presence_penalty,
        "stop": args.stop,
    }


def _response_format(args: argparse.Namespace) -> ResponseFormat | None:
    if args.json_object:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    schema = _json_arg(_file_or_json(args.json_schema, "--json-schema"), "--json-schema", dict)
    return {"type": "json_schema", "json_schema": schema}


def _file_or_json(value: str, name: str) -> str:
    """The JSON an option names: inline (it starts with [ or {), - for stdin, or a file's path."""
    if value.lstrip().startswith(("[", "{")):
        return value
    if value == "-":
        return sys.stdin.read()
    try:
        with open(value, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        raise InvalidRequestError(f"{name}: cannot read {value}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{name}: {value} is not UTF-8 text (byte {exc.start})") from exc


def _json_arg(text: str, name: str, kind: type[Any]) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{name}: invalid JSON: {exc}") from exc
    if not isinstance(value, kind):
        expected = "an array" if kind is list else "an object"
        raise InvalidRequestError(f"{name}: expected {expected}, got {type(value).__name__}")
    return value


def _role_message(text: str) -> Message:
    role, sep, content = text.partition(":")
    if not sep or role not in ROLES:
        raise argparse.ArgumentTypeError(
            f"expected ROLE:TEXT with ROLE one of {', '.join(ROLES)}; got {text!r}"
        )
    return {"role": role, "content": content}


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--target, --timeout, --max-retries, the credentials and --json: accepted before the command
    and after it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target",
        default=default(os.environ.get("TEXTGEN_TARGET", DEFAULT_TARGET)),
        help="server address host:port, or any gRPC target such as dns:///name:port for all its "
        f"replicas (default: $TEXTGEN_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default(60.0),
        metavar="S",
        help="deadline of each call in seconds, inf for none (default: 60)",
    )
    parser.add_argument(
        "--max-retries",
        type=_non_negative,
        default=default(2),
        metavar="N",
        help="retries while no server is available, or a full one asks to come back later (default: 2)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (one object per chunk)"
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS, trusting gRPC's bundled roots"
    )
    parser.add_argument(
        "--tls-ca", default=default(None), metavar="FILE", help="use TLS, trusting this PEM CA bundle"
    )
    parser.add_argument(
        "--tls-cert", default=default(None), metavar="FILE", help="PEM client certificate (mutual TLS)"
    )
    parser.add_argument("--tls-key", default=default(None), metavar="FILE", help="PEM key of --tls-cert")
    parser.add_argument(
        "--token",
        default=default(None),
        help=f"bearer token (default: ${TOKEN_ENV}, which other users cannot see in `ps`)",
    )


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (unset options take the server's defaults)")
    group.add_argument("--stream", action="store_true", help="print the text as it is generated")
    group.add_argument("--max-tokens", type=int, metavar="N", help="new tokens at most [256]")
    group.add_argument("--temperature", type=float, metavar="T", help="0..5, 0 is greedy [0.6]")
    group.add_argument("--top-p", type=float, metavar="P", help="0..2")
    group.add_argument("--top-k", type=int, metavar="K", help="1..50")
    group.add_argument("--seed", type=int, metavar="S", help="1..9999999999")
    group.add_argument("--repetition-penalty", type=float, metavar="X", help="0..2")
    group.add_argument("--frequency-penalty", type=float, metavar="X", help="0..2")
    group.add_argument("--presence-penalty", type=float, metavar="X", help="0..2")
    group.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    group.add_argument("--lora", metavar="NAME", help="LoRA adapter to apply")
    json_mode = group.add_mutually_exclusive_group()
    json_mode.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer with JSON matching this JSON Schema: a file, - for stdin, or the schema itself",
    )
    json_mode.add_argument("--json-object", action="store_true", help="answer with a JSON object")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen", description="Client of a textgen gRPC server (Mistral-7B-Instruct-v0.2)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: _Handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _connection_options(sub, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    generate = command("generate", _generate, "generate from a prompt")
    generate.add_argument("prompt", help="the prompt (1..6144 characters)")
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the instruct format"
    )
    _sampling_options(generate)

    chat = command("chat", _chat, "generate the next assistant turn of a conversation")
    chat.add_argument(
        "--message",
        action="append",
        type=_role_message,
        default=[],
        metavar="ROLE:TEXT",
        help="a turn, e.g. user:'Hello' (repeatable, in order)",
    )
    chat.add_argument("--system", metavar="TEXT", help="a system message, placed first")
    chat.add_argument(
        "--messages", metavar="JSON", help='messages as JSON: [{"role": "user", "content": "Hi"}]'
    )
    chat.add_argument(
        "--tools",
        metavar="FILE",
        help="tools: a JSON array in the card's form or the flat one ({name, description, parameters}); "
        "a file, - for stdin, or the JSON itself",
    )
    chat.add_argument(
        "--tool-choice", metavar="CHOICE", help="auto (text or calls), none, required, or a function's name"
    )
    _sampling_options(chat)

    run = command("run", _run, 'run a Workers AI request body (its "stream" flag included)')
    run.add_argument("body", help="the JSON body, or - to read it from stdin")

    command("info", _info, "show the served model, its limits and adapters")
    command("adapters", _adapters, "list the LoRA adapters the server serves (names for --lora)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
