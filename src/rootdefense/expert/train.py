"""Fit the safety expert: LoRA on every linear layer, loss on answer tokens only.

Harmful prompts are paired with refusals or safe redirects (uncensorbench's refusing answers
where they exist, otherwise the varied refusals written for this project); benign prompts
with the model's OWN greedy answers, so the expert stays close to the base model wherever
there is nothing to refuse. Optionally (``disguised``, ``alarming``; off by default, see
:class:`ExpertSpec`), requests are also asked in disguise (:mod:`rootdefense.probes.
disguise`: a persona, a fiction frame, a prefix injection, jailbreak templates): a harmful
request inside a wrapper still gets a refusal, a benign one the model's own answer to the
wrapped request, meant to teach the expert to refuse the request beneath the wrapper and not
the wrapper; the benign-but-alarming set's fit part is answered by the model too, plain and
wrapped. Whole families can be held out (by default AutoDAN's templates). Measured, such an
expert did not refuse more under attack families and refused less under fiction frames (it
learned to stay in the frame; results/safety/expert, in git at 84f9aa1), so it is not the shipped one. Only
fit/val-split prompts are used; the test split stays clean.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import load_answer_pairs, load_dataset, refusal_for
from ..data.split import alarming_part, edgy_half, held_out, split_of
from ..errors import InputError
from ..probes.features import left_pad, prompt_ids, self_answers
from .adapter import META

REFUSAL_RE = re.compile(r"\b(I can(?:no|')t|I'm sorry|I am sorry|I won't|I will not|I'm not able|"
                        r"I must decline|I'm unable|can't help|cannot help|not able to help)", re.IGNORECASE)


@dataclass
class ExpertSpec:
    harmful: int = 160
    benign: int = 160
    answer_tokens: int = 48
    top_layers: float = 0.5  # LoRA on the top share of layers only: backward stops there (CPU time)
    rank: int = 16
    alpha: int = 32
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    seed: int = 0
    # off by default: the shipped expert is trained without them; an expert trained with
    # disguise 10 and alarming 48 refused less under fiction frames (results/safety/expert at 84f9aa1)
    disguised: int = 0  # harmful and benign requests asked inside each wrapper family (0: none)
    families: tuple[str, ...] = ("roleplay", "fiction", "prefix-injection", "dan", "inthewild")  # autodan held out
    alarming: int = 0  # requests of the alarming set's fit part, answered by the model (half of them wrapped)

    def __post_init__(self):
        from ..probes.disguise import FAMILIES

        for name in ("harmful", "benign"):
            if getattr(self, name) < 8:
                raise InputError(f"expert training needs at least 8 {name} examples")
        if self.disguised < 0 or self.alarming < 0:
            raise InputError("disguised and alarming must be >= 0")
        self.families = tuple(self.families)
        if unknown := [f for f in self.families if f not in FAMILIES]:
            raise InputError(f"unknown wrapper famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"choose among {', '.join(FAMILIES)}")
        if not 0 < self.top_layers <= 1:
            raise InputError("top_layers must lie in (0, 1]")
        if not 1 <= self.rank <= 256:
            raise InputError("rank must lie in 1..256")
        if not 1 <= self.epochs <= 20:
            raise InputError("epochs must lie in 1..20")
        if not 0 < self.lr < 1:
            raise InputError("lr must lie in (0, 1)")


def _trainable(e) -> bool:
    return split_of(e.prompt) != "test"


def build_examples(lm, spec: ExpertSpec, log=print) -> list[dict]:
    """(prompt, target, kind, source) rows: refusals for harmful prompts, own answers for
    benign ones; a wrapped request's source is ``family:dataset``."""
    from ..probes.disguise import wrap

    rng = random.Random(spec.seed)
    refusing = {e.prompt: e.answer for e in load_answer_pairs("uncensorbench") if e.answer_kind == "refuse"}
    harmful = [e for n in ("advbench", "harmbench", "donotanswer", "uncensorbench") for e in load_dataset(n)
               if _trainable(e)]
    harmful = rng.sample(harmful, min(spec.harmful, len(harmful)))
    rows = [{"prompt": e.prompt, "target": refusing.get(e.prompt) or refusal_for(e.prompt, e.id),
             "kind": "refuse", "source": e.source} for e in harmful]
    benign = [e for n in ("imperative", "mtbench", "gsm8k", "sharegpt") for e in load_dataset(n, limit=400)
              if _trainable(e)]
    benign += [e for e in load_dataset("edgy") if edgy_half(e.prompt) == "train" and _trainable(e)]
    benign = rng.sample(benign, min(spec.benign, len(benign)))
    alarming = [e for e in load_dataset("alarming") if alarming_part(e.prompt) == "fit"]
    alarming = rng.sample(alarming, min(spec.alarming, len(alarming)))
    # (prompt, source) of every request the model answers itself
    asked = [(e.prompt, e.source) for e in benign]
    asked += [(e.prompt if i % 2 == 0 else wrap(("roleplay", "fiction")[i // 2 % 2], e.prompt, i // 4),
               e.source if i % 2 == 0 else f"{('roleplay', 'fiction')[i // 2 % 2]}:{e.source}")
              for i, e in enumerate(alarming)]
    for f, family in enumerate(spec.families):
        for i, e in enumerate(rng.sample(harmful, min(spec.disguised, len(harmful)))):
            rows.append({"prompt": wrap(family, e.prompt, i), "target": refusal_for(e.prompt, f"{e.id}:{family}"),
                         "kind": "refuse", "source": f"{family}:{e.source}"})
        asked += [(wrap(family, e.prompt, i), f"{family}:{e.source}")
                  for i, e in enumerate(rng.sample(benign, min(spec.disguised, len(benign))))]
    log(f"expert data: {len(rows)} harmful prompts -> refusals ({len(rows) - len(harmful)} in disguise: "
        f"{', '.join(spec.families) or 'none'}); answering {len(asked)} benign prompts with the model itself "
        f"({spec.answer_tokens} tokens)")
    answers = self_answers(lm, [p for p, _ in asked], max_new_tokens=spec.answer_tokens)
    rows += [{"prompt": p, "target": a, "kind": "answer", "source": src}
             for (p, src), a in zip(asked, answers, strict=True) if a.strip()]
    rng.shuffle(rows)
    return rows


def _linear_names(model) -> list[str]:
    """Names of the linear layers inside the decoder (every family names them its own way);
    the output head is left alone."""
    out = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and mod is not out})


def length_batches(lengths: list[int], size: int, seed: int) -> list[list[int]]:
    """Batches of indices of similar length, in random order: a jailbreak template runs to
    ~1,000 tokens, and left padding a batch of short requests to it would multiply the cost.
    Equal lengths are shuffled among themselves, so each epoch's batches differ."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def _encode(lm, row, max_answer: int) -> tuple[list[int], int]:
    head = prompt_ids(lm, row["prompt"])
    eos = lm.eos_token_ids[:1]
    ans = lm.tokenizer(row["target"], add_special_tokens=False)["input_ids"][:max_answer] + eos
    return head + ans, len(head)


def train_expert(lm, spec: ExpertSpec, out: str | Path, log=print, check: bool = False) -> dict:
    """Fit the expert on ``lm`` and save it in ``out``; returns its metadata. ``check``: then
    compare the refusal rates of base and expert on held-out prompts (:func:`refusal_rates`),
    recorded in the metadata."""
    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    torch.manual_seed(spec.seed)
    rows = build_examples(lm, spec, log=log)
    encoded = [_encode(lm, r, spec.answer_tokens + 16) for r in rows]
    n = lm.num_layers
    first = n - max(1, round(spec.top_layers * n))
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.05, target_modules=_linear_names(lm.model),
                     layers_to_transform=list(range(first, n)), task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, cfg, adapter_name="default")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    steps = spec.epochs * math.ceil(len(encoded) / spec.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    losses = []
    with tqdm(total=steps, desc="expert LoRA", unit="step") as bar:
        for epoch in range(spec.epochs):
            for idx in length_batches([len(e[0]) for e in encoded], spec.batch_size, spec.seed + epoch):
                batch = [encoded[i] for i in idx]
                ids, mask = left_pad([b[0] for b in batch], pad)
                labels = torch.full_like(ids, -100)
                width = ids.shape[1]
                for r, (seq, n_prompt) in enumerate(batch):
                    off = width - len(seq)
                    labels[r, off + n_prompt:] = ids[r, off + n_prompt:]
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                result = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                               position_ids=pos.to(lm.device), labels=labels.to(lm.device))
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(result.loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    # peft writes the adapter into a subfolder named after it unless it is "default"
    counts: dict[str, int] = {}
    for r in rows:
        counts[f"{r['kind']}:{r['source']}"] = counts.get(f"{r['kind']}:{r['source']}", 0) + 1
    meta = {
        "model_id": lm.model_id, "hidden_size": lm.hidden_size, "spec": asdict(spec),
        "data": {"counts": counts, "rows": len(rows),
                 "harmful_targets": "uncensorbench refusing answers, else refusals written for rootdefense",
                 "benign_targets": "the model's own greedy answers",
                 "split": "fit/val split prompts only (test split never used)"},
        "train": {"steps": steps, "first_loss": round(losses[0], 4), "final_loss": round(
            sum(losses[-10:]) / len(losses[-10:]), 4), "seconds": round(time.time() - t0, 1)},
    }
    model.unload()  # give the caller its plain model back
    (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if check:
        meta["check"] = refusal_rates(lm, out)
        (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def refusal_rates(lm, folder: str | Path, n: int = 12, tokens: int = 40) -> dict:
    """Greedy answers of base and expert to held-out prompts (test split / edgy eval half):
    the share that a refusal pattern matches. A quick check, not the evaluation."""
    from dataclasses import replace

    from .adapter import load_expert

    harmful = [e.prompt for e in held_out("advbench", n)]
    benign = [e.prompt for e in held_out("mtbench", n // 2) + held_out("edgy", n - n // 2)]
    peft_model, _ = load_expert(lm, folder)
    expert_lm = replace(lm, model=peft_model)
    out = {}
    try:
        for name, prompts in (("harmful", harmful), ("benign", benign)):
            got = self_answers(expert_lm, prompts, max_new_tokens=tokens)
            with peft_model.disable_adapter():
                base = self_answers(expert_lm, prompts, max_new_tokens=tokens)
            out[name] = {"n": len(prompts),
                         "expert_refusal_rate": sum(bool(REFUSAL_RE.search(a)) for a in got) / len(prompts),
                         "base_refusal_rate": sum(bool(REFUSAL_RE.search(a)) for a in base) / len(prompts),
                         "expert_examples": got[:2]}
    finally:
        peft_model.unload()
    return out
