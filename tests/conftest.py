"""Shared fixtures: tiny models built from config with a tiny trained tokenizer (offline, fast)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import hashlib
import random
import socket
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = (
    "the a model sparse weight layer block prune keep zero token window text data run fast slow small large "
    "river mountain city house tree water light dark red blue green cat dog bird fish sun moon star rain snow "
    "and or but if then when while because so very more less one two three four five six seven eight nine ten"
).split()


def synthetic_text(documents: int, words_per_doc: int, seed: int = 0) -> str:
    """Documents of random words separated by blank lines (deterministic)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) + "." for _ in range(documents)]
    return "\n\n".join(docs) + "\n"


#: news text with pound signs: saved as Latin-1 it is not UTF-8 (0xA3), the case of a user's old corpus
NEWS = ("The pound rose to $1.27 after the Bank of England held rates; a pint now costs £4.80 in London.\n\n"
        "Shoppers in Leeds paid £2.15 for bread, up from £1.99 last year, the survey of prices found.\n\n"
        "Fares on the morning trains will rise by £3 in March, the operator said on Monday.\n")


def latin1_news(path: Path, copies: int = 1) -> Path:
    """``NEWS`` (``copies`` times) saved as Latin-1."""
    path.write_bytes((NEWS * copies).encode("latin-1"))
    return path


def tiny_tokenizer(add_bos: bool):
    """A byte-level BPE tokenizer trained on the synthetic text; adds BOS when asked (like Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_text(50, 40, seed=123)], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(model_type: str, vocab_size: int, layers: int = 2):
    """A config of the given architecture with ``layers`` blocks, hidden width 32."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    llama_like = dict(common, intermediate_size=64, num_key_value_heads=2)
    if model_type == "llama":
        return LlamaConfig(**llama_like)
    if model_type == "mistral":
        return MistralConfig(**llama_like, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**llama_like)
    if model_type == "qwen3":
        return Qwen3Config(**llama_like, head_dim=8)
    if model_type == "gemma3_text":
        # sliding window shorter than the windows used in tests, so block kwargs really differ
        return Gemma3TextConfig(
            **llama_like,
            head_dim=8,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        )
    if model_type == "opt":
        return OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    raise ValueError(model_type)


def build_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, layers: int = 2) -> Path:
    """Save a randomly initialised tiny causal LM and tokenizer to ``folder``."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(add_bos=model_type == "gemma3_text")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer), layers))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


#: Hugging Face Llama names -> llama.cpp's GGUF names (``blk.N.`` + the part, for the blocks)
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_BLOCK_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def build_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama as a float32 ``.gguf`` file with its byte-level BPE
    tokenizer in the metadata, as llama.cpp writes them, so the GGUF code path runs in seconds.

    The weights are random, so llama.cpp's permutation of the query and key rows is not applied."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(add_bos=False)
    config = tiny_config("llama", len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in tokenizer.all_special_tokens else gguf.TokenType.NORMAL for token in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index, part = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            name = f"blk.{index}.{GGUF_BLOCK_PARTS[part]}.weight"
        else:
            name = GGUF_NAMES[name]
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model per tested architecture (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        kind: build_tiny_model(root / kind, kind)
        for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt")
    }


@pytest.fixture(scope="session")
def plain_text(tmp_path_factory) -> Path:
    """Plain fine-tuning text for the recover tests."""
    path = tmp_path_factory.mktemp("ft") / "train.txt"
    path.write_text(synthetic_text(60, 80, seed=9))
    return path


@pytest.fixture(scope="session")
def tiny_llama_6(tmp_path_factory) -> Path:
    """A 6-block tiny Llama, for allocators that need several blocks to tell apart."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny6") / "llama6", "llama", seed=3, layers=6)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A synthetic calibration text file (blank-line separated documents)."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(synthetic_text(60, 60, seed=1))
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    """A synthetic evaluation text, disjoint seed from the calibration text."""
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(synthetic_text(40, 60, seed=2))
    return path


@pytest.fixture
def connections(monkeypatch) -> list[tuple]:
    """Every connection attempt, recorded and refused (as on a machine without a network)."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


class StopRun(Exception):
    """A simulated kill of a long run (raised from its progress callback)."""


def stop_after(steps: int):
    """A progress callback that raises ``StopRun`` once ``losa recover`` reports ``steps`` training steps: the
    run stops as a killed one would, after that step's checkpoint."""
    seen = [0]

    def progress(description: str, done: int, total: int, info: str = "") -> None:
        if description.endswith(" train"):
            seen[0] += 1
            if seen[0] >= steps:
                raise StopRun(f"stopped after {steps} steps")

    return progress


def bench(config):
    """``losa bench`` as the CLI runs it: the graphs the ONNX engines time made first, then the timings."""
    from losa_cli.export import bench_graphs
    from losa_cli.runtime import run_bench

    with bench_graphs(config) as graphs:
        return run_bench(config, graphs)


def folder_digest(folder: Path) -> str:
    """SHA-256 of a folder's file names and contents: "never modify the input model" checks."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
