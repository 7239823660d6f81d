"""`rootdefense tune`: choose a model's defense defaults from measurements.

The correcting decoder (``rds-expert``) decodes exactly like the undefended model until
its recovery monitor flags the answer, and the monitor only reads the probe's harm of each
emitted token. So one undefended pass over calibration prompts, with the probe's harm of
every token recorded, tells exactly where every monitor setting (``tau``, ``window``,
``k``) would first flag each answer. The sweep then picks the setting that flags the most
harmful answers while flagging at most ``max_benign_flag`` of benign ones (a flagged benign
answer is rewritten, so this is the budget for changed benign answers).

With a query probe trained, the sweep also tries a gate: requests whose query-probe score
is at or above the gate are watched by a second, stricter setting. Flags add up per
request, so the best pair within the budget is found exactly (``gated``).

Whether to steer with the safety expert is measured too: a model that already refuses
most plain harmful requests on its own has harmless candidates of its own to steer among
(the paper's assumption); one that does not needs the expert.

Where the monitor reads the request (a gate or a blend), tuning also sets the suspicion
check (``suspect_nll``): the threshold lies just above the highest suspicion of the benign
prompts read (the first ``suspicion_sharegpt`` ShareGPT user turns, real traffic with its
typos and pasted text, and the benign calibration sources' validation prompts), rounded up
to the next half nat past a 0.2-nat margin (:func:`suspicion_threshold`).

Calibration prompts come from the validation split (``data/split.py``): never the test
split that evaluation reads, never the fit split that probes and the expert train on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from .correction import CorrectionSettings, DegenerationGuard
from .correction.monitor import trajectory
from .data.split import edgy_half, part_of
from .decoding import GenerationConfig
from .defaults import weights_sha256
from .errors import InputError
from .paths import CALIBRATION_FILE, expert_dir, probe_dir

HARMFUL_SOURCES = ("advbench", "harmbench")
BENIGN_SOURCES = ("mtbench", "sharegpt", "edgy", "sensitive", "alarming")
# the attacks tuning may ask requests under: text templates and wrappers (no optimisation)
TUNING_ATTACKS = ("none", "prefill", "roleplay", "fiction", "prefix-injection", "dan", "inthewild", "gcg-transfer")
TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
GATES = (0.5, 0.7, 0.9)  # query-probe scores tried as the gate (plus the probe's calibrated threshold)
BLENDS = (0.0, 0.25, 0.5)  # weights of the request's query score in the monitor's trajectory score
WINDOWS = (4, 8, 16)
MAX_K = 6


@dataclass
class TuneSpec:
    harmful: int = 40  # calibration harmful prompts (each under every attack in ``attacks``)
    benign: int = 40  # calibration benign prompts (each under every attack in ``benign_attacks``)
    attacks: tuple[str, ...] = ("none", "prefill", "roleplay")
    # a wrapper alone must not make the monitor fire: benign requests are asked inside them too
    benign_attacks: tuple[str, ...] = ("none", "roleplay")
    max_new_tokens: int = 128
    max_benign_flag: float = 0.03
    refusal_reflex: float = 0.5  # undefended refusal rate at or above which the expert is off
    # harm steered tokens must stay below once an answer is flagged (None: the flagging
    # monitor's tau); steering cannot be replayed from undefended answers, so it is chosen
    # by decoding validation prompts (scripts/steer_tau_val.py) and given here
    steer_tau: float | None = None
    taus: tuple[float, ...] = TAUS
    windows: tuple[int, ...] = WINDOWS
    seed: int = 0
    # the suspicion check's benign reading: this many ShareGPT user turns (0: no check)
    suspicion_sharegpt: int = 400
    # the strict setting's own benign answers: up to this many more benign validation requests
    # that reach the lowest gate tried (:func:`armed_prompts`), decoded beside the others; a
    # gate's strict setting may flag at most ``max_armed_flag`` of those that gate arms. The
    # pooled budget alone lets the strict setting refuse every armed request when few of the
    # calibration's benign requests are armed (0: no such answers, as before)
    armed: int = 0
    max_armed_flag: float = 0.1

    def __post_init__(self):
        if self.harmful < 1 or self.benign < 1:
            raise InputError(f"tuning needs >= 1 harmful and >= 1 benign prompt, got {self.harmful}, {self.benign}")
        if not 0 <= self.max_benign_flag < 1:
            raise InputError(f"max_benign_flag must lie in [0, 1), got {self.max_benign_flag}")
        CorrectionSettings(steer_tau=self.steer_tau).validate()  # the decoder's own check of the value
        if not 1 <= self.max_new_tokens <= 4096:
            raise InputError(f"max_new_tokens must lie in 1..4096, got {self.max_new_tokens}")

        bad = [a for a in (*self.attacks, *self.benign_attacks) if a not in TUNING_ATTACKS]
        if bad:
            raise InputError(f"tuning attacks must be template attacks; got {', '.join(bad)}; "
                             f"choose from {', '.join(TUNING_ATTACKS)}")
        if not self.attacks or not self.benign_attacks:
            raise InputError("tuning needs at least one attack for harmful and one for benign requests ('none')")
        if not isinstance(self.suspicion_sharegpt, int) or self.suspicion_sharegpt < 0:
            raise InputError(f"suspicion_sharegpt must be an integer >= 0, got {self.suspicion_sharegpt!r}")
        if not isinstance(self.armed, int) or self.armed < 0:
            raise InputError(f"armed must be an integer >= 0 (benign requests), got {self.armed!r}")
        if not 0 <= self.max_armed_flag < 1:
            raise InputError(f"max_armed_flag must lie in [0, 1), got {self.max_armed_flag}")


def calibration_prompts(spec: TuneSpec):
    """(harmful, benign) examples no probe was fitted on: the validation split (benign side:
    MT-bench, ShareGPT and the project's sensitive questions), and from the benign-but-edgy
    set the prompts of its train half that the probes hold out (its validation and test
    buckets). The probes fit the rest of that half, so those score low by construction and
    would hide the monitor's flags on unseen edgy requests."""
    from .data.loaders import load_dataset

    def pick(sources, n, keep):
        """Round-robin over the sources, so a small one leaves its share to the others."""
        pools = [[e for e in load_dataset(name) if keep(name, e.prompt)] for name in sources]
        rows = []
        for i in range(max(map(len, pools))):
            rows += [pool[i] for pool in pools if i < len(pool)]
        return rows[:n]

    harmful = pick(HARMFUL_SOURCES, spec.harmful, lambda _, p: part_of(p) == "val")
    benign = pick(BENIGN_SOURCES, spec.benign, _benign_validation)
    return harmful, benign


def _benign_validation(name: str, prompt: str) -> bool:
    """Whether a benign source's prompt is one tuning may read (see :func:`calibration_prompts`)."""
    return (edgy_half(prompt) == "train" and part_of(prompt) != "fit") if name == "edgy" \
        else part_of(prompt, name) == "val"


ARMED_TOKENS = 512  # longest request (prompt tokens) read for the armed benign answers


def armed_prompts(lm, query, spec: TuneSpec, seen: set[str], floor: float) -> list[tuple]:
    """(example, query score) of up to ``spec.armed`` benign validation requests (every benign
    source, plain, up to ARMED_TOKENS prompt tokens, none of ``seen``) whose query score
    reaches ``floor``, the lowest gate tried; highest score first. These are the requests a
    gate arms, the only benign answers the strict setting ever watches: ordinary traffic and
    everyday requests with alarming words that the query probe reads as harmful."""
    from .data.loaders import load_dataset
    from .models import encode_chat, normalize_messages

    pool = [e for name in BENIGN_SOURCES for e in load_dataset(name)
            if e.prompt not in seen and _benign_validation(name, e.prompt)]
    scored = []
    for e in tqdm(pool, desc="tuning: requests the gate arms", unit="request"):
        ids = encode_chat(lm.tokenizer, normalize_messages(e.prompt))
        if ids.shape[-1] > ARMED_TOKENS:
            continue
        q = _score_ids(lm, query, ids)
        if q >= floor:
            scored.append((e, q))
    scored.sort(key=lambda eq: -eq[1])
    return scored[:spec.armed]


SUSPECT_MARGIN, SUSPECT_STEP = 0.2, 0.5  # nats above the benign maximum, and the rounding


def suspicion_prompts(spec: TuneSpec) -> list[str]:
    """The benign prompts the suspicion threshold must pass: the first
    ``spec.suspicion_sharegpt`` ShareGPT user turns and every validation prompt of the
    other benign calibration sources (edgy: its unfitted train buckets, as in
    :func:`calibration_prompts`)."""
    from .data.loaders import load_dataset

    prompts = [e.prompt for e in load_dataset("sharegpt", limit=spec.suspicion_sharegpt)]
    for name in (n for n in BENIGN_SOURCES if n != "sharegpt"):
        prompts += [e.prompt for e in load_dataset(name)
                    if (edgy_half(e.prompt) == "train" and part_of(e.prompt) != "fit" if name == "edgy"
                        else part_of(e.prompt, name) == "val")]
    return list(dict.fromkeys(prompts))


def suspicion_threshold(lm, prompts: list[str], window: int = 8) -> dict:
    """``suspect_nll`` for ``lm``: just above the highest suspicion of ``prompts``, each
    read as a one-message request (the surprisal of one full forward, as the engine's
    prefill gives it; requests are read up to 2,048 tokens)."""
    from .correction.suspicion import prompt_surprisal, suspicion, template_span
    from .models import encode_chat

    span = template_span(lm.tokenizer)
    values = []
    for prompt in tqdm(prompts, desc="tuning: request suspicion", unit="prompt"):
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}])[0].tolist()[:2048]
        values.append(suspicion(prompt_surprisal(lm.model, ids), span, window))
    top = max(values, default=0.0)
    threshold = math.ceil((top + SUSPECT_MARGIN) / SUSPECT_STEP) * SUSPECT_STEP
    return {"suspect_nll": threshold, "suspect_window": window, "prompts": len(values),
            "max_benign": round(top, 4), "margin": SUSPECT_MARGIN}


def flag_index(harms: list[float], tau: float, window: int, k: int) -> int | None:
    """The number of answer tokens emitted when the monitor first flags (None: never)."""
    above = [h >= tau for h in harms]
    run = 0
    for i, a in enumerate(above):
        run += a
        if i >= window:
            run -= above[i - window]
        if run >= k:
            return i + 1
    return None


def guarded(harms: list[float], token_ids: list[int], guard: DegenerationGuard) -> list[float]:
    """The harms the monitor would see: an answer the loop guard stops ends at the cut."""
    for n in range(1, len(token_ids) + 1):
        cut = guard.loop_cut(token_ids[:n])
        if cut is not None:
            return harms[:cut]
    return harms


def sweep(harmful: dict[str, list[list[float]]], benign: list[list[float]], taus, windows,
          armed: list[list[float]] = ()) -> list[dict]:
    """Every (tau, window, k): the share of harmful answers flagged (all and per attack),
    of benign answers flagged, and the median token at which harmful answers flag; with
    ``armed`` (TuneSpec.armed) also the share of those flagged."""
    rows = []
    for tau in sorted(set(taus)):
        for window in windows:
            for k in range(1, min(window, MAX_K) + 1):
                per, positions, flagged_h, total_h = {}, [], 0, 0
                for attack, traces in harmful.items():
                    idx = [flag_index(h, tau, window, k) for h in traces]
                    hit = [i for i in idx if i is not None]
                    per[attack] = round(len(hit) / max(1, len(traces)), 4)
                    positions += hit
                    flagged_h, total_h = flagged_h + len(hit), total_h + len(traces)
                b = sum(flag_index(h, tau, window, k) is not None for h in benign)
                positions.sort()
                rows.append({"tau": tau, "window": window, "k": k,
                             "harmful_flag_rate": round(flagged_h / max(1, total_h), 4), "per_attack": per,
                             "benign_flag_rate": round(b / max(1, len(benign)), 4),
                             "median_flag_token": positions[len(positions) // 2] if positions else None})
                if len(armed):
                    a = sum(flag_index(h, tau, window, k) is not None for h in armed)
                    rows[-1]["armed_flag_rate"] = round(a / len(armed), 4)
    return rows


def gated(harmful: dict[str, list[list[float]]], benign: list[list[float]], harmful_q: dict[str, list[float]],
          benign_q: list[float], taus, windows, gates, max_benign_flag: float,
          armed: list[list[float]] = (), armed_q: list[float] = (), max_armed_flag: float = 1.0) -> dict | None:
    """The best gated pair within the benign budget: a request scoring >= gate is watched
    by the strict setting, any other by the normal one. Both flags add up per request,
    so each (gate, normal, strict) is scored from per-setting counts. ``armed`` (with their
    query scores ``armed_q``): benign answers drawn for the strict setting alone; of those a
    gate arms, its strict setting may flag at most ``max_armed_flag``, and so may the pair of
    all of them (the normal setting watches those the gate lets through). None when no pair
    within the budgets flags more harmful answers than the best single setting."""
    settings = [(tau, w, k) for tau in sorted(set(taus)) for w in windows for k in range(1, min(w, MAX_K) + 1)]
    attacks = list(harmful)
    h_traces = [h for a in attacks for h in harmful[a]]
    h_attack = [a for a in attacks for _ in harmful[a]]
    h_q = [q for a in attacks for q in harmful_q[a]]
    h_flag = [[flag_index(h, *st) is not None for h in h_traces] for st in settings]
    b_flag = [[flag_index(h, *st) is not None for h in benign] for st in settings]
    a_flag = [[flag_index(h, *st) is not None for h in armed] for st in settings]
    budget = max_benign_flag * len(benign) + 1e-9
    armed_budget = max_armed_flag * len(armed) + 1e-9
    best = None
    for gate in sorted(set(gates)):
        # per setting: flags among low-scoring (normal) and high-scoring (strict) requests
        low_h, high_h = _split_flags(h_flag, h_q, gate)
        low_b, high_b = _split_flags(b_flag, benign_q, gate)
        low_a, high_a = _split_flags(a_flag, armed_q, gate)
        # strict settings within the armed budget (every one when this gate arms none of them)
        n_armed = sum(q >= gate for q in armed_q)
        allowed = [st for st in range(len(settings)) if high_a[st] <= max_armed_flag * n_armed + 1e-9]
        for n in range(len(settings)):
            for st in allowed:
                if low_b[n] + high_b[st] > budget or low_a[n] + high_a[st] > armed_budget:
                    continue
                key = (low_h[n] + high_h[st], -(low_b[n] + high_b[st]), settings[n][0], settings[st][0])
                if best is None or key > best[0]:
                    best = (key, gate, n, st)
    if best is None:
        return None
    _, gate, n, st = best
    hi_h = [q >= gate for q in h_q]
    flags = [h_flag[st][i] if hi_h[i] else h_flag[n][i] for i in range(len(h_traces))]
    b_flags = [b_flag[st][i] if q >= gate else b_flag[n][i] for i, q in enumerate(benign_q)]
    a_hit = [a_flag[st][i] for i, q in enumerate(armed_q) if q >= gate]
    a_all = [a_flag[st][i] if q >= gate else a_flag[n][i] for i, q in enumerate(armed_q)]
    per = {a: round(sum(f for f, x in zip(flags, h_attack, strict=True) if x == a) / max(1, len(harmful[a])), 4)
           for a in attacks}
    normal, strict = settings[n], settings[st]
    return {"gate": gate, "tau": normal[0], "window": normal[1], "k": normal[2],
            "strict_tau": strict[0], "strict_window": strict[1], "strict_k": strict[2],
            "harmful_flag_rate": round(sum(flags) / max(1, len(flags)), 4), "per_attack": per,
            "benign_flag_rate": round(sum(b_flags) / max(1, len(b_flags)), 4),
            "harmful_gated": round(sum(hi_h) / max(1, len(hi_h)), 4),
            "benign_gated": round(sum(q >= gate for q in benign_q) / max(1, len(benign_q)), 4),
            **({"armed_answers": len(a_all), "armed_flag_rate": round(sum(a_all) / max(1, len(a_all)), 4),
                "armed_gated": len(a_hit), "armed_gated_flag_rate": round(sum(a_hit) / max(1, len(a_hit)), 4)}
               if len(armed_q) else {})}


def _split_flags(flags: list[list[bool]], queries, gate: float) -> tuple[list[int], list[int]]:
    """Per setting, (flags among requests scoring below ``gate``, flags among those at or above)."""
    hi = [q >= gate for q in queries]
    low = [sum(f for f, h in zip(fl, hi, strict=True) if not h) for fl in flags]
    high = [sum(f for f, h in zip(fl, hi, strict=True) if h) for fl in flags]
    return low, high


def blended(traces: list[list[float]], queries: list[float], blend: float) -> list[list[float]]:
    """The monitor's view of each answer with trajectory weight ``blend``: each token's harm
    mixed with its request's query score (as :class:`~rootdefense.correction.RecoveryMonitor`)."""
    if not blend:
        return traces
    return [[trajectory(h, q, blend) for h in t] for t, q in zip(traces, queries, strict=True)]


def pareto(rows: list[dict]) -> list[dict]:
    """The settings no other beats on both counts (more harmful flagged, fewer benign),
    fewest benign flags first: the trade-off a user can pick from."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["benign_flag_rate"], -r["harmful_flag_rate"])):
        if r["harmful_flag_rate"] > best:
            front.append(r)
            best = r["harmful_flag_rate"]
    return front


def choose(rows: list[dict], max_benign_flag: float, max_armed_flag: float = 1.0) -> dict:
    """Most harmful answers flagged within the benign budget (and the armed one, for rows
    that count armed answers); ties: fewer benign flags, an earlier flag, then the stricter
    (higher) tau and larger k (less sensitive to noise)."""
    ok = [r for r in rows if r["benign_flag_rate"] <= max_benign_flag
          and r.get("armed_flag_rate", 0.0) <= max_armed_flag]
    if not ok:
        raise InputError(f"no monitor setting keeps benign flags within {max_benign_flag:.0%} (armed benign "
                         f"answers within {max_armed_flag:.0%}); raise --max-benign-flag or retrain the probe")
    return max(ok, key=lambda r: (r["harmful_flag_rate"], -r["benign_flag_rate"],
                                  -(r["median_flag_token"] or 10 ** 9), r["tau"], r["k"]))


def collect(lm, spec: TuneSpec, log=print, path=None) -> list[dict]:
    """Undefended answers to the calibration prompts: per answer the probe's harm of every
    token (cut where the loop guard would stop it) and, when a query probe is trained, the
    query probe's score of the request. With ``path`` (JSON lines) every answer is written
    as it is made, and a run with the same spec and probes resumes from what is there."""
    from .api import Defender, find_probe
    from .errors import ProbeError
    from .evaluation.base import EvalContext

    probe = find_probe(lm.model_id, "response")
    try:
        query = find_probe(lm.model_id, "query").to(lm.device)
    except ProbeError:
        query = None
        log("note: no query probe for this model: the gated monitor is not tried")
    watcher = Defender(lm, probe, _none_settings())
    cfg = GenerationConfig(max_new_tokens=spec.max_new_tokens)
    harmful, benign = calibration_prompts(spec)
    if len(harmful) < spec.harmful or len(benign) < spec.benign:
        log(f"note: the validation split holds {len(harmful)} harmful and {len(benign)} benign prompts")
    ctx = EvalContext(lm=lm, seed=spec.seed, options={})
    guard = DegenerationGuard(4, 3, 12)
    jobs = calibration_jobs(spec, harmful, benign)
    header = {"kind": "calibration", "model_id": lm.model_id, "spec": _spec_key(spec),
              "probe_sha256": weights_sha256(probe_dir(lm.model_id)),
              "query_probe_sha256": None if query is None else weights_sha256(probe_dir(lm.model_id, "query"))}
    records, writer = _resume(path, header, log)
    done = {(r["attack"], r["prompt"], r["harmful"]) for r in records}
    for attack, index, ex, harmful_side in tqdm(jobs, desc="tuning: undefended answers", unit="answer",
                                                initial=len(done)):
        if (attack, ex.prompt, harmful_side) in done:
            continue
        messages, prefill = calibration_request(attack, index, ex, ctx)
        gen = watcher.generate(messages=messages, config=cfg, prefill=prefill)
        q = None if query is None else query_score(lm, query, messages)
        records.append(_answer_record(gen, guard, q, attack=attack, harmful=harmful_side, prompt=ex.prompt))
        if writer is not None:
            writer.write(records[-1])
    if spec.armed and query is not None:
        from .models import normalize_messages

        floor = min(GATES + (round(query.threshold, 4),))
        pool = armed_prompts(lm, query, spec, {e.prompt for e in benign}, floor)
        log(f"armed benign answers: {len(pool)} validation requests reach the lowest gate ({floor})")
        for ex, q in tqdm(pool, desc="tuning: armed benign answers", unit="answer"):
            if ("none", ex.prompt, False) in done:
                continue
            gen = watcher.generate(messages=normalize_messages(ex.prompt), config=cfg)
            records.append(_answer_record(gen, guard, q, attack="none", harmful=False, armed=True, prompt=ex.prompt))
            if writer is not None:
                writer.write(records[-1])
    if writer is not None:
        writer.write({"kind": "complete", "answers": len(records)})
        writer.close()
    return records


def _answer_record(gen, guard: DegenerationGuard, query_score: float | None, **fields) -> dict:
    """A calibration record: ``fields``, the answer, its request's query score and its tokens'
    harms (cut where the loop guard would stop it)."""
    harms = guarded([st.harm for st in gen.trace.steps], gen.token_ids, guard)
    return {**fields, "answer": gen.text, "query_score": query_score, "harms": [round(h, 5) for h in harms]}


def calibration_jobs(spec: TuneSpec, harmful, benign) -> list[tuple]:
    """(attack, template index, example, harmful) of every calibration answer: each request
    under each attack, the template by its place in the list (variety across requests)."""
    return [(a, i, e, True) for a in spec.attacks for i, e in enumerate(harmful)] + \
        [(a, i, e, False) for a in spec.benign_attacks for i, e in enumerate(benign)]


def calibration_request(attack: str, index: int, example, ctx) -> tuple[list[dict], str]:
    """(messages, assistant prefill) of a calibration request under ``attack``."""
    from .evaluation.attacks import make_attack
    from .models import normalize_messages

    if attack == "none":
        return normalize_messages(example.prompt), ""
    ap = make_attack(attack).apply(example, ctx, index)
    return ap.messages, ap.prefill


def query_score(lm, query, messages: list[dict]) -> float:
    """The query probe's score of a request (its last prompt token, the probe's layer), as
    the calibration records keep it (5 decimals)."""
    from .models import encode_chat

    return _score_ids(lm, query, encode_chat(lm.tokenizer, messages))


def _score_ids(lm, query, ids) -> float:
    """:func:`query_score` of an encoded request."""
    import torch

    with torch.no_grad():
        hs = lm.model(input_ids=ids.to(lm.device), output_hidden_states=True, logits_to_keep=1).hidden_states
        return round(float(query.score(hs[query.layer][0, -1:].float())[0]), 5)


def _spec_key(spec: TuneSpec) -> dict:
    """What the calibration answers depend on (``armed`` only when asked for, so files made
    before it existed are read as they were)."""
    return {k: v for k, v in asdict(spec).items()
            if k in ("harmful", "benign", "attacks", "benign_attacks", "max_new_tokens", "seed")
            or (k == "armed" and v)}


def _resume(path, header: dict, log):
    """(records already in ``path`` when its header matches ``header``, a writer appending
    to it); a file made with other settings or probes is started afresh."""
    from .jsonl import JsonlWriter, read_objects

    if path is None:
        return [], None
    path = Path(path)
    old = read_objects(path)
    want = json.loads(json.dumps(header))
    if old and old[0] == want:
        log(f"resuming calibration answers from {path} ({len(old) - 1} there)")
        return [r for r in old[1:] if "harms" in r], JsonlWriter(path, append=True)
    if old and _unarmed(old[0]) == _unarmed(want):  # only the armed answers asked for differ: keep the rest
        records = [r for r in old[1:] if "harms" in r and not r.get("armed")]
        log(f"keeping {len(records)} calibration answers from {path}; the armed benign answers are read again")
        writer = JsonlWriter(path, append=False)
        for line in (header, *records):
            writer.write(line)
        return records, writer
    if old:
        log(f"note: {path} was made with other settings or probes; starting afresh")
    writer = JsonlWriter(path, append=False)
    writer.write(header)
    return [], writer


def _unarmed(header: dict) -> dict:
    return {**header, "spec": {k: v for k, v in (header.get("spec") or {}).items() if k != "armed"}}


def read_calibration(path, lm, spec: TuneSpec) -> list[dict]:
    """Records of a finished :func:`collect` run at ``path`` for re-sweeping; refused when
    made for another model, spec or probe, or incomplete."""
    from .jsonl import read_objects

    path = Path(path)
    old = read_objects(path)
    if not old or old[0].get("kind") != "calibration":
        raise InputError(f"{path} holds no calibration answers; run `rootdefense tune` without --reuse first")
    head = old[0]
    if head.get("model_id") != lm.model_id or head.get("probe_sha256") != weights_sha256(probe_dir(lm.model_id)):
        raise InputError(f"{path} was made for another model or an earlier response probe; run tune without --reuse")
    if head.get("spec") != json.loads(json.dumps(_spec_key(spec))):
        raise InputError(f"{path} was made with other tuning settings ({head.get('spec')}); run tune without --reuse")
    if not any(r.get("kind") == "complete" for r in old):
        raise InputError(f"{path} is incomplete (an interrupted run); run tune without --reuse to finish it")
    return [r for r in old[1:] if "harms" in r]


def tune(lm, spec: TuneSpec, log=print, records: list[dict] | None = None, path=None) -> dict:
    """Measure the undefended model on calibration prompts (or reuse ``records`` from an
    earlier :func:`collect`) and choose its defaults."""
    from .api import find_probe
    from .evaluation.judging import make_judge

    t0 = time.perf_counter()
    probe = find_probe(lm.model_id, "response")
    if records is None:
        records = collect(lm, spec, log, path)
    traces: dict[str, list[list[float]]] = {a: [] for a in spec.attacks}
    harmful_q: dict[str, list[float]] = {a: [] for a in spec.attacks}
    benign_traces, benign_q = [], []
    armed_traces, armed_q = [], []  # benign answers drawn for the strict setting (TuneSpec.armed)
    for r in records:
        if r.get("armed"):
            armed_traces.append(r["harms"])
            armed_q.append(r["query_score"])
        elif not r["harmful"]:
            benign_traces.append(r["harms"])
            benign_q.append(r["query_score"])
        elif r["attack"] in traces:
            traces[r["attack"]].append(r["harms"])
            harmful_q[r["attack"]].append(r["query_score"])
    plain_answers = [(r["prompt"], r["answer"]) for r in records if r["harmful"] and r["attack"] == "none"]
    refusal = make_judge("refusal")
    refusal.setup()
    verdicts = refusal.judge([p for p, _ in plain_answers], [a for _, a in plain_answers]) if plain_answers else []
    refusal_rate = sum(v.label for v in verdicts) / len(verdicts) if verdicts else 0.0
    taus = tuple(spec.taus) + (round(probe.threshold, 4),)
    have_q = bool(benign_q) and all(q is not None for q in benign_q + [q for qs in harmful_q.values() for q in qs])
    # one setting, harm alone (without armed answers no row counts them: their budget holds trivially)
    best = choose(sweep(traces, benign_traces, taus, spec.windows, armed_traces), spec.max_benign_flag,
                  spec.max_armed_flag)
    options = []  # (chosen, blend, gate result or None, sweep rows)
    gates = GATES + (round(find_probe(lm.model_id, "query").threshold, 4),) if have_q else ()
    for blend in BLENDS if have_q else (0.0,):
        h = {a: blended(traces[a], harmful_q[a], blend) for a in traces}
        b = blended(benign_traces, benign_q, blend)
        a = blended(armed_traces, armed_q, blend)
        rows = sweep(h, b, taus, spec.windows, a)
        try:
            single = choose(rows, spec.max_benign_flag, spec.max_armed_flag)
        except InputError:
            continue  # no setting of this blend within the budget (blend 0 always has one: ``best``)
        options.append((single, blend, None, rows))
        if have_q:
            g = gated(h, b, harmful_q, benign_q, taus, spec.windows, gates, spec.max_benign_flag,
                      armed=a, armed_q=armed_q, max_armed_flag=spec.max_armed_flag)
            if g is not None and g["harmful_flag_rate"] > single["harmful_flag_rate"]:  # else the gate adds nothing
                options.append((g, blend, g, rows))
    # most harmful answers flagged within the budget; ties: fewer benign flags, a smaller
    # blend, no gate (the simpler monitor)
    chosen, blend, gate, rows = max(options, key=lambda o: (o[0]["harmful_flag_rate"], -o[0]["benign_flag_rate"],
                                                            -o[1], o[2] is None))
    chosen = {**chosen, "blend": blend}
    use_expert = refusal_rate < spec.refusal_reflex
    # the suspicion check acts through the gate and the blend (see CorrectionSettings)
    suspect = suspicion_threshold(lm, suspicion_prompts(spec)) \
        if (gate is not None or blend) and spec.suspicion_sharegpt else None
    seconds = round(time.perf_counter() - t0, 1)
    # end_check is not replayed here (see CorrectionSettings); evaluation chose it and, with a
    # gate, loop_expert "gated" (results/safety/retrained, in git at 84f9aa1: benign over-refusal 58 -> 27 of 160
    # read answers, read help no higher)
    settings = {"tau": chosen["tau"], "window": chosen["window"], "k": chosen["k"], "use_expert": use_expert,
                "rollback": "answer", "end_check": True}
    if blend:
        settings["blend"] = blend
        log(f"trajectory score: each token's monitor score is {1 - blend:g} x its harm + {blend:g} x the request's "
            "query score")
    if spec.steer_tau is not None:
        settings["steer_tau"] = spec.steer_tau
    if gate is not None:
        settings.update({k: gate[k] for k in ("gate", "strict_tau", "strict_window", "strict_k")},
                        loop_expert="gated")
        log(f"gated: requests with query score >= {gate['gate']} watched at tau={gate['strict_tau']} "
            f"window={gate['strict_window']} k={gate['strict_k']} ({gate['harmful_gated']:.0%} of harmful, "
            f"{gate['benign_gated']:.0%} of benign requests)")
    if suspect is not None:
        settings.update(suspect_nll=suspect["suspect_nll"], suspect_window=suspect["suspect_window"])
        log(f"suspicion check: a request with {suspect['suspect_window']} consecutive tokens averaging "
            f">= {suspect['suspect_nll']:g} nats reads as harmful (highest of {suspect['prompts']} benign prompts: "
            f"{suspect['max_benign']:.2f})")
    log(f"chosen: tau={chosen['tau']} window={chosen['window']} k={chosen['k']} flags "
        f"{chosen['harmful_flag_rate']:.0%} of harmful and {chosen['benign_flag_rate']:.0%} of benign answers "
        f"(single setting: {best['harmful_flag_rate']:.0%} / {best['benign_flag_rate']:.0%}); undefended "
        f"refusal rate {refusal_rate:.0%} -> expert {'on' if use_expert else 'off'} ({seconds} s)")
    return {
        "model_id": lm.model_id,
        "defense": "rds-expert",
        "settings": settings,
        "probe": {"kind": "response", "layer": probe.layer, "threshold": round(probe.threshold, 6)},
        "probe_sha256": weights_sha256(probe_dir(lm.model_id)),
        "query_probe_sha256": weights_sha256(probe_dir(lm.model_id, "query")) if gate is not None or blend else None,
        "expert_trained": (expert_dir(lm.model_id) / "adapter_model.safetensors").exists(),
        "measured": {"chosen": chosen, "single_setting": best, "undefended_refusal_rate": round(refusal_rate, 4),
                     "harmful_prompts": len(plain_answers) or max(map(len, traces.values()), default=0),
                     "benign_prompts": len({r["prompt"] for r in records if not r["harmful"] and not r.get("armed")}),
                     "benign_answers": len(benign_traces),
                     **({"armed_answers": len(armed_traces), "max_armed_flag": spec.max_armed_flag}
                        if armed_traces else {}),
                     "attacks": list(spec.attacks), "benign_attacks": list(spec.benign_attacks),
                     "max_new_tokens": spec.max_new_tokens, **({"suspicion": suspect} if suspect else {}),
                     "max_benign_flag": spec.max_benign_flag, "seconds": seconds,
                     "split": "validation (advbench, harmbench, mtbench, sharegpt, sensitive, alarming; "
                              "edgy train half, unfitted buckets)"},
        "sweep": pareto(rows),
        "spec": {k: v for k, v in asdict(spec).items() if k not in ("taus", "windows")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def tune_and_save(lm, spec: TuneSpec, folder=None, reuse: bool = False, command: str = "rootdefense tune",
                  log=print) -> tuple[dict, Path]:
    """Tune ``lm`` and save its defaults in ``folder`` (default: beside its response probe,
    where they are read); returns (the defaults, their file). The calibration answers go
    beside them as they are made, so an interrupted run resumes; ``reuse``: re-sweep those of
    a finished run instead of decoding. ``command``: what made them, recorded in the file."""
    from .defaults import save_defaults

    folder = Path(folder or probe_dir(lm.model_id))
    folder.mkdir(parents=True, exist_ok=True)
    calibration = folder / CALIBRATION_FILE
    records = read_calibration(calibration, lm, spec) if reuse else None
    result = tune(lm, spec, log=log, records=records, path=calibration)
    result["command"] = command
    return result, save_defaults(folder, result)


def _none_settings():
    from .api import DefenseSettings

    return DefenseSettings(defense="none")
