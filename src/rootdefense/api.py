"""The library entry point: a model, a probe and a decision rule behind one object.

    from rootdefense import api
    d = api.Defender.load("smollm2-135m", defense="rds", rule="threshold")
    out = d.generate("How do I bake bread?")
    print(out.text, out.trace.replaced)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from . import defaults
from .correction import Correction, CorrectionSettings
from .decoding import Decoder, Generation, GenerationConfig, make_rule
from .decoding.rules import RULES
from .decoding.streamer import Streamer, TextStreamer
from .drafting import check_drafter_name, make_drafter
from .errors import InputError, ProbeError
from .expert.adapter import attach_expert
from .models import LoadedModel, encode_chat, load_model, normalize_messages
from .paths import expert_dir, probe_dir
from .probes.base import LinearProbe

DEFENSES = ("none", "rds", "rds-expert")  # rds-expert: RDS + safety expert + recovery
# which probe kind each rule reads by default: the paper's rule with the paper's probe;
# the others with the answer-position probe, trained where candidates are scored
DEFAULT_PROBE_KIND = {"paper": "paper", "threshold": "response", "weighted": "response"}


def find_probe(model_id: str, kind: str) -> LinearProbe:
    folder = probe_dir(model_id, kind)
    if not (folder / "probe.json").exists():
        raise ProbeError(f"no '{kind}' probe for model '{model_id}' at {folder}; train one with "
                         f"`rootdefense probe train --model {model_id} --kind {kind}`")
    return LinearProbe.load(folder)


@dataclass
class DefenseSettings:
    defense: str = "rds"
    rule: str = "threshold"
    tau: float | None = None  # default: the probe's calibrated threshold
    k: int = 10  # paper rule: top-k by probability
    lam: float = 2.0  # weighted rule
    probe: str | None = None  # path; default: the cached probe for the model and rule
    expert: str | None = None  # rds-expert: adapter folder; default: the cached expert for the model
    rollback: str = "answer"  # rds-expert: restart the "answer" or the current "sentence"
    correction: dict = field(default_factory=dict)  # rds-expert: more CorrectionSettings (window, k, ...)
    drafter: str | None = None  # speculative decoding: none, auto, ngram, model:NAME (None: none)
    max_draft: int = 8  # drafted tokens verified per forward
    source: str = "explicit settings"  # where the settings came from (a preset, tuned defaults)

    def __post_init__(self):
        if self.defense not in DEFENSES:
            raise InputError(f"unknown defense '{self.defense}'; choose one of {', '.join(DEFENSES)}")
        if self.rule not in RULES:
            raise InputError(f"unknown rule '{self.rule}'; choose one of {', '.join(RULES)}")
        if self.tau is not None and not 0 < self.tau < 1:
            raise InputError(f"tau must lie strictly between 0 and 1, got {self.tau}")
        if self.rollback not in ("answer", "sentence"):
            raise InputError(f"rollback must be 'answer' or 'sentence', got {self.rollback!r}")
        check_drafter_name(self.drafter)
        if not isinstance(self.max_draft, int) or not 1 <= self.max_draft <= 64:
            raise InputError(f"max_draft must be an integer in 1..64, got {self.max_draft!r}")
        if self.drafter not in (None, "none") and self.defense == "rds" and self.rule != "threshold":
            raise InputError(f"speculative decoding needs the threshold rule (the '{self.rule}' rule may replace "
                             "harmless tokens, so every step needs candidate scoring); use --drafter none")
        known = {f.name for f in fields(CorrectionSettings)} - {"tau", "rollback"}
        unknown = sorted(set(self.correction) - known)
        if unknown:
            raise InputError(f"unknown correction setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        CorrectionSettings(**self.correction).validate()


def resolve_settings(model_id: str, preset: str = "tuned", **given) -> DefenseSettings:
    """The settings a user gets: the preset's (``tuned``: the model's measured defaults from
    ``rootdefense tune``, see :mod:`rootdefense.defaults`; ``paper``: the paper-faithful
    rule and probe), overridden by every setting ``given`` that is not None. Without tuned
    defaults for the model, ``tuned`` falls back to the threshold rule on the probe's
    calibrated threshold. The result's ``source`` says where the settings came from."""
    if preset not in defaults.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of {', '.join(defaults.PRESETS)}")
    given = {k: v for k, v in given.items() if v is not None}
    if preset == "paper":
        if given.get("defense", "rds") != "rds":
            raise InputError(f"the 'paper' preset is an rds setting; it cannot be combined with --defense {given['defense']}")
        base, source = dict(defaults.PAPER_PRESET), "preset 'paper' (the paper's rule on the paper's probe)"
    else:
        tuned = defaults.load_defaults(model_id)
        base, source = dict(defaults.FALLBACK), "built-in fallback (no tuned defaults; run `rootdefense tune`)"
        wants_other = given.get("defense", tuned["defense"] if tuned else None) != (tuned or {}).get("defense") \
            or ("rule" in given and "defense" not in given)
        if tuned and not wants_other:
            t = dict(tuned["settings"])
            base = {"defense": tuned["defense"], "tau": t.pop("tau", None), "rollback": t.pop("rollback", "answer")}
            use_expert = t.get("use_expert", True)
            if use_expert and not given.get("expert") and not (expert_dir(model_id) / "adapter_config.json").exists():
                t["use_expert"] = False  # steer among the model's own candidates until an expert is trained
                source_note = "; expert not trained, steering among the base model's candidates " \
                              f"(train it with `rootdefense expert train --model {model_id}`)"
            else:
                source_note = ""
            if (t.get("gate") is not None or t.get("blend")) and not (probe_dir(model_id, "query") / "probe.json").exists():
                for key in ("gate", "strict_tau", "strict_window", "strict_k", "blend"):
                    t.pop(key, None)  # one monitor for every request until a query probe is trained
                source_note += "; query probe not trained, no gate (train it with `rootdefense probe train " \
                               f"--model {model_id} --kind query`)"
            base["correction"] = {**t, **given.pop("correction", {})}
            stale = "" if tuned.get("probe_matches", True) else " (tuned for an earlier probe" + (
                "; `rootdefense prepare --reinstall` installs the ones it was tuned with)"
                if defaults.shipped_probe_dir(model_id, "response") and tuned["source"].startswith("shipped") else ")")
            source = f"tuned defaults: {tuned['source']}" + stale + source_note
        elif "rule" in given and "defense" not in given:
            base["defense"] = "rds"
        if tuned and wants_other:
            source = f"built-in settings for the chosen defense (the tuned defaults are for {tuned['defense']})"
    settings = DefenseSettings(**{**base, **given})
    if preset == "tuned" and "drafter" not in given and tuned_drafts(settings):
        settings.drafter = "auto"  # lossless: the same answers, fewer forwards (see drafting/)
    settings.source = source
    return settings


def tuned_drafts(settings: DefenseSettings) -> bool:
    """Whether the tuned preset drafts for these settings: the defenses whose decoder verifies
    drafts (the threshold rule, rds-expert); undefended decoding stays the plain reference."""
    return settings.defense == "rds-expert" or (settings.defense == "rds" and settings.rule == "threshold")


class Defender:
    """Generate with or without the RDS defense; with a probe loaded, undefended answers
    are still scored token by token (for the trace), at no extra cost."""

    def __init__(self, lm: LoadedModel, probe: LinearProbe | None, settings: DefenseSettings, expert=None):
        self.lm = lm
        self.probe = probe
        self.settings = settings
        self.rule = None
        self.expert = None
        if settings.defense == "rds-expert":
            if probe is None:
                raise ProbeError("the rds-expert defense needs a probe")
            probe.check_model(lm.model_id, lm.hidden_size, lm.num_layers)
            probe.to(lm.device)
            cs = CorrectionSettings(tau=settings.tau, rollback=settings.rollback, **settings.correction)
            if cs.use_expert:
                self.expert = expert if expert is not None else attach_expert(lm, settings.expert)
            query_probe = None
            if cs.reads_request:
                query_probe = find_probe(lm.model_id, "query")
                query_probe.check_model(lm.model_id, lm.hidden_size, lm.num_layers)
                query_probe.to(lm.device)
            self.correction = Correction(probe, cs, self.expert, query_probe, lm.tokenizer)
            self.decoder = Decoder(lm.model, lm.tokenizer, probe, eos_token_ids=lm.eos_token_ids,
                                   drafter=make_drafter(settings.drafter, lm), max_draft=settings.max_draft,
                                   correction=self.correction)
            return
        if settings.defense == "rds":
            if probe is None:
                raise ProbeError("the rds defense needs a probe")
            tau = settings.tau if settings.tau is not None else probe.threshold
            self.rule = make_rule(settings.rule, tau=tau, k=settings.k, lam=settings.lam)
        if probe is not None:
            probe.check_model(lm.model_id, lm.hidden_size, lm.num_layers)
            probe.to(lm.device)
        self.correction = None
        self.decoder = Decoder(lm.model, lm.tokenizer, probe=probe, rule=self.rule, eos_token_ids=lm.eos_token_ids,
                               drafter=make_drafter(settings.drafter, lm), max_draft=settings.max_draft)

    @classmethod
    def load(cls, model: str = "smollm2-135m", dtype: str = "float32", device: str = "auto",
             lm: LoadedModel | None = None, monitor: bool = True, **settings) -> Defender:
        """``settings``: ``preset`` (``tuned``, the default, or ``paper``) and any
        :class:`DefenseSettings` field, each overriding the preset (None: not given); see
        :func:`resolve_settings`. ``monitor``: load the probe even when undefended, to shade
        the trace."""
        lm = lm or load_model(model, dtype=dtype, device=device)
        s = resolve_settings(lm.model_id, **settings)
        probe = None
        if s.probe:
            probe = LinearProbe.load(s.probe)
        elif s.defense == "rds":
            probe = find_probe(lm.model_id, DEFAULT_PROBE_KIND[s.rule])
        elif s.defense == "rds-expert":
            probe = find_probe(lm.model_id, "response")
        elif monitor:
            try:
                probe = find_probe(lm.model_id, DEFAULT_PROBE_KIND[s.rule])
            except ProbeError:
                probe = None
        return cls(lm, probe, s)

    def describe(self) -> dict:
        out = {"model": self.lm.model_id, "defense": self.settings.defense,
               "dtype": str(self.lm.dtype).replace("torch.", ""), "device": str(self.lm.device)}
        out.update(self.decoder.describe())
        if self.correction is not None:
            out["expert"] = None if self.expert is None else str(self.expert.info.path)
        if self.probe is not None:
            out["probe"] = {"kind": self.probe.meta.get("kind"), "layer": self.probe.layer,
                            "threshold": round(self.probe.threshold, 4)}
        out["settings_source"] = self.settings.source
        return out

    def encode(self, prompt: str | None = None, messages: list | None = None,
               config: GenerationConfig | None = None, prefill: str = ""):
        """Prompt ids (1, T); ``prefill`` is forced text at the start of the answer."""
        cfg = config or GenerationConfig()
        msgs = normalize_messages(prompt, messages)
        return encode_chat(self.lm.tokenizer, msgs, self.lm.max_context, reserve=cfg.max_new_tokens,
                           prefill=prefill)

    def _request_ids(self, prompt, messages, cfg, prefill: str = ""):
        """Prompt ids and, with a forced opening, where the request ends (else None)."""
        ids = self.encode(prompt, messages, cfg, prefill=prefill)
        if not prefill:
            return ids, None
        request = self.encode(prompt, messages, cfg)[0]
        n = min(len(request), ids.shape[1])
        return ids, next((i for i in range(n) if int(ids[0, i]) != int(request[i])), n)

    def generate_batch(self, items: list[str | list[dict]], config: GenerationConfig | None = None) -> list[Generation]:
        """Answer several prompts (each a string or a message list) in one batch: one forward
        per step for all of them, each answer equal to :meth:`generate`'s (greedy). Under
        rds-expert a flagged answer is rolled back and steered inside the batch."""
        cfg = config or GenerationConfig()
        ids = [self.encode(*((x, None) if isinstance(x, str) else (None, x)), cfg) for x in items]
        return self._batch_decoder().generate_batch(ids, cfg)

    def _batch_decoder(self) -> Decoder:
        """The decoder for batches: the draft head drafts single streams only, so under
        ``auto`` a batch drafts by prompt lookup."""
        d = self.decoder
        if getattr(d.drafter, "needs_target_features", False) and self.settings.drafter == "auto":
            from .drafting.ngram import PromptLookupDrafter

            return Decoder(d.model, d.tokenizer, d.probe, d.rule, d.eos_token_ids, drafter=PromptLookupDrafter(),
                           max_draft=d.max_draft, correction=d.correction)
        return d

    def generate(self, prompt: str | None = None, messages: list | None = None,
                 config: GenerationConfig | None = None, prefill: str = "", streamer: Streamer | None = None,
                 on_text=None) -> Generation:
        """Answer ``prompt`` (or ``messages``); with ``prefill`` the answer continues that
        text and the returned text is the continuation only, unless ``rds-expert`` withdrew
        the forced opening (a correction event with ``retracted_prefill``; the trace summary's
        ``prefill_retracted``): then it is a whole new answer. ``streamer`` (or ``on_text(piece)``)
        receives the answer's text as it becomes final: nothing it receives is ever withdrawn
        (see :mod:`rootdefense.decoding.streamer`)."""
        cfg = config or GenerationConfig()
        ids, query_len = self._request_ids(prompt, messages, cfg, prefill)
        if streamer is None and on_text is not None:
            streamer = TextStreamer(on_text)
        return self.decoder.generate(ids, cfg, streamer=streamer, query_len=query_len)
