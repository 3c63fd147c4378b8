"""The exporter: demo models, the checkpoint path a hub id takes, bad input, the model directory."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from textgen_export import checkpoint as checkpoint_module
from textgen_export.cli import main as export_main
from textgen_export.demo import mistral_spm_model_path
from textgen_export.native_graph import EXTERNAL_DATA_OVER
from textgen_export.random_weights import DemoSize, mistral_config, random_weights, save_checkpoint
from textgen_server.engine import Engine
from textgen_server.model_config import ModelConfig


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_directory_loads_in_onnxruntime_without_torch(tiny_model_dir: Path) -> None:
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "checkpoint",
        "kv_copy.onnx",
        "model.onnx",
        "textgen.json",
        "tokenizer.json",
    ]
    script = f"""
import sys
import numpy as np
from pathlib import Path
from textgen_server.engine import Engine
from textgen_server.tokenizer import Tokenizer
engine = Engine(Path({str(tiny_model_dir)!r}), slots=2)
tok = Tokenizer.from_file(Path({str(tiny_model_dir)!r}) / "tokenizer.json")
prompt = [tok.bos_id, *tok.encode("Hello world")]
logits = engine.prefill(1, prompt)
assert logits.shape == (32000,), logits.shape
engine.move_slot(1, 0, len(prompt))
engine.decode(np.array([int(logits.argmax())]), np.array([len(prompt)]))
assert not {{"torch", "transformers", "onnx", "optimum"}} & set(sys.modules), "the server imported an exporter dependency"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_demo_config_matches_the_mistral_architecture(tiny_model_dir: Path) -> None:
    config = ModelConfig.load(tiny_model_dir)
    hf = json.loads((tiny_model_dir / "checkpoint" / "config.json").read_text())
    assert (config.vocab_size, config.num_layers, config.num_kv_heads, config.head_dim) == (32000, 2, 2, 16)
    assert hf["rope_theta"] == 1e6 and hf["sliding_window"] is None
    assert hf["num_key_value_heads"] < hf["num_attention_heads"]  # grouped-query attention
    assert (config.max_input_length, config.max_total_tokens, config.max_batch_prefill_tokens) == (
        3072,
        4096,
        8192,
    )
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_demo_is_reproducible(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert export_main(["demo", "--out", str(tmp_path / "again")]) == 0
    for name in ("model.onnx", "tokenizer.json", "checkpoint/model.safetensors"):
        assert _digest(tmp_path / "again" / name) == _digest(tiny_model_dir / name), name


def test_local_folder_export_takes_the_hub_code_path(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id is downloaded to a folder and exported from there; the local path is the same path."""
    requested: list[str] = []

    def fake_snapshot(repo_id: str) -> Path:
        requested.append(repo_id)
        return tiny_model_dir / "checkpoint"

    monkeypatch.setattr(checkpoint_module, "download_from_hub", fake_snapshot)
    assert export_main(["model", "mistralai/Mistral-7B-Instruct-v0.2", "--out", str(tmp_path / "hub")]) == 0
    assert requested == ["mistralai/Mistral-7B-Instruct-v0.2"]
    assert export_main(["model", str(tiny_model_dir / "checkpoint"), "--out", str(tmp_path / "local")]) == 0
    for name in ("model.onnx", "tokenizer.json"):
        assert (
            _digest(tmp_path / "hub" / name)
            == _digest(tmp_path / "local" / name)
            == _digest(tiny_model_dir / name)
        )
    assert ModelConfig.load(tmp_path / "hub").name == "mistralai/Mistral-7B-Instruct-v0.2"


def test_export_heartbeat_says_how_many_layers_are_written(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The decoder step of a 7B export runs for minutes: its heartbeat lines count the layers done."""
    from textgen_export import onnx_export
    from textgen_export.progress import Progress

    build = onnx_export.build_decoder_graph

    def slow_build(*args: Any, on_layer: Callable[[int], None], **kwargs: Any) -> Any:
        def slow_layer(done: int) -> None:
            on_layer(done)
            time.sleep(0.2)  # several heartbeats per layer

        return build(*args, on_layer=slow_layer, **kwargs)

    monkeypatch.setattr(onnx_export, "build_decoder_graph", slow_build)
    monkeypatch.setattr(onnx_export, "Progress", functools.partial(Progress, heartbeat_s=0.05))
    assert export_main(["model", str(tiny_model_dir / "checkpoint"), "--out", str(tmp_path / "out")]) == 0
    layers = ModelConfig.load(tiny_model_dir).num_layers
    err = capsys.readouterr().err
    counts = [
        int(match)
        for match in re.findall(
            rf"\[2/3\] \d+ s: (\d+) of {layers} layers written\n",
            err,
        )
    ]
    assert set(counts) == set(range(1, layers + 1)) and counts == sorted(counts)


def _shard_checkpoint(source: Path, target: Path, index: bool) -> None:
    """`source`'s single-file checkpoint as two shards laid out as transformers saves them (with or
    without the index), beside a consolidated.safetensors of the same weights under
    mistral-inference's names, as Mistral's hub repositories ship it."""
    from safetensors.numpy import load_file, save_file

    target.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(source / name, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({name: tensors[name] for name in members}, str(target / file), metadata={"format": "pt"})
    if index:
        weight_map = {name: file for file, members in shards.items() for name in members}
        total = sum(array.nbytes for array in tensors.values())
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}), encoding="utf-8"
        )
    mistral_names = {
        name.replace("model.", "").replace("self_attn.", "attention."): a for name, a in tensors.items()
    }
    save_file(mistral_names, str(target / "consolidated.safetensors"))


@pytest.mark.parametrize("index", [True, False], ids=["with-index", "without-index"])
def test_sharded_checkpoint_exports_as_the_single_file_one(
    tiny_model_dir: Path, tmp_path: Path, index: bool
) -> None:
    """Mistral-7B comes in three shards and an index, beside Mistral's consolidated.safetensors: the
    export reads the shards alone and writes the same model as from one file."""
    from textgen_export.checkpoint_tensors import CheckpointTensors

    sharded = tmp_path / "sharded"
    _shard_checkpoint(tiny_model_dir / "checkpoint", sharded, index)
    single = CheckpointTensors(tiny_model_dir / "checkpoint", "fp32", tie_word_embeddings=False)
    assert CheckpointTensors(sharded, "fp32", tie_word_embeddings=False).nbytes() == single.nbytes()
    assert export_main(["model", str(sharded), "--out", str(tmp_path / "out")]) == 0
    assert _digest(tmp_path / "out" / "model.onnx") == _digest(tiny_model_dir / "model.onnx")


def test_a_shard_the_index_names_is_missing(tiny_model_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    _shard_checkpoint(tiny_model_dir / "checkpoint", sharded, index=True)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    _assert_one_line_error(
        _run_cli("model", str(sharded), "--out", str(tmp_path / "out")),
        "names 1 file(s) the folder lacks, first 'model-00002-of-00002.safetensors' (an interrupted download?)",
    )
    _no_model_left(tmp_path)


def test_mistral_inference_layout_alone_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    _shard_checkpoint(tiny_model_dir / "checkpoint", sharded, index=False)
    for shard in sharded.glob("model-*.safetensors"):
        shard.unlink()
    _assert_one_line_error(
        _run_cli("model", str(sharded), "--out", str(tmp_path / "out")),
        "consolidated.safetensors is mistral-inference's layout, not transformers'",
    )


def test_hub_download_takes_the_transformers_shards_only() -> None:
    """The files of a Mistral hub repository (mistralai/Mistral-7B-Instruct-v0.3's listing): the
    download keeps what the export reads and leaves the 14.5 GB consolidated.safetensors and the .bin
    duplicates."""
    from huggingface_hub.utils import filter_repo_objects
    from textgen_export.checkpoint import HUB_ALLOW_PATTERNS

    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "consolidated.safetensors",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "params.json",
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model.bin.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
    ]
    assert sorted(filter_repo_objects(listing, allow_patterns=HUB_ALLOW_PATTERNS)) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "textgen_export", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=cwd,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("textgen-export: error:") and expected in lines[0], lines[0]


def _no_model_left(parent: Path) -> None:
    leftovers = [p for p in parent.rglob("*") if p.name in ("model.onnx", "textgen.json")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("missing", "command", "extra"),
    [
        ("onnx", ["demo"], "demo"),  # what `make serve` and the server images install lacks it
        ("onnx_ir", ["demo", "--dtype", "int4"], "export"),  # the quantizer's, which only `export` brings
        ("torch", ["model", "CHECKPOINT"], "export"),  # safetensors reads through torch
    ],
)
def test_a_missing_package_names_the_extra_that_installs_it(
    tiny_model_dir: Path, tmp_path: Path, missing: str, command: list[str], extra: str
) -> None:
    args = [str(tiny_model_dir / "checkpoint") if arg == "CHECKPOINT" else arg for arg in command]
    # A module set to None in sys.modules cannot be imported: as if its package were not installed.
    script = (
        f"import sys; sys.modules[{missing!r}] = None; sys.argv[0] = 'textgen-export'\n"
        "from textgen_export.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines of what ran before it
    assert last == (
        f"textgen-export: error: {command[0]} needs the Python package {missing!r}, which is not "
        f"installed: pip install 'textgen[{extra}]'"
    ), result.stderr
    _no_model_left(tmp_path)


def test_overwrite_never_deletes_the_checkpoint_being_exported(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "parent" / "checkpoint"
    shutil.copytree(tiny_model_dir / "checkpoint", checkpoint)
    for out in (checkpoint, checkpoint.parent):  # the folder itself, or one holding it
        _assert_one_line_error(
            _run_cli("model", str(checkpoint), "--out", str(out), "--overwrite"),
            "holds the checkpoint being exported; choose another --out",
        )
        assert (checkpoint / "config.json").is_file()
    _no_model_left(tmp_path)


@pytest.mark.parametrize("out", ["", ".", "..", "sub/.."])
def test_an_out_that_holds_the_working_directory_is_refused_and_left_alone(tmp_path: Path, out: str) -> None:
    """`--out "$DIR" --overwrite` with DIR unset emptied the folder the export ran in (and `..` its
    parent), then failed: the staging folder was made inside what --overwrite deletes."""
    work = tmp_path / "a" / "b"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    (tmp_path / "a" / "also.txt").write_text("mine")
    _assert_one_line_error(
        _run_cli("demo", "--out", out, "--overwrite", cwd=work),
        "the working directory or a folder holding it; choose a folder of its own",
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["also.txt", "b"]  # nothing staged
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "sub"]


def test_sigterm_mid_export_leaves_nothing_behind(tmp_path: Path) -> None:
    """`timeout`, `docker stop` and Kubernetes stop an export with SIGTERM: handled as Ctrl-C is."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "textgen_export", "demo", "--size", "bench", "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "writing the decoder graph" in line:  # 2 s of work on this model
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, rest
    assert "textgen-export: terminated; nothing was written" in rest
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []  # no model, no staging folder


def _edited_checkpoint(
    source: Path, out: Path, config: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None
) -> Path:
    """A copy of the checkpoint at `source` with config.json keys changed (None: removed) and tensors
    replaced (None: removed)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    settings = json.loads((out / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    (out / "config.json").write_text(json.dumps(settings))
    if tensors:
        edited = {**load_file(str(out / "model.safetensors")), **tensors}
        save_file({k: v for k, v in edited.items() if v is not None}, str(out / "model.safetensors"))
    return out


def _refusal(checkpoint: Path, tmp_path: Path) -> str:
    """The one error line exporting `checkpoint` ends with; asserts it wrote no model."""
    result = _run_cli("model", str(checkpoint), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no model, no staging folder
    last: str = result.stderr.strip().splitlines()[-1]  # after the progress lines of the steps before
    return last


@pytest.mark.parametrize(
    ("config", "tensors", "expected"),
    [
        ({}, {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)},
         "model.layers.0.self_attn.k_proj.weight is [64, 64], config.json makes it [32, 64]"),
        ({}, {"model.layers.1.input_layernorm.weight": np.ones(32, np.float32)},
         "model.layers.1.input_layernorm.weight is [32], config.json makes it [64]"),
        ({}, {"model.layers.0.mlp.down_proj.weight": np.full((64, 192), np.nan, np.float32)},
         "model.layers.0.mlp.down_proj.weight holds NaN or infinite values"),
        ({"intermediate_size": None}, {}, "config.json: intermediate_size missing"),
        ({"num_key_value_heads": None}, {}, "config.json: num_key_value_heads missing"),
        ({"sliding_window": 6}, {}, "sliding_window 6 (shorter than the 4096 positions served)"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {}, "rope_scaling of type 'linear'"),
        ({"hidden_act": "gelu"}, {}, "hidden_act 'gelu'"),
        ({}, {"lm_head.weight": None}, "the checkpoint has no tensor 'lm_head.weight' (a file missing"),
        ({}, {"model.layers.1.mlp.up_proj.weight": None, "model.norm.weight": None},
         "no tensor 'model.norm.weight' nor 1 more the model needs"),
    ],
    ids=["k-shape", "norm-shape", "nan", "no-intermediate", "no-kv-heads", "window", "rope-scaling", "act",
         "untied-no-head", "two-missing"],
)  # fmt: skip
def test_a_checkpoint_the_graph_would_get_wrong_is_refused_naming_why(
    tiny_model_dir: Path, tmp_path: Path, config: dict[str, Any], tensors: dict[str, Any], expected: str
) -> None:
    """Each of these exported a model that onnxruntime refused, failed every request, or answered
    other tokens than transformers (a setting the graph writer left out)."""
    checkpoint = _edited_checkpoint(tiny_model_dir / "checkpoint", tmp_path / "checkpoint", config, tensors)
    last = _refusal(checkpoint, tmp_path)
    assert last.startswith("textgen-export: error:") and expected in last


def test_tied_embeddings_export_as_an_lm_head_equal_to_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    embeddings = load_file(str(tiny_model_dir / "checkpoint" / "model.safetensors"))[
        "model.embed_tokens.weight"
    ]
    untied = _edited_checkpoint(
        tiny_model_dir / "checkpoint", tmp_path / "untied", tensors={"lm_head.weight": embeddings}
    )
    tied = _edited_checkpoint(
        tiny_model_dir / "checkpoint",
        tmp_path / "tied",
        config={"tie_word_embeddings": True},
        tensors={"lm_head.weight": None},
    )
    for checkpoint in (untied, tied):
        assert export_main(["model", str(checkpoint), "--out", str(tmp_path / f"{checkpoint.name}-out")]) == 0
    assert _digest(tmp_path / "tied-out" / "model.onnx") == _digest(tmp_path / "untied-out" / "model.onnx")


def test_a_pytorch_checkpoint_without_its_lm_head_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers starts a tensor the .bin files lack from random values: that exported as noise."""
    import torch
    from safetensors.torch import load_file

    checkpoint = _edited_checkpoint(tiny_model_dir / "checkpoint", tmp_path / "checkpoint")
    weights = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    del weights["lm_head.weight"]
    torch.save(weights, checkpoint / "pytorch_model.bin")
    assert _refusal(checkpoint, tmp_path) == (
        "textgen-export: error: the checkpoint has no tensor 'lm_head.weight' (a file missing or cut short?)"
    )


def test_a_tokenizer_the_server_would_refuse_is_refused_at_export(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from test_faults import larger_tokenizer

    checkpoint = _edited_checkpoint(tiny_model_dir / "checkpoint", tmp_path / "checkpoint")
    tokenizer = larger_tokenizer(tiny_model_dir / "tokenizer.json", 10)
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert _refusal(checkpoint, tmp_path) == (
        "textgen-export: error: the checkpoint's tokenizer has 32010 tokens, more than config.json's vocab_size 32000"
    )


def test_a_model_trained_on_fewer_positions_gets_limits_its_graph_serves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoint = _edited_checkpoint(
        tiny_model_dir / "checkpoint",
        tmp_path / "checkpoint",
        {"max_position_embeddings": 2048, "sliding_window": 2048},
    )
    assert export_main(["model", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    config = ModelConfig.load(tmp_path / "out")
    assert (config.max_total_tokens, config.max_input_length) == (2048, 2047)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    cos = next(t for t in graph.graph.initializer if t.name == "cos_cache")
    assert cos.dims[0] == 2048  # a rotary row for every position a request may reach


def test_missing_folder(tmp_path: Path) -> None:
    _assert_one_line_error(
        _run_cli("model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")), "no such folder"
    )
    _no_model_left(tmp_path)


def test_lm_head_dtype_needs_quantized_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = str(tiny_model_dir / "checkpoint")
    _assert_one_line_error(
        _run_cli("model", checkpoint, "--out", str(tmp_path / "out"), "--lm-head", "int4"),
        "--lm-head int4: expected int4 or int8, with --dtype int4 or int8 (got --dtype fp32",
    )
    _no_model_left(tmp_path)


def test_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    _assert_one_line_error(
        _run_cli("model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")), "config.json is missing"
    )
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _assert_one_line_error(
        _run_cli("model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")),
        "model_type 'bert' is not supported",
    )
    _no_model_left(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_as_user(tiny_model_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _assert_one_line_error(
        _run_cli("model", str(tiny_model_dir / "checkpoint"), "--out", str(locked / "m")),
        "cannot write there",
    )


def test_unwritable_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("")
    _assert_one_line_error(
        _run_cli("model", str(tiny_model_dir / "checkpoint"), "--out", str(blocker / "m")),
        "cannot write there",
    )
    _no_model_left(tmp_path)


def test_non_empty_out_is_not_overwritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_line_error(
        _run_cli("model", str(tiny_model_dir / "checkpoint"), "--out", str(out)), "not empty"
    )
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose weights are corrupt fails with the file named; no directory appears."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (broken / name).write_bytes((tiny_model_dir / "checkpoint" / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = _run_cli("model", str(broken), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"textgen-export: error: {broken / 'model.safetensors'}: not a readable safetensors"
    )
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial")] == []


def test_native_fp16_export_tracks_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from textgen_server.engine import Engine

    assert (
        export_main(
            ["model", str(tiny_model_dir / "checkpoint"), "--out", str(tmp_path / "fp16"), "--dtype", "fp16"]
        )
        == 0
    )
    assert ModelConfig.load(tmp_path / "fp16").dtype == "fp16"
    prompt = [1, *range(100, 400)]
    half = Engine(tmp_path / "fp16", provider="cpu", slots=1).prefill(0, prompt)
    full = Engine(tiny_model_dir, provider="cpu", slots=1).prefill(0, prompt)
    assert half.dtype == np.float32  # logits leave the graph as float32 whatever the dtype
    assert float(np.abs(half - full).max()) < 2e-2


# 24 layers of hidden 512: 302 MB of layer weights beside the 65.5 MB embedding table and LM head.
STREAMED_SIZE = DemoSize(
    hidden_size=512, num_layers=24, num_attention_heads=8, num_kv_heads=2, intermediate_size=1536
)
_PEAK_GROWTH = """
import json, sys
from pathlib import Path
import torch, transformers, safetensors, onnxruntime  # before the baseline: the export's own memory only
from onnxruntime.quantization import matmul_nbits_quantizer
from textgen_export.onnx_export import export_checkpoint

def status(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024

checkpoint, out, over, dtype = sys.argv[1:]
before = status("VmRSS")
export_checkpoint(Path(checkpoint), Path(out), external_data_over=int(over), dtype=dtype, quality_check=False)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def test_a_large_checkpoint_is_exported_a_layer_at_a_time(tmp_path: Path) -> None:
    """Past the external-data threshold the weights are read one tensor at a time and written to
    model.onnx_data as the graph is built (quantized as they are written, for int4): the export's
    peak memory follows its largest tensor, not the model (holding the model whole took about four
    times its weights). The graph it writes computes exactly what the in-memory export's does."""
    config = mistral_config(STREAMED_SIZE)
    weights = random_weights(config, seed=7)
    largest = max(array.nbytes for array in weights.values())
    total = sum(array.nbytes for array in weights.values())
    save_checkpoint(config, weights, mistral_spm_model_path(), tmp_path / "checkpoint")
    del weights
    growth = {}
    runs = (("streamed", 0, "fp32"), ("in-memory", EXTERNAL_DATA_OVER, "fp32"), ("int4", 0, "int4"))
    for name, over, dtype in runs:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK_GROWTH,
                str(tmp_path / "checkpoint"),
                str(tmp_path / name),
                str(over),
                dtype,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        growth[name] = json.loads(result.stdout.splitlines()[-1])["growth"]
    assert (tmp_path / "streamed" / "model.onnx_data").is_file()
    assert not (tmp_path / "in-memory" / "model.onnx_data").exists()
    # Streamed: the LM head read and transposed (two copies of the largest tensor), and little else.
    assert growth["streamed"] < 4 * largest < total < growth["in-memory"], (growth, largest, total)
    # Quantized as written (no unquantized graph first, its quality not measured): the same bound.
    assert growth["int4"] < 4 * largest, (growth, largest)
    assert ModelConfig.load(tmp_path / "int4").quantization == {
        "weight_dtype": "int4",
        "block_size": 32,
        "accuracy_level": 4,
        "lm_head_bits": 8,
    }
    ids = list(range(3, 200))
    streamed = Engine(tmp_path / "streamed", slots=1, max_len=256).prefill(0, ids)
    in_memory = Engine(tmp_path / "in-memory", slots=1, max_len=256).prefill(0, ids)
    np.testing.assert_array_equal(streamed, in_memory)
