"""`rootdefense bench`: decoding speed and memory, defended and not, side by side.

Every method answers the same prompts (MT-bench turn 1 as benign, held-out AdvBench as
harmful), greedy, in ONE process, interleaved prompt by prompt (each prompt is answered by
every method before the next prompt), so drift of a noisy machine hits all methods alike.
Figures are medians over prompts; each method's ratio is its median tokens/s over
transformers ``generate``'s, measured in the same run.

Methods (skipped, with the reason, when a part is missing):

- ``hf-generate``: transformers ``generate``, the undefended reference;
- ``hf-prompt-lookup``: transformers' own prompt-lookup decoding (the peer);
- ``hf-generate-kernels`` / ``hf-prompt-lookup-kernels``: the same two with rootdefense's
  linear products (below), so that what the products alone give is seen apart from what
  the decoders give;
- ``hf-assisted``: transformers assisted generation with ``--draft-model``;
- ``plain``: rootdefense undefended (no probe);
- ``rds-exact``: the threshold rule scoring candidates at every step (paper-style RDS);
- ``rds-expert-exact``: the tuned default defense (probe watch, rollback, expert);
- ``plain-spec-head``: rootdefense undefended with the draft head (no probe);
- ``rds-spec-ngram`` / ``rds-spec-head`` / ``rds-spec-model``: the tuned default defense
  with drafts verified in one forward (prompt lookup / the model's draft head from
  ``rootdefense draft train`` / ``--draft-model``);
- ``rds-spec-threshold-ngram`` / ``rds-spec-threshold-head``: the threshold rule with drafts;
- ``rds-spec-ngram-sentence``: ``rds-spec-ngram`` rolling back the current sentence instead
  of the whole answer (whether that lets a stream start earlier: see ``first_text_s``);
- ``rds-batch`` / ``rds-expert-batch``: ``rds-exact`` / ``rds-expert-exact`` answering
  ``--batch-size`` prompts of the set together (cycled when the set is smaller); their
  tokens/s is the batch's total throughput, and ``ratio_vs_single`` compares it with the
  single-stream method's median (``ratio_vs_rds_exact``: with single-stream ``rds-exact``);
- ``rds-spec-threshold-ngram-batch`` / ``rds-spec-ngram-batch``: the speculative methods
  of the same names, batched (each prompt drafts its own chain; one forward per round).

Each rootdefense method also records ``first_text_s``: when the first piece of final text
reached a streamer (what a streaming client waits for; text that rds-expert may still roll
back is held, see :mod:`rootdefense.decoding.streamer`), and ``first_text_share``, that
time over the whole answer's (1.0: the answer arrives in one piece at its end).

The profile (``profile`` in the JSON) explains the figures: the median cost of one target
forward over a chain of T new tokens after a cached context (what verification pays per
round), of one candidate-scoring forward (what every exact RDS step pays), of the same two
for a batch's rows at once (a batched round: one token per row, or every row's pool), and
of one probe call. Speculation gains when the tokens kept per forward outgrow the chain's
cost relative to a one-token forward; a batch gains what its rows' forward costs less than
that many one-row forwards.

The transformers methods run with transformers' own ``F.linear``; rootdefense's decoders
run with the linear products its loader installs (``models/kernels.py``: per size, the
faster of ``F.linear`` and ``W @ x.T`` on this machine), which is what makes a forward over
a few drafted tokens cost about one token's forward on CPUs whose BLAS computes small
products row by row. ``plain`` shows what they change for one-token decoding; the profile
gives chain costs under both.

Wall time covers the whole answer (prefill included) for every method alike. Peak RSS is
the process's largest resident set seen while the method ran (sampled every 5 ms); the
model's weights are shared by all methods, so it is the same baseline for each.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch

from .errors import InputError

METHODS = ("hf-generate", "hf-generate-kernels", "hf-prompt-lookup", "hf-prompt-lookup-kernels", "hf-assisted", "plain", "plain-spec-head", "rds-exact",
           "rds-expert-exact", "rds-spec-ngram", "rds-spec-head", "rds-spec-model", "rds-spec-threshold-ngram",
           "rds-spec-threshold-head", "rds-batch", "rds-expert-batch", "rds-spec-threshold-ngram-batch",
           "rds-spec-ngram-batch", "rds-lazy", "rds-lazy-batch", "rds-spec-threshold-ngram+head",
           "rds-spec-ngram-sentence")
DEFAULT_METHODS = ("hf-generate", "hf-prompt-lookup", "plain", "plain-spec-head", "rds-exact", "rds-expert-exact",
                   "rds-spec-ngram", "rds-spec-head", "rds-spec-threshold-ngram", "rds-spec-threshold-head",
                   "rds-batch", "rds-expert-batch", "rds-spec-threshold-ngram-batch", "rds-spec-ngram-batch",
                   "rds-lazy", "rds-lazy-batch")
BATCH_METHODS = {"rds-batch": "rds-exact", "rds-lazy-batch": "rds-lazy", "rds-expert-batch": "rds-expert-exact",  # -> its single-stream peer
                 "rds-spec-threshold-ngram-batch": "rds-spec-threshold-ngram", "rds-spec-ngram-batch": "rds-spec-ngram"}


@dataclass
class BenchSpec:
    model: str = "smollm2-135m"
    prompts: int = 5  # per set
    max_new_tokens: int = 128
    methods: tuple[str, ...] = DEFAULT_METHODS
    draft_model: str | None = None
    max_draft: int = 8
    threads: int | None = None
    batch_size: int = 8

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise InputError(f"unknown bench method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        if "hf-generate" not in self.methods:
            raise InputError("the bench needs 'hf-generate': every ratio is measured against it")
        if self.prompts < 1 or not 1 <= self.max_new_tokens <= 4096 or self.batch_size < 1:
            raise InputError("prompts and batch_size must be >= 1, max_new_tokens in 1..4096")
        needs_draft = [m for m in self.methods if m in ("hf-assisted", "rds-spec-model")]
        if needs_draft and not self.draft_model:
            raise InputError(f"method(s) {', '.join(needs_draft)} need --draft-model NAME")


class _PeakRSS:
    """The largest resident set size of this process while the block runs (polled)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page
        except OSError:  # not Linux: the lifetime peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def bench_prompts(n: int) -> dict[str, list[str]]:
    from .data.split import held_out

    return {"benign": [e.prompt for e in held_out("mtbench", n)],
            "harmful": [e.prompt for e in held_out("advbench", n)]}


def _hf_runner(lm, extra: dict, stock: bool = True):
    """transformers as users run it: its own ``F.linear`` (the size-picked products of
    ``models/kernels.py`` are rootdefense's, so the reference runs without them unless
    ``stock`` is False)."""
    from contextlib import ExitStack

    from .models.kernels import stock_linears

    pad = lm.tokenizer.pad_token_id
    gen_cfg = {"do_sample": False, "eos_token_id": lm.eos_token_ids,
               "pad_token_id": pad if pad is not None else lm.eos_token_ids[0], **extra}
    models = [lm.model] + ([extra["assistant_model"]] if "assistant_model" in extra else [])

    def run(ids, n):
        with ExitStack() as stack:
            for m in models if stock else ():
                stack.enter_context(stock_linears(m))
            out = lm.model.generate(ids, max_new_tokens=n, min_new_tokens=0, **gen_cfg)
        return out[0, ids.shape[1]:].tolist(), {}

    return run


def _defender_runner(defender):
    from .decoding import GenerationConfig, TextStreamer

    def run(ids, n):
        first = []  # when the first final text reached the streamer (what a server's client waits for)
        t0 = time.perf_counter()
        streamer = TextStreamer(lambda piece: first or first.append(time.perf_counter() - t0))
        gen = defender.decoder.generate(ids, GenerationConfig(max_new_tokens=n), streamer=streamer)
        t = gen.timings
        extra = {"first_text_s": first[0] if first else None}
        # mean accepted length: tokens emitted per target forward (drafted decoders only)
        if defender.decoder.drafter is not None:
            extra["accepted_len"] = t["tokens_per_forward"]
        return gen.token_ids, extra

    return run


def _batch_runner(defender):
    from .decoding import GenerationConfig

    def run(items, n):
        gens = defender.generate_batch(items, GenerationConfig(max_new_tokens=n))
        tpf = [g.timings["tokens_per_forward"] for g in gens] if defender.decoder.drafter is not None else []
        return [g.token_ids for g in gens], ({"accepted_len": statistics.mean(tpf)} if tpf else {})

    return run


def build_methods(lm, spec: BenchSpec, log=print) -> tuple[dict, dict]:
    """name -> runner(ids, max_new_tokens) -> (new token ids, extra); and name -> skip reason."""
    from .api import Defender
    from .errors import RootDefenseError

    runners, skipped = {}, {}
    draft = None
    if spec.draft_model:
        from .models import load_model

        draft = load_model(spec.draft_model, dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
    for name in spec.methods:
        try:
            if name == "hf-generate":
                runners[name] = _hf_runner(lm, {})
            elif name == "hf-prompt-lookup":
                runners[name] = _hf_runner(lm, {"prompt_lookup_num_tokens": spec.max_draft})
            elif name == "hf-generate-kernels":
                runners[name] = _hf_runner(lm, {}, stock=False)
            elif name == "hf-prompt-lookup-kernels":
                runners[name] = _hf_runner(lm, {"prompt_lookup_num_tokens": spec.max_draft}, stock=False)
            elif name == "hf-assisted":
                runners[name] = _hf_runner(lm, {"assistant_model": draft.model})
            elif name == "plain":
                runners[name] = _defender_runner(Defender.load(lm=lm, defense="none", monitor=False))
            elif name == "rds-exact":
                runners[name] = _defender_runner(Defender.load(lm=lm, defense="rds", rule="threshold", drafter="none"))
            elif name in ("rds-lazy", "rds-lazy-batch"):  # exact RDS, candidates scored only where flagged
                d = Defender.load(lm=lm, defense="rds", rule="threshold", drafter="lazy")
                runners[name] = (_batch_runner if name.endswith("-batch") else _defender_runner)(d)
            elif name == "rds-batch":
                runners[name] = _batch_runner(Defender.load(lm=lm, defense="rds", rule="threshold", drafter="none"))
            elif name == "rds-expert-batch":
                runners[name] = _batch_runner(Defender.load(lm=lm, drafter="none"))  # the tuned default, no drafts
            elif name == "rds-spec-threshold-ngram-batch":
                runners[name] = _batch_runner(Defender.load(lm=lm, defense="rds", rule="threshold", drafter="ngram",
                                                            max_draft=spec.max_draft))
            elif name == "rds-spec-ngram-batch":
                runners[name] = _batch_runner(Defender.load(lm=lm, drafter="ngram", max_draft=spec.max_draft))
            elif name == "plain-spec-head":
                runners[name] = _defender_runner(Defender.load(lm=lm, defense="none", monitor=False, drafter="head",
                                                               max_draft=spec.max_draft))
            elif name in ("rds-spec-threshold-ngram", "rds-spec-threshold-head", "rds-spec-threshold-ngram+head"):
                runners[name] = _defender_runner(Defender.load(lm=lm, defense="rds", rule="threshold",
                                                               drafter=name.rsplit("-", 1)[1],
                                                               max_draft=spec.max_draft))
            elif name == "rds-spec-ngram-sentence":  # the tuned defense, rolling back sentences, not answers
                runners[name] = _defender_runner(Defender.load(lm=lm, drafter="ngram", max_draft=spec.max_draft,
                                                               rollback="sentence"))
            else:
                drafter = {"rds-expert-exact": "none", "rds-spec-ngram": "ngram", "rds-spec-head": "head",
                           "rds-spec-model": f"model:{spec.draft_model}"}[name]
                d = Defender.load(lm=lm, drafter=drafter, max_draft=spec.max_draft)  # the tuned default defense
                if d.settings.defense != "rds-expert":
                    log(f"note: {name} runs the model's default defense '{d.settings.defense}' ({d.settings.source})")
                runners[name] = _defender_runner(d)
        except RootDefenseError as exc:
            skipped[name] = str(exc)
            log(f"skipping {name}: {exc}")
    return runners, skipped


@torch.no_grad()
def profile_forwards(lm, context: int = 160, lengths=(1, 2, 3, 4, 5, 6, 8, 12), candidates: int | None = None,
                     reps: int = 9, batch: int = 8) -> dict:
    """Median ms of target forwards after a cached ``context``: a chain of T tokens for each
    T in ``lengths`` (speculative verification), ``candidates`` alternatives at one position
    (exact RDS scoring; default: the decoders' pool, ``GenerationConfig.top_m``), the same two
    for ``batch`` rows at once (what a batched round pays), and a probe call over the chain's
    hidden states."""
    from .decoding import GenerationConfig
    from .decoding.candidates import forward_candidates
    from .decoding.hidden import forward_hidden
    from .decoding.kvcache import new_cache
    from .decoding.verify import crop_to, forward_chain
    from .models import kernels
    from .probes.base import LinearProbe

    candidates = candidates or GenerationConfig().top_m
    g = torch.Generator().manual_seed(0)
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    cache, rows = new_cache(lm.model), new_cache(lm.model)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(lm.device)
    lm.model(input_ids=prompt, cache=cache, use_cache=True)
    lm.model(input_ids=prompt.repeat(batch, 1), cache=rows, use_cache=True)

    def timed(fn, on=cache) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
            crop_to(on, context)
        return round(statistics.median(times), 2)

    def batch_forward(width: int):  # every row: ``width`` alternatives at its next position
        forward_hidden(lm.model, layer, input_ids=torch.randint(0, vocab, (batch, width), generator=g).to(lm.device),
                       position_ids=torch.full((batch, width), context, device=lm.device), cache=rows, use_cache=True,
                       attention_mask=torch.zeros((batch, 1, width, context + width), device=lm.device,
                                                  dtype=lm.model.dtype))

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).to(lm.device)

    layer = lm.num_layers // 2
    chain = {str(n): timed(lambda n=n: forward_chain(lm.model, cache, ids(n), context, layer)) for n in lengths}
    with kernels.stock_linears(lm.model):  # what the same chains cost with transformers' own F.linear
        stock = {str(n): timed(lambda n=n: forward_chain(lm.model, cache, ids(n), context, layer)) for n in lengths}
    pool = timed(lambda: forward_candidates(lm.model, cache, ids(candidates), context, layer))
    probe = LinearProbe(torch.randn(lm.hidden_size, generator=g), 0.0, layer=layer, threshold=0.5, meta={}).to(lm.device)
    hidden = torch.randn(max(lengths), lm.hidden_size, generator=g).to(lm.device)
    t0 = time.perf_counter()
    for _ in range(100):
        probe.score(hidden)
    probe_ms = round(10 * (time.perf_counter() - t0), 3)
    base = chain["1"]
    rows_one, rows_pool = timed(lambda: batch_forward(1), rows), timed(lambda: batch_forward(candidates), rows)
    return {"context_tokens": context, "chain_forward_ms": chain,
            "chain_cost_vs_one_token": {k: round(v / base, 2) for k, v in chain.items()},
            "linear_policy": kernels.mode() if kernels.installed(lm.model) else "stock",
            "chain_forward_ms_stock_linear": stock,
            "chain_cost_vs_one_token_stock_linear": {k: round(v / stock["1"], 2) for k, v in stock.items()},
            "candidate_forward_ms": {"candidates": candidates, "ms": pool, "vs_one_token": round(pool / base, 2)},
            "batch_forward_ms": {"rows": batch, "one_token": rows_one, "one_token_vs_one_row": round(rows_one / base, 2),
                                 "candidates": candidates, "pool": rows_pool,
                                 "pool_vs_one_row": round(rows_pool / base, 2)},
            "probe_ms": probe_ms}


def _paired_ratio(items: list[dict], reference: list[dict]) -> float | None:
    """The median over prompts of each prompt's tokens/s against generate's on the same
    prompt, timed minutes apart in the same run. ``ratio_vs_generate`` (the ratio of the
    medians) mixes prompts; this pairs them, so a slow spell of the machine or one
    easy-to-draft prompt moves it less."""
    ref = {it["prompt"]: it["tokens"] / it["wall_s"] for it in reference if it["tokens"]}
    ratios = [it["tokens"] / it["wall_s"] / ref[it["prompt"]] for it in items if it["tokens"] and it["prompt"] in ref]
    return round(statistics.median(ratios), 3) if ratios else None


def run_bench(spec: BenchSpec, log=print) -> dict:
    from tqdm.auto import tqdm

    from .models import encode_chat, load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    lm = load_model(spec.model)
    runners, skipped = build_methods(lm, spec, log)
    # the linear products' one-time timing (models/kernels.py), kept out of every timed answer
    from .models import kernels

    calibration_s = kernels.calibrate(lm.model)
    sets = bench_prompts(spec.prompts)
    per: dict[tuple[str, str], list[dict]] = {}
    reference: dict[tuple[str, int], list[int]] = {}
    jobs = [(s, i, p) for s, ps in sets.items() for i, p in enumerate(ps)]
    # one untimed warm-up answer per method (first-call allocations, lazy inits)
    warm = encode_chat(lm.tokenizer, [{"role": "user", "content": "Hello"}])
    for name, run in runners.items():
        with torch.no_grad():
            run(["Hello", "Hi"] if name in BATCH_METHODS else warm, 4)
    for set_name, i, prompt in tqdm(jobs, desc="bench", unit="prompt"):
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}], lm.max_context,
                          reserve=spec.max_new_tokens)
        for name, run in runners.items():
            if name in BATCH_METHODS:
                continue
            with _PeakRSS() as rss, torch.no_grad():
                t0 = time.perf_counter()
                tokens, extra = run(ids, spec.max_new_tokens)
                wall = time.perf_counter() - t0
            if name == "hf-generate":
                reference[(set_name, i)] = tokens
            per.setdefault((name, set_name), []).append({
                "prompt": i, "tokens": len(tokens), "wall_s": wall, "peak_rss_mb": rss.peak / 2 ** 20,
                "same_as_generate": tokens == reference.get((set_name, i)), **extra})
    batches = {}
    for name in (n for n in runners if n in BATCH_METHODS):
        for set_name, ps in sets.items():
            items = [ps[i % len(ps)] for i in range(spec.batch_size)]
            with _PeakRSS() as rss, torch.no_grad():
                t0 = time.perf_counter()
                tokens, extra = runners[name](items, spec.max_new_tokens)
                wall = time.perf_counter() - t0
            batches[(name, set_name)] = {"tokens": sum(map(len, tokens)), "wall_s": wall, **extra,
                                         "peak_rss_mb": rss.peak / 2 ** 20}
    results = []
    for (name, set_name), b in batches.items():
        ref = statistics.median(it["tokens"] / it["wall_s"] for it in per[("hf-generate", set_name)] if it["tokens"])
        peer = per.get((BATCH_METHODS[name], set_name))
        single = statistics.median(it["tokens"] / it["wall_s"] for it in peer if it["tokens"]) if peer else None
        exact_runs = per.get(("rds-exact", set_name))
        exact = statistics.median(it["tokens"] / it["wall_s"] for it in exact_runs if it["tokens"]) \
            if exact_runs else None
        tps = b["tokens"] / b["wall_s"]
        results.append({"method": name, "set": set_name, "prompts": spec.batch_size, "batch_size": spec.batch_size,
                        "tokens_per_s": round(tps, 2), "ms_per_token": round(1000 * b["wall_s"] / b["tokens"], 2),
                        "ratio_vs_generate": round(tps / ref, 3),
                        "ratio_vs_single": round(tps / single, 3) if single else None,
                        "ratio_vs_rds_exact": round(tps / exact, 3) if exact else None,
                        "accepted_len": round(b["accepted_len"], 3) if "accepted_len" in b else None,
                        "peak_rss_mb": round(b["peak_rss_mb"], 1),
                        "tokens_mean": round(b["tokens"] / spec.batch_size, 1), "same_as_generate": None})
    for (name, set_name), items in per.items():
        tps = [it["tokens"] / it["wall_s"] for it in items if it["tokens"]]
        ref = [it["tokens"] / it["wall_s"] for it in per[("hf-generate", set_name)] if it["tokens"]]
        acc = [it["accepted_len"] for it in items if it.get("accepted_len") is not None]
        firsts = [it for it in items if it.get("first_text_s") is not None]
        results.append({
            "method": name, "set": set_name, "prompts": len(items),
            "tokens_per_s": round(statistics.median(tps), 2),
            "ms_per_token": round(statistics.median(1000 * it["wall_s"] / it["tokens"] for it in items if it["tokens"]),
                                  2),
            "ratio_vs_generate": round(statistics.median(tps) / statistics.median(ref), 3),
            "paired_ratio_vs_generate": _paired_ratio(items, per[("hf-generate", set_name)]),
            # against rootdefense's own undefended decoding, on the same linear products
            "ratio_vs_plain": round(statistics.median(tps) / statistics.median(
                it["tokens"] / it["wall_s"] for it in per[("plain", set_name)] if it["tokens"]), 3)
            if ("plain", set_name) in per else None,
            "accepted_len": round(statistics.mean(acc), 3) if acc else None,
            "peak_rss_mb": round(max(it["peak_rss_mb"] for it in items), 1),
            "tokens_mean": round(statistics.mean(it["tokens"] for it in items), 1),
            "same_as_generate": round(sum(it["same_as_generate"] for it in items) / len(items), 3),
            # streaming: the first final text (held back to the rollback horizon) and its share of the answer's time
            "first_text_s": round(statistics.median(it["first_text_s"] for it in firsts), 3) if firsts else None,
            "first_text_share": round(statistics.median(it["first_text_s"] / it["wall_s"] for it in firsts), 3)
            if firsts else None,
        })
    log("profiling target forwards ...")
    per_prompt = [{"method": name, "set": set_name, **{k: round(v, 6) if isinstance(v, float) else v
                                                      for k, v in it.items()}}
                  for (name, set_name), items in per.items() for it in items]
    return {"results": results, "skipped": skipped, "per_prompt": per_prompt, "spec": asdict(spec), "profile": profile_forwards(lm, batch=spec.batch_size),
            "machine": {"platform": platform.platform(), "cpu": kernels.cpu_name(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "linear_calibration_s": round(calibration_s, 2), "device": str(lm.device), "dtype": str(lm.dtype),
                        "torch": torch.__version__},
            "created": datetime.now(UTC).isoformat(timespec="seconds")}


def bench_table(report: dict) -> str:
    """A plain-text view of :func:`run_bench`'s report for the terminal."""

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{'method':30} {'set':8} {'tok/s':>8} {'ms/tok':>8} {'x generate':>10} {'paired':>7} "
             f"{'x plain':>8} {'accepted':>9} {'1st text s':>10} {'peak MB':>8}"]
    for r in report["results"]:
        lines.append(f"{r['method']:30} {r['set']:8} {r['tokens_per_s']:8.1f} {r['ms_per_token']:8.1f} "
                     f"{r['ratio_vs_generate']:10.2f} {fmt(r.get('paired_ratio_vs_generate')):>7} "
                     f"{fmt(r.get('ratio_vs_plain')):>8} {fmt(r['accepted_len']):>9} {fmt(r.get('first_text_s')):>10} "
                     f"{r['peak_rss_mb']:8.0f}")
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines)
