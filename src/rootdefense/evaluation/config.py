"""The evaluation config: YAML file and/or command-line flags -> one validated object.

Example (every key optional; these are the defaults unless noted)::

    model: smollm2-135m
    dtype: float32
    device: auto
    datasets: [advbench, mtbench, edgy]   # harmful ones get `attacks`, benign ones `benign_attacks`
    attacks: [none, prefill]
    benign_attacks: [none] # e.g. [none, roleplay, fiction, prefix-injection]: wrapped benign prompts
    defenses: [none, rds]
    judges: [refusal, harm]
    limit: 30              # prompts per dataset (held-out split), null = all
    optimised_limit: 10    # prompts per harmful dataset for optimising attacks (gcg, adaptive)
    samples: 1             # answers per prompt (use temperature > 0 for more than one)
    seed: 0
    generation: {max_new_tokens: 64, temperature: 0.0, top_p: 1.0}
    dataset_options: {gsm8k: {limit: 20, max_new_tokens: 160}}
    options: {gcg: {steps: 20}, safedecoding: {alpha: 3}, llm: {endpoint: ...}}
    threads: null          # torch threads per worker (default: torch's choice)

A config's fingerprint (``config_hash``) covers everything that changes answers (model,
dtype, seed, generation settings, part options, judges), so a results file is never
continued under settings that would make its lines disagree; choosing more or other
prompts, attacks or defenses extends a run instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError

HARMFUL_DATASETS = ("advbench", "harmbench", "donotanswer")
BENIGN_DATASETS = ("mtbench", "edgy", "alarming", "gsm8k", "sharegpt")
EVAL_DATASETS = HARMFUL_DATASETS + BENIGN_DATASETS
ANSWER_KEYS = ("model", "dtype", "seed", "generation", "options", "judges")
PER_DATASET_KEYS = {"limit": (int, type(None)), "max_new_tokens": (int,)}
DEFAULT_GENERATION = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}
GENERATION_KEYS = {"max_new_tokens": (int,), "temperature": (int, float), "top_p": (int, float)}


def _names(key: str, value, valid, variants: bool = False) -> list[str]:
    """A list of part names, each one of ``valid``; with ``variants`` also ``name@label``
    (the same part with its own options under ``options['name@label']``, e.g. an ablation)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"config key '{key}' must be a list of names (or a comma-separated string)")
    if not value:
        raise InputError(f"config key '{key}' is empty; choose from: {', '.join(valid)}")
    bad = [v for v in value if (v.split("@", 1)[0] if variants else v) not in valid
           or (variants and "@" in v and not v.split("@", 1)[1].strip())]
    if bad:
        raise InputError(f"unknown {key.rstrip('s')} name(s) {', '.join(map(repr, bad))} in '{key}'; "
                         f"valid: {', '.join(valid)}")
    return list(dict.fromkeys(value))  # keep order, drop repeats


def _typed(key: str, value, types, what: str):
    if isinstance(value, bool) and bool not in types:
        raise InputError(f"config key '{key}' must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise InputError(f"config key '{key}' must be {what}, got {type(value).__name__} {value!r}")
    return value


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    datasets: list[str] = field(default_factory=lambda: ["advbench", "mtbench", "edgy"])
    attacks: list[str] = field(default_factory=lambda: ["none", "prefill"])
    benign_attacks: list[str] = field(default_factory=lambda: ["none"])
    defenses: list[str] = field(default_factory=lambda: ["none", "rds"])
    judges: list[str] = field(default_factory=lambda: ["refusal", "harm"])
    limit: int | None = 30
    optimised_limit: int | None = 10
    samples: int = 1
    seed: int = 0
    generation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_GENERATION))
    dataset_options: dict[str, dict] = field(default_factory=dict)
    options: dict[str, dict] = field(default_factory=dict)
    threads: int | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> EvalConfig:
        if not isinstance(data, dict):
            raise InputError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        cfg = cls(**{k: v for k, v in data.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalConfig:
        p = Path(path)
        if not p.exists():
            raise InputError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file '{path}' is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def override(self, **flags) -> EvalConfig:
        """Command-line flags win over the file; ``None`` means 'not given'."""
        data = asdict(self)
        for key, value in flags.items():
            if value is None:
                continue
            if key == "max_new_tokens":
                data["generation"] = {**data["generation"], "max_new_tokens": value}
            else:
                data[key] = value
        return EvalConfig.from_dict(data, source="flags")

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        from .attacks import ATTACKS
        from .defenses import DEFENSES
        from .judging import JUDGES

        for key in ("model", "dtype", "device"):
            _typed(key, getattr(self, key), (str,), "a string")
        self.datasets = _names("datasets", self.datasets, EVAL_DATASETS)
        self.attacks = _names("attacks", self.attacks, tuple(ATTACKS))
        self.benign_attacks = _names("benign_attacks", self.benign_attacks, tuple(ATTACKS))
        optimising = [a for a in self.benign_attacks if ATTACKS[a].optimises]
        if optimising:
            raise InputError(f"config key 'benign_attacks': {', '.join(optimising)} optimise(s) toward a harmful "
                             "target, which a benign prompt does not have; use template attacks")
        self.defenses = _names("defenses", self.defenses, tuple(DEFENSES), variants=True)
        self.judges = _names("judges", self.judges, tuple(JUDGES))
        for key in ("limit", "optimised_limit"):
            value = _typed(key, getattr(self, key), (int, type(None)), "a positive integer or null")
            if value is not None and value < 1:
                raise InputError(f"config key '{key}' must be >= 1 (or null for all), got {value}")
        for key, lo in (("samples", 1), ("seed", 0)):
            if _typed(key, getattr(self, key), (int,), "an integer") < lo:
                raise InputError(f"config key '{key}' must be >= {lo}, got {getattr(self, key)}")
        if self.threads is not None and _typed("threads", self.threads, (int,), "an integer") < 1:
            raise InputError(f"config key 'threads' must be >= 1, got {self.threads}")
        self._validate_generation()
        self._validate_dataset_options()
        _typed("options", self.options, (dict,), "a mapping of part name -> settings")
        for name, value in self.options.items():
            _typed(f"options.{name}", value, (dict,), "a mapping of settings")
        if self.samples > 1 and float(self.generation.get("temperature", 0)) == 0:
            raise InputError("config key 'samples' > 1 needs generation.temperature > 0 "
                             "(greedy answers would all be identical)")

    def _validate_generation(self) -> None:
        _typed("generation", self.generation, (dict,), "a mapping")
        for key, value in self.generation.items():
            if key not in GENERATION_KEYS:
                raise InputError(f"unknown key 'generation.{key}'; valid: {', '.join(GENERATION_KEYS)}")
            _typed(f"generation.{key}", value, GENERATION_KEYS[key], "a number")
        # a partial block keeps the other defaults; numbers normalised so 0 and 0.0 hash alike
        gen = {**DEFAULT_GENERATION, **self.generation}
        self.generation = {"max_new_tokens": gen["max_new_tokens"], "temperature": float(gen["temperature"]),
                           "top_p": float(gen["top_p"])}
        self.generation_config(self.generation)  # range checks with the decoder's own messages

    def _validate_dataset_options(self) -> None:
        _typed("dataset_options", self.dataset_options, (dict,), "a mapping of dataset -> settings")
        for name, opts in self.dataset_options.items():
            if name not in EVAL_DATASETS:
                raise InputError(f"unknown dataset '{name}' in 'dataset_options'; valid: {', '.join(EVAL_DATASETS)}")
            _typed(f"dataset_options.{name}", opts, (dict,), "a mapping")
            for key, value in opts.items():
                if key not in PER_DATASET_KEYS:
                    raise InputError(f"unknown key 'dataset_options.{name}.{key}'; valid: "
                                     f"{', '.join(PER_DATASET_KEYS)}")
                _typed(f"dataset_options.{name}.{key}", value, PER_DATASET_KEYS[key], "an integer")

    # ------------------------------------------------------------------ derived

    def generation_config(self, generation: dict | None = None, dataset: str | None = None):
        from ..decoding import GenerationConfig

        gen = dict(generation if generation is not None else self.generation)
        if dataset and "max_new_tokens" in self.dataset_options.get(dataset, {}):
            gen["max_new_tokens"] = self.dataset_options[dataset]["max_new_tokens"]
        try:
            cfg = GenerationConfig(seed=self.seed, **gen)
            cfg.validate()
        except (TypeError, ValueError) as exc:
            raise InputError(f"config key 'generation': {exc}") from exc
        return cfg

    def dataset_limit(self, name: str) -> int | None:
        return self.dataset_options.get(name, {}).get("limit", self.limit)

    def to_dict(self) -> dict:
        return asdict(self)

    def answer_settings(self) -> dict:
        """The settings that change an item's answer or verdicts. Which items are asked
        (datasets, attacks, defenses, limits, samples) is not among them, so a run can be
        extended with more prompts, attacks or defenses and keep every finished line."""
        data = asdict(self)
        out = {k: data[k] for k in ANSWER_KEYS}
        out["max_new_tokens_by_dataset"] = {name: opts["max_new_tokens"] for name, opts
                                            in sorted(self.dataset_options.items()) if "max_new_tokens" in opts}
        return out

    def same_answers(self, settings: dict) -> bool:
        """Whether answer settings recorded by an earlier session (possibly written before
        generation blocks were normalised) mean the same as this config's."""
        old = dict(settings)
        gen = {**DEFAULT_GENERATION, **old.get("generation", {})}
        old["generation"] = {"max_new_tokens": gen["max_new_tokens"], "temperature": float(gen["temperature"]),
                             "top_p": float(gen["top_p"])}
        old.setdefault("max_new_tokens_by_dataset", {})
        return old == self.answer_settings()

    def fingerprint(self) -> str:
        """Hash of :meth:`answer_settings`: lines with equal keys and fingerprints are equal work."""
        blob = json.dumps(self.answer_settings(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
