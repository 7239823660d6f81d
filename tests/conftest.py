"""Shared fixtures. Fast tests use a tiny randomly initialised Llama with a byte-level BPE
tokenizer trained here on a few sentences: no download, built in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

CORPUS = [
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and wait.",
    "I cannot help with that request. Sorry, here is some safety information instead.",
    "Sure, here is a tutorial: step one, step two, step three.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; sharpen them so greedy paths are not ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(folder, max_positions: int | None = None) -> str:
    """The tiny model and its tokenizer saved to ``folder`` (loadable by name like a hub
    model); ``max_positions`` widens its context (jailbreak templates are long in a
    300-token vocabulary)."""
    tok = make_tokenizer()
    model = make_tiny_model(tok)
    if max_positions:
        model.config.max_position_embeddings = max_positions
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_response_probe(model_id: str, seed: int = 5):
    """A random response probe for ``model_id`` in the current rootdefense home."""
    from rootdefense import paths
    from rootdefense.probes.base import LinearProbe

    g = torch.Generator().manual_seed(seed)
    LinearProbe(torch.randn(48, generator=g), 0.0, layer=2, threshold=0.5,
                meta={"model_id": model_id, "kind": "response"}).save(paths.probe_dir(model_id))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture()
def rd_home(tmp_path, monkeypatch):
    """An empty rootdefense cache for tests that must not touch the real one."""
    monkeypatch.setenv("ROOTDEFENSE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def embedded_available() -> bool:
    from rootdefense.models.embedded import embedded_dir

    return (embedded_dir() / "model.safetensors").exists()


@pytest.fixture(scope="session")
def smollm():
    """The embedded model (integration tests). `make test` prepares it first."""
    if not embedded_available() and not os.environ.get("ROOTDEFENSE_PREPARE_IN_TESTS"):
        pytest.fail("embedded model not prepared: run `rootdefense prepare` (make test does)")
    from rootdefense.models import load_model

    return load_model("smollm2-135m")
