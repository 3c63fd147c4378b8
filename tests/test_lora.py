"""LoRA adapters per request (issue 11), end to end on the tiny demo model with random PEFT adapters.

Correctness is parity with transformers + peft on the same weights; batching is judged against the
same requests served alone; every malformed adapter is refused with a message that says why.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import torch
from greedy import engine_greedy_rows
from peft import LoraConfig, PeftModel, get_peft_model
from random_adapters import LORA_RANK, LORA_SLOTS, random_adapter
from safetensors.torch import load_file, save_file
from server_harness import ServerThread
from test_server_process import ServerProcess
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_export.cli import main as export_main
from textgen_export.onnx_export import export_checkpoint
from textgen_server.adapters import Adapter, AdapterSlots
from textgen_server.app import ServerSettings, TextgenServer
from textgen_server.engine import Engine, ModelMismatchError
from textgen_server.lora_format import AdapterWeights, load_adapter, save_adapter
from textgen_server.model_config import LORA_GROUPS, LORA_MODULES, ModelConfig
from textgen_server.prompt import ChatMessage, encode_chat, encode_prompt
from textgen_server.tokenizer import Tokenizer
from transformers import MistralForCausalLM

SLOTS, RANK = LORA_SLOTS, LORA_RANK
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name: (rank, target modules, seed, extra LoraConfig fields)
ADAPTERS: dict[str, tuple[int, list[str], int, dict[str, Any]]] = {
    "r8": (8, list(LORA_MODULES), 1, {}),
    "r4": (4, ATTENTION, 2, {}),
    "r16": (16, list(LORA_MODULES), 3, {}),
    "mlp": (8, ["gate_proj", "up_proj", "down_proj"], 4, {}),
    "rslora": (8, list(LORA_MODULES), 5, {"use_rslora": True, "alpha_pattern": {"self_attn.q_proj": 4}}),
}
PROMPTS = ["Tell me about rivers", "Write a poem about the sea", "1 2 3 4 5", "Why is the sky blue?"]
NEW_TOKENS = 32  # acceptance: at least 32 tokens equal transformers + peft


def _peft_adapter(
    checkpoint: Path, out: Path, rank: int, targets: list[str], seed: int, **extra: Any
) -> Path:
    """A random PEFT LoRA (non-zero B: init_lora_weights=False) saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = MistralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        **extra,
    )
    get_peft_model(model, config).save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {
        name: _peft_adapter(tiny_model_dir / "checkpoint", root / name, rank, targets, seed, **extra)
        for name, (rank, targets, seed, extra) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def lora_dir(
    peft_dirs: dict[str, Path], lora_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    directory = tmp_path_factory.mktemp("lora-dir")
    for name, peft_dir in peft_dirs.items():
        # No extension given: the converter adds .npz, and the file name is the adapter's name.
        assert (
            export_main(
                ["lora", str(peft_dir), "--base", str(lora_model_dir), "--out", str(directory / name)]
            )
            == 0
        )
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{name}.npz" for name in ADAPTERS)
    return directory


@pytest.fixture(scope="module")
def lora_server(lora_model_dir: Path, lora_dir: Path) -> Iterator[ServerThread]:
    harness = ServerThread(lora_model_dir, lora_dir=lora_dir)
    yield harness
    harness.stop(grace=1)


@pytest.fixture(scope="module")
def lora_stub(lora_server: ServerThread) -> Iterator[rpc.TextGenerationStub]:
    with grpc.insecure_channel(lora_server.target) as channel:
        yield rpc.TextGenerationStub(channel)


class References:
    """transformers + peft greedy tokens, per adapter (None: the base model) and prompt ids."""

    def __init__(self, checkpoint: Path, peft_dirs: dict[str, Path]) -> None:
        self._checkpoint = checkpoint
        self._peft_dirs = peft_dirs
        self._models: dict[str | None, Any] = {}
        self._cache: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def greedy(self, adapter: str | None, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
        key = (adapter, tuple(prompt_ids), new_tokens)
        if key not in self._cache:
            model = self._model(adapter)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a model this small: ten times faster than several threads here
            try:
                with torch.no_grad():
                    out = model.generate(
                        input_ids=torch.tensor([prompt_ids]),
                        max_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=2,
                    )
            finally:
                torch.set_num_threads(threads)
            self._cache[key] = out[0, len(prompt_ids) :].tolist()
        return self._cache[key]

    def _model(self, adapter: str | None) -> Any:
        if adapter not in self._models:
            base = MistralForCausalLM.from_pretrained(self._checkpoint, dtype=torch.float32).eval()
            self._models[adapter] = (
                base if adapter is None else PeftModel.from_pretrained(base, self._peft_dirs[adapter]).eval()
            )
        return self._models[adapter]


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path, peft_dirs: dict[str, Path]) -> References:
    return References(tiny_model_dir / "checkpoint", peft_dirs)


def _request(
    prompt: str, lora: str | None, max_tokens: int = NEW_TOKENS, **fields: Any
) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, lora=lora or "", max_tokens=max_tokens, temperature=0, **fields)


def _tokens(stub: rpc.TextGenerationStub, request: pb.GenerateRequest) -> list[int]:
    return [m.token.id for m in stub.GenerateStream(request, timeout=120)]


# -- 1. parity with transformers + peft ---------------------------------------------------------------


def test_prompt_with_adapter_equals_transformers_peft(
    lora_stub: rpc.TextGenerationStub, references: References, tokenizer: Tokenizer
) -> None:
    """Rank 8 on q/k/v/o and the MLP; the other adapters (ranks 4 and 16, MLP only, rsLoRA with an
    alpha pattern) are checked the same way in test_more_adapters_than_slots_..."""
    prompt = PROMPTS[0]
    expected = references.greedy("r8", encode_prompt(tokenizer, prompt, raw=False))
    got = _tokens(lora_stub, _request(prompt, "r8"))
    assert len(expected) >= 32 and got == expected
    base = _tokens(lora_stub, _request(prompt, None))
    assert sum(a != b for a, b in zip(got, base, strict=True)) > len(got) // 2, "the adapter changed little"


def test_chat_with_adapter_equals_transformers_peft(
    lora_stub: rpc.TextGenerationStub, references: References, tokenizer: Tokenizer
) -> None:
    messages = [("system", "Be brief."), ("user", "What is ONNX?")]
    chat = pb.Chat(messages=[pb.Message(role=r, content=c) for r, c in messages])
    ids = encode_chat(tokenizer, [ChatMessage(r, c) for r, c in messages])
    request = pb.GenerateRequest(chat=chat, lora="r8", max_tokens=NEW_TOKENS, temperature=0)
    response = lora_stub.Generate(request)
    expected = references.greedy("r8", ids)
    assert response.usage.completion_tokens == len(expected) >= 32
    assert _tokens(lora_stub, request) == expected
    assert response.response == tokenizer.decode(expected)


def test_base_model_on_the_lora_graph_equals_transformers(
    lora_stub: rpc.TextGenerationStub, references: References, tokenizer: Tokenizer
) -> None:
    prompt = PROMPTS[1]
    assert _tokens(lora_stub, _request(prompt, None)) == references.greedy(
        None, encode_prompt(tokenizer, prompt, raw=False)
    )


# -- 2. adapters and the base model in one batch ------------------------------------------------------


def test_sixteen_concurrent_requests_mixing_three_adapters_and_base_give_their_alone_tokens(
    lora_stub: rpc.TextGenerationStub,
) -> None:
    requests = []
    for i in range(16):
        lora = ["r4", "r8", "r16", None][i % 4]
        prompt = PROMPTS[(i // 4) % len(PROMPTS)]
        # Greedy and seeded sampling both: either way a row computes what it would alone.
        sampling: dict[str, Any] = {} if i % 2 else {"temperature": 0.9, "top_k": 20, "seed": 1000 + i}
        request = _request(prompt, lora, max_tokens=24 + i)
        for field, value in sampling.items():
            setattr(request, field, value)
        requests.append(request)
    alone = [_tokens(lora_stub, r) for r in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: _tokens(lora_stub, r), requests))
    assert together == alone
    assert all(len(tokens) >= 24 for tokens in together)
    by_adapter = {
        r.lora: t
        for r, t in zip(requests, alone, strict=True)
        if r.temperature == 0 and r.prompt == PROMPTS[0]
    }
    assert len(set(map(tuple, by_adapter.values()))) == len(by_adapter), "adapters gave the same tokens"


# -- 3. more adapters than slots; adding while serving ------------------------------------------------


def test_more_adapters_than_slots_all_succeed_with_their_own_outputs(
    lora_server: ServerThread, lora_stub: rpc.TextGenerationStub, references: References, tokenizer: Tokenizer
) -> None:
    assert len(ADAPTERS) > SLOTS
    scheduler = lora_server.server.scheduler
    assert scheduler is not None and scheduler.adapter_slots is not None
    loads_before = scheduler.adapter_slots.loads
    names = [*ADAPTERS, *reversed(ADAPTERS)]  # twice, so that evicted adapters come back
    prompt = PROMPTS[2]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: _tokens(lora_stub, _request(prompt, name)), names))
    ids = encode_prompt(tokenizer, prompt, raw=False)
    for name, tokens in zip(names, results, strict=True):
        assert tokens == references.greedy(name, ids), name
    assert scheduler.adapter_slots.loads - loads_before >= len(ADAPTERS) - SLOTS + 1


def test_a_request_waits_for_a_slot_while_base_requests_pass(
    lora_server: ServerThread, lora_stub: rpc.TextGenerationStub, references: References, tokenizer: Tokenizer
) -> None:
    """All slots held by running streams: a fourth adapter's request is queued (not refused) until one
    leaves, base requests go past it, and the running streams' slots are never reloaded under them."""
    holders = ["r4", "r8", "r16"]
    prompt = PROMPTS[3]
    streams = {name: lora_stub.GenerateStream(_request(prompt, name, max_tokens=2000)) for name in holders}
    received: dict[str, list[int]] = {name: [next(stream).token.id] for name, stream in streams.items()}
    with ThreadPoolExecutor(2) as pool:
        waiting: Future[list[int]] = pool.submit(_tokens, lora_stub, _request(prompt, "mlp"))
        time.sleep(0.2)
        base = _tokens(lora_stub, _request(prompt, None, max_tokens=4))
        assert len(base) == 4
        assert not waiting.done(), "the fourth adapter ran while every slot was in use"
        for name in holders[1:]:
            received[name] += [next(streams[name]).token.id for _ in range(20)]
        streams["r4"].cancel()  # one slot frees
        assert waiting.result(timeout=60) == references.greedy(
            "mlp", encode_prompt(tokenizer, prompt, raw=False)
        )
    for name in holders[1:]:
        received[name] += [next(streams[name]).token.id for _ in range(20)]
        streams[name].cancel()
        expected = references.greedy(name, encode_prompt(tokenizer, prompt, raw=False), len(received[name]))
        assert received[name] == expected, name


def test_adding_and_removing_adapters_while_eight_streams_run(
    lora_server: ServerThread,
    lora_stub: rpc.TextGenerationStub,
    lora_dir: Path,
    lora_model_dir: Path,
    peft_dirs: dict[str, Path],
) -> None:
    requests = [_request(PROMPTS[i % 4], [None, "r8"][i % 2], max_tokens=120) for i in range(8)]
    alone = [_tokens(lora_stub, r) for r in requests]
    streams = [lora_stub.GenerateStream(r, timeout=120) for r in requests]
    firsts = [next(s).token.id for s in streams]  # all eight are running
    late = lora_dir / "late.npz"
    assert (
        export_main(["lora", str(peft_dirs["r16"]), "--base", str(lora_model_dir), "--out", str(late)]) == 0
    )
    try:
        result = lora_server.call(lora_server.server.rescan_adapters())  # what SIGHUP does
        assert result.added == ["late"] and not result.removed and not result.refused
        info = lora_stub.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.adapters) == sorted([*ADAPTERS, "late"])
        assert _tokens(lora_stub, _request(PROMPTS[0], "late")) == _tokens(
            lora_stub, _request(PROMPTS[0], "r16")
        )
        late.unlink()
        assert lora_server.call(lora_server.server.rescan_adapters()).removed == ["late"]
        with pytest.raises(grpc.RpcError) as error:
            lora_stub.Generate(_request(PROMPTS[0], "late"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        late.unlink(missing_ok=True)
    together = [[first, *(m.token.id for m in stream)] for first, stream in zip(firsts, streams, strict=True)]
    assert together == alone


def test_sighup_makes_a_running_server_serve_what_its_lora_dir_holds(
    lora_model_dir: Path, lora_dir: Path, references: References, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """The documented admin path, on a real `textgen-server` process: copy a file in, send SIGHUP."""
    directory = tmp_path / "adapters"
    directory.mkdir()
    process = ServerProcess(
        "--model-dir", str(lora_model_dir), "--port", "0", "--lora-dir", str(directory),
        "--max-batch-total-tokens", "8192",
    )  # fmt: skip
    try:
        process.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = rpc.TextGenerationStub(channel)
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == []
            shutil.copyfile(lora_dir / "r8.npz", directory / "pirate.npz")
            process.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not stub.GetModelInfo(pb.GetModelInfoRequest()).adapters and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == ["pirate"]
            expected = references.greedy("r8", encode_prompt(tokenizer, PROMPTS[0], raw=False))
            assert _tokens(stub, _request(PROMPTS[0], "pirate")) == expected
        assert any("lora-dir: serving adapter pirate (rank 8" in line for line in process.lines)
    finally:
        process.process.kill()
        process.process.wait()


# -- 4. refusals ----------------------------------------------------------------------------------------


def test_unknown_adapter_is_not_found_naming_it_and_the_known_ones(lora_stub: rpc.TextGenerationStub) -> None:
    for request in (
        _request("Hi", "pirate"),
        pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi")]), lora="pirate"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            lora_stub.Generate(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert (
            error.value.details() == f"lora: no adapter named 'pirate' (known: {', '.join(sorted(ADAPTERS))})"
        )
    with pytest.raises(grpc.RpcError) as error:
        lora_stub.Generate(_request("Hi", "x" * 5000))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and len(error.value.details()) < 200


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _malformed_peft_dirs(
    peft_dirs: dict[str, Path], checkpoint: Path, root: Path
) -> dict[str, tuple[Path, str]]:
    """case -> (PEFT folder, what the one-line error must say)."""
    cases: dict[str, tuple[Path, str]] = {}

    def copy(case: str) -> Path:
        target = root / case
        shutil.copytree(peft_dirs["r8"], target)
        return target

    target = copy("no-config")
    (target / "adapter_config.json").unlink()
    cases["no-config"] = (target, "adapter_config.json is missing")
    target = copy("wrong-name")
    (target / "adapter_model.safetensors").rename(target / "adapter_model.bin")
    cases["wrong-name"] = (
        target,
        "found adapter_model.bin; the file must be named exactly adapter_model.safetensors",
    )
    target = copy("model-type")
    _edit_json(target / "adapter_config.json", model_type="gemma")
    cases["model-type"] = (target, "model_type 'gemma'; expected mistral or llama")
    target = copy("dora")
    _edit_json(target / "adapter_config.json", use_dora=True)
    cases["dora"] = (target, "use_dora is set; DoRA cannot be served")
    target = copy("shape")
    tensors = load_file(str(target / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(8, 48)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    cases["shape"] = (
        target,
        "layer 1 q_proj: shapes A [48, 8], B [8, 64] do not match the base model's projection (64 in, 64 out)",
    )
    target = _peft_adapter(checkpoint, root / "rank", 32, ["q_proj", "v_proj"], seed=9)
    cases["rank"] = (target, f"rank 32 is over the {RANK} the model's adapter slots hold")
    target = _peft_adapter(checkpoint, root / "no-slot", 8, ["q_proj", "lm_head"], seed=10)
    cases["no-slot"] = (target, "target module 'lm_head' has no adapter slot in the graph")
    target = copy("empty")
    save_file({"unrelated": torch.zeros(2)}, str(target / "adapter_model.safetensors"))
    cases["empty"] = (target, "tensor 'unrelated' is not a LoRA matrix")
    cases["not-a-folder"] = (root / "nothing-here", "no such folder")
    return cases


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj|v_proj": 80},
        {"self_attn.q_proj": 4, "q_proj": 2},
        {"layers.1.mlp.(up|down)_proj": 3},
        {"k_proj": 5},
    ],
)
def test_alpha_patterns_match_modules_as_peft_does(patterns: dict[str, int]) -> None:
    from peft.utils.other import get_pattern_key
    from textgen_export.lora import _pattern_value

    for layer in range(2):
        for module in LORA_MODULES:
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            path = f"base_model.model.model.layers.{layer}.{group}.{module}"
            key = get_pattern_key(patterns.keys(), path)
            assert _pattern_value(patterns, path, None) == patterns.get(key), path


def test_malformed_peft_adapters_are_refused_at_conversion_in_one_line(
    peft_dirs: dict[str, Path],
    tiny_model_dir: Path,
    lora_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = _malformed_peft_dirs(peft_dirs, tiny_model_dir / "checkpoint", tmp_path / "peft")
    out = tmp_path / "out"
    for case, (peft_dir, expected) in cases.items():
        capsys.readouterr()
        assert (
            export_main(["lora", str(peft_dir), "--base", str(lora_model_dir), "--out", str(out / case)]) == 2
        ), case
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("textgen-export: error:"), (case, lines)
        assert expected in lines[0], (case, lines[0])
    capsys.readouterr()
    # A base model exported without slots cannot take adapters.
    assert (
        export_main(["lora", str(peft_dirs["r8"]), "--base", str(tiny_model_dir), "--out", str(out / "x")])
        == 2
    )
    assert "exported without adapter slots" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "a refused adapter left a file behind"


def test_malformed_adapter_files_are_refused_at_load_and_the_rest_serve(
    lora_model_dir: Path, lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ModelConfig.load(lora_model_dir)
    directory = tmp_path / "adapters"
    directory.mkdir()
    shutil.copyfile(lora_dir / "r8.npz", directory / "good.npz")
    (directory / "garbage.npz").write_bytes(b"this is not an adapter")
    good_bytes = (lora_dir / "r8.npz").read_bytes()
    (directory / "truncated.npz").write_bytes(good_bytes[: len(good_bytes) // 2])
    np.savez(directory / "plain-numpy.npz", weights=np.zeros(3))
    save_adapter(random_adapter(config, 8, seed=1, shapes={"q_proj": (48, 64)}), directory / "shapes")
    save_adapter(random_adapter(config, 32, seed=2), directory / "rank")
    nan = random_adapter(config, 4, seed=3)
    nan.matrices[(0, "down_proj")][1][0, 0] = np.nan
    save_adapter(nan, directory / "nan")
    weights = random_adapter(config, 4, seed=4)
    weights.matrices[(0, "lm_head")] = weights.matrices[(0, "o_proj")]
    save_adapter(weights, directory / "lm-head")
    (directory / "notes.txt").write_text("ignored: not an .npz")
    expected = {
        "garbage.npz": "not an .npz archive",
        "truncated.npz": "not an .npz archive",
        "plain-numpy.npz": "not a textgen adapter (textgen_lora missing)",
        "shapes.npz": "layer 0 q_proj: shapes A [48, 8], B [8, 64] do not match the base model's projection",
        "rank.npz": f"rank 32 is over the {RANK} the model's adapter slots hold",
        "nan.npz": "layer 0 down_proj: the matrices hold NaN or infinite values",
        "lm-head.npz": "the graph has no adapter slot for 'lm_head'",
    }
    caplog.set_level(logging.INFO, logger="textgen_server")
    harness = ServerThread(lora_model_dir, lora_dir=directory)
    try:
        refusals = {
            r.getMessage().split(":")[1].strip().removeprefix("refused "): r.getMessage()
            for r in caplog.records
            if "refused" in r.getMessage()
        }
        assert sorted(refusals) == sorted(expected)
        for name, reason in expected.items():
            assert reason in refusals[name], refusals[name]
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == ["good"]
            for name in ("garbage", "rank", "nan"):
                with pytest.raises(grpc.RpcError) as error:
                    stub.Generate(_request("Hi", name))
                assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert len(_tokens(stub, _request("Hi", "good", max_tokens=8))) == 8
            assert len(_tokens(stub, _request("Hi", None, max_tokens=8))) == 8
    finally:
        harness.stop(grace=1)


def test_an_adapter_whose_file_went_away_fails_its_request_and_is_unregistered(
    lora_model_dir: Path, lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked at registration, gone when a request needs it loaded: that request is NOT_FOUND (the
    reason, which names the server's files, only in the log), the adapter is no longer listed, and
    the server goes on serving the others."""
    directory = tmp_path / "adapters"
    directory.mkdir()
    for name in ("good", "doomed"):
        shutil.copyfile(lora_dir / "r8.npz", directory / f"{name}.npz")
    harness = ServerThread(lora_model_dir, lora_dir=directory)
    try:
        (directory / "doomed.npz").unlink()  # no SIGHUP: the server still lists it
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == ["doomed", "good"]
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(_request("Hi", "doomed"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert (
                error.value.details() == "lora: adapter 'doomed' could not be loaded; it is no longer served"
            )
            assert list(stub.GetModelInfo(pb.GetModelInfoRequest()).adapters) == ["good"]
            assert len(_tokens(stub, _request("Hi", "good", max_tokens=8))) == 8
        assert any("adapter doomed could not be loaded from" in r.getMessage() for r in caplog.records)
    finally:
        harness.stop(grace=1)


def _replace_file(source: Path, target: Path) -> None:
    """As the README says to replace an adapter: a copy renamed over the old file."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def test_a_request_queued_across_a_replacement_runs_wholly_on_the_new_version(
    lora_model_dir: Path, lora_dir: Path, references: References, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """`swap` runs once as mlp (its prompt's positions stay cached), every adapter slot is then held,
    a `swap` request queues, the file becomes r16 and the server rescans: the queued request must be
    r16 throughout. It ran the r16 weights over mlp's cached prompt positions, matching neither."""
    directory = tmp_path / "adapters"
    directory.mkdir()
    holders = ["r4", "r8", "r16"]
    assert len(holders) == SLOTS
    for name in holders:
        shutil.copyfile(lora_dir / f"{name}.npz", directory / f"{name}.npz")
    shutil.copyfile(lora_dir / "mlp.npz", directory / "swap.npz")
    harness = ServerThread(lora_model_dir, lora_dir=directory)
    prompt = " ".join(PROMPTS)  # long enough for the prefix cache (16 tokens at least)
    prompt_ids = encode_prompt(tokenizer, prompt, raw=False)
    try:
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            assert _tokens(stub, _request(prompt, "swap")) == references.greedy("mlp", prompt_ids)
            streams = {
                name: stub.GenerateStream(_request(PROMPTS[3], name, max_tokens=2000)) for name in holders
            }
            for stream in streams.values():
                next(stream)  # every adapter slot is in use
            with ThreadPoolExecutor(1) as pool:
                queued: Future[list[int]] = pool.submit(_tokens, stub, _request(prompt, "swap"))
                time.sleep(0.2)
                assert not queued.done()
                _replace_file(lora_dir / "r16.npz", directory / "swap.npz")
                assert harness.call(harness.server.rescan_adapters()).replaced == ["swap"]
                streams["r4"].cancel()  # a slot frees: the queued request is admitted
                assert queued.result(timeout=60) == references.greedy("r16", prompt_ids)
            for stream in streams.values():
                stream.cancel()
    finally:
        harness.stop(grace=1)


def test_a_file_replaced_without_a_rescan_is_not_served_under_the_version_checked(
    lora_model_dir: Path, lora_dir: Path, references: References, tokenizer: Tokenizer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Registered as r8, replaced on disk by r16 with no rescan, first needed after that: it is refused
    (r16 was never checked), and served as r16 once a rescan checks it."""
    directory = tmp_path / "adapters"
    directory.mkdir()
    shutil.copyfile(lora_dir / "r8.npz", directory / "swap.npz")
    harness = ServerThread(lora_model_dir, lora_dir=directory)
    try:
        _replace_file(lora_dir / "r16.npz", directory / "swap.npz")
        with grpc.insecure_channel(harness.target) as channel:
            stub = rpc.TextGenerationStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(_request("Hi", "swap"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert any("swap.npz changed since it was checked" in r.getMessage() for r in caplog.records)
            assert harness.call(harness.server.rescan_adapters()).added == ["swap"]
            expected = references.greedy("r16", encode_prompt(tokenizer, PROMPTS[1], raw=False))
            assert _tokens(stub, _request(PROMPTS[1], "swap")) == expected
    finally:
        harness.stop(grace=1)


async def test_lora_dir_on_a_model_without_slots_fails_at_start_up(
    tiny_model_dir: Path, lora_dir: Path
) -> None:
    server = TextgenServer(ServerSettings(tiny_model_dir, port=0, provider="cpu", lora_dir=lora_dir))
    await server.start()
    try:
        with pytest.raises(ValueError, match="exported without adapter slots .*--lora-slots N"):
            await server.load_model()
    finally:
        await server.stop(grace=0)


# -- the export and the slot table ----------------------------------------------------------------------


def test_without_slots_the_graph_has_no_adapter_path(tiny_model_dir: Path, lora_model_dir: Path) -> None:
    def lora_parts(model_dir: Path) -> tuple[int, int]:
        graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
        inputs = sum(1 for i in graph.input if i.name.startswith("lora"))
        return inputs, len(graph.node)

    plain_inputs, plain_nodes = lora_parts(tiny_model_dir)
    lora_inputs, lora_nodes = lora_parts(lora_model_dir)
    assert plain_inputs == 0 and ModelConfig.load(tiny_model_dir).lora is None
    assert lora_inputs == 1 + 2 * 5 * 2  # lora_index, then A and B for 5 groups in 2 layers
    assert lora_nodes > plain_nodes
    model = onnx.load(str(lora_model_dir / "model.onnx"))
    assert model.ir_version == 8 and {o.domain: o.version for o in model.opset_import}[""] == 18


def test_lora_groups_that_are_not_the_graphs_are_refused_at_start(
    lora_model_dir: Path, tmp_path: Path
) -> None:
    """textgen.json's groups say how adapters are packed into the graph's inputs; one without them
    (written before gate and up were separate projections) describes a packed gate/up graph."""
    edited = tmp_path / "edited"
    shutil.copytree(lora_model_dir, edited)
    data = json.loads((edited / "textgen.json").read_text())
    assert data["lora"]["groups"] == {group: list(members) for group, members in LORA_GROUPS.items()}
    del data["lora"]["groups"]
    (edited / "textgen.json").write_text(json.dumps(data))
    assert "gate_up" in ModelConfig.load(edited).lora.groups  # type: ignore[union-attr]
    with pytest.raises(ModelMismatchError) as raised:
        Engine(edited, provider="cpu", slots=1, max_len=64)
    assert str(raised.value).endswith(
        "does not match the graph beside it: lora groups qkv (q_proj/k_proj/v_proj), o (o_proj), "
        "gate_up (gate_proj/up_proj), down (down_proj), the graph's are down, gate, o, qkv, up"
    )


@pytest.mark.parametrize("groups", [["qkv", "o"], {"qkv": "q_proj"}, {"qkv": [1, 2]}])
def test_malformed_lora_groups_are_one_line_naming_the_field(
    lora_model_dir: Path, tmp_path: Path, groups: object
) -> None:
    edited = tmp_path / "edited"
    edited.mkdir()
    data = json.loads((lora_model_dir / "textgen.json").read_text())
    data["lora"]["groups"] = groups
    (edited / "textgen.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"textgen.json: TypeError: lora groups must map each group to a list"
    ):
        ModelConfig.load(edited)


def test_int4_weights_keep_the_adapters_in_the_activation_dtype(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int4-lora"
    export_checkpoint(tiny_model_dir / "checkpoint", out, dtype="int4", lora_slots=SLOTS, lora_rank=RANK)
    graph = onnx.load(str(out / "model.onnx")).graph
    ops = Counter(node.op_type for node in graph.node)
    # 2 layers x 5 projections (each with its adapter Gemms), and the LM head in int8
    assert ops["MatMulNBits"] == 2 * 5 + 1 and ops["Gemm"] == 2 * 5
    stacks = [i for i in graph.input if i.name.startswith("lora.")]
    assert len(stacks) == 2 * 5 * 2 and {i.type.tensor_type.elem_type for i in stacks} == {
        onnx.TensorProto.FLOAT
    }
    engine = Engine(out, provider="cpu", slots=2, max_len=128)
    engine.load_adapter(1, load_adapter(lora_dir / "r8.npz", engine.config))
    prompt = [1, *range(400, 420)]
    with_adapter = engine_greedy_rows(engine, [prompt, prompt], 16, adapters=[1, 0])
    assert with_adapter[0] != with_adapter[1]
    assert with_adapter[1] == engine_greedy_rows(engine, [prompt], 16)[0]


def _adapter(name: str) -> Adapter:
    return Adapter(name=name, path=Path(f"{name}.npz"), stamp=(0, 0), rank=8, modules=("q_proj",), nbytes=0)


def test_slot_table_loads_off_thread_evicts_least_recently_used_and_never_a_slot_in_use() -> None:
    loaded: list[str] = []
    written: dict[int, str] = {}
    slots = AdapterSlots(2, lambda adapter: AdapterWeights({}, {"name": adapter.name}))
    a, b, c = _adapter("a"), _adapter("b"), _adapter("c")

    def settle(adapter: Adapter, in_use: set[int]) -> int:
        placement = slots.place(adapter, in_use)
        deadline = time.monotonic() + 5
        while placement.slot is None and time.monotonic() < deadline:
            assert not placement.waiting_for_slot
            for failed in slots.install(lambda slot, w: written.__setitem__(slot, w.metadata["name"])):
                raise AssertionError(failed)
            placement = slots.place(adapter, in_use)
        assert placement.slot is not None
        loaded.append(adapter.name)
        return placement.slot

    assert settle(a, set()) == 1 and settle(b, set()) == 2  # empty slots first, lowest first
    assert settle(a, set()) == 1  # a is now more recently used than b
    assert settle(c, set()) == 2 and written == {1: "a", 2: "c"}  # b was the least recently used
    assert slots.place(b, {1, 2}) == slots.place(b, {1, 2})  # every slot in use: b waits for one
    assert slots.place(b, {1, 2}).waiting_for_slot
    assert settle(b, {2}) == 1 and written == {1: "b", 2: "c"}  # never slot 2, which a row uses
    slots.close()


def test_slot_table_reports_a_load_that_fails() -> None:
    def load(adapter: Adapter) -> AdapterWeights:
        raise OSError(f"{adapter.path}: gone")

    slots = AdapterSlots(1, load)
    broken = _adapter("broken")
    assert slots.place(broken, set()).slot is None
    deadline = time.monotonic() + 5
    failed: list[tuple[Adapter, Exception]] = []
    while not failed and time.monotonic() < deadline:
        failed = slots.install(lambda slot, weights: None)
        time.sleep(0.01)
    assert [(adapter.name, str(error)) for adapter, error in failed] == [("broken", "broken.npz: gone")]
    assert slots.resident() == {}  # the slot is free again
    slots.close()
