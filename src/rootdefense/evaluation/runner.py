"""Run an evaluation: plan the work, attack, defend, judge, write JSON lines, resume.

The run is planned as independent work items (dataset prompt x attack x defense x sample).
Optimising attacks (GCG) are computed first, once per prompt, and cached in
``attacks.jsonl``; then every item is answered, judged and appended to ``results.jsonl`` as
soon as it is done. A rerun with ``resume`` skips finished items, so an interruption loses
nothing already written. The first line of ``results.jsonl`` records the config and its
fingerprint; a results file made under another config is never continued.

Work runs in-process, or sharded over Ray actors (``ray_address``), each actor loading the
model once: the same code path, so a laptop run and a cluster run give the same lines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..data import DATASETS
from ..data.records import Example
from ..data.split import held_out
from ..errors import InputError, RootDefenseError
from ..jsonl import JsonlWriter, read_objects
from .base import AttackedPrompt, EvalContext
from .config import EvalConfig
from .report import REPORT, SUMMARY, write_outputs

RESULTS = "results.jsonl"
ATTACKS_FILE = "attacks.jsonl"


# --------------------------------------------------------------------------- planning


def item_key(dataset: str, prompt_id: str, attack: str, defense: str, sample: int) -> str:
    return f"{dataset}|{prompt_id}|{attack}|{defense}|{sample}"


def load_examples(cfg: EvalConfig) -> dict[str, list[Example]]:
    """Held-out prompts of each dataset (never used to train a probe or the expert)."""
    return {name: held_out(name, cfg.dataset_limit(name)) for name in cfg.datasets}


def _example_dict(ex: Example) -> dict:
    return {"id": ex.id, "prompt": ex.prompt, "harmful": ex.harmful, "source": ex.source,
            "meta": {k: v for k, v in ex.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}}


def plan(cfg: EvalConfig, examples: dict[str, list[Example]]) -> tuple[list[dict], list[dict]]:
    """(attack jobs for optimising attacks, work items). Harmful datasets get ``attacks``;
    benign ones ``benign_attacks`` (``none`` by default; wrappers measure whether a disguise
    alone makes a defense refuse): they measure over-refusal and helpfulness. Optimising
    attacks run on the first ``optimised_limit`` prompts only."""
    from .attacks import ATTACKS

    jobs, items = [], []
    for ds in cfg.datasets:
        harmful = DATASETS[ds].harmful
        attacks = cfg.attacks if harmful else cfg.benign_attacks
        for index, ex in enumerate(examples[ds]):
            exd = _example_dict(ex)
            for attack in attacks:
                optimises = ATTACKS[attack].optimises
                if optimises and cfg.optimised_limit is not None and index >= cfg.optimised_limit:
                    continue
                if optimises:
                    jobs.append({"key": f"{ds}|{ex.id}|{attack}", "dataset": ds, "attack": attack,
                                 "index": index, "example": exd})
                for defense in cfg.defenses:
                    for sample in range(cfg.samples):
                        items.append({"key": item_key(ds, ex.id, attack, defense, sample), "dataset": ds,
                                      "attack": attack, "defense": defense, "sample": sample,
                                      "index": index, "example": exd})
    # prompt rank first, so that an interrupted run holds complete cells for its first prompts
    # of every dataset (and can be narrowed to them with a smaller limit)
    items.sort(key=lambda it: it["index"])
    return jobs, items


# --------------------------------------------------------------------------- worker


class Worker:
    """Everything one process needs, loaded once: the model, the attacks, the defenses and
    the judges (defenses and judges are set up on first use)."""

    def __init__(self, config: dict, home: str | None = None):
        if home:
            os.environ["ROOTDEFENSE_HOME"] = home
        import torch

        from ..models import load_model
        from .attacks import make_attack

        self.cfg = EvalConfig.from_dict(config)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        lm = load_model(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device)
        self.ctx = EvalContext(lm=lm, seed=self.cfg.seed, options=self.cfg.options)
        self.attacks = {name: _build(make_attack, name, self.cfg.options)
                        for name in dict.fromkeys([*self.cfg.attacks, *self.cfg.benign_attacks])}
        self._defenses: dict = {}
        self._judges: dict | None = None

    # parts, built on first use -------------------------------------------------

    def defense(self, name: str):
        if name not in self._defenses:
            from .defenses import make_defense

            d = _build(make_defense, name, self.cfg.options)
            d.setup(self.ctx)
            self._defenses[name] = d
        return self._defenses[name]

    def judges(self) -> dict:
        if self._judges is None:
            from .judging import make_judge

            self._judges = {}
            for name in self.cfg.judges:
                j = _build(make_judge, name, self.cfg.options)
                j.setup()
                self._judges[name] = j
        return self._judges

    def describe(self) -> dict:
        """Judges, defenses and attacks as they were set up (stored with the results)."""
        return {"judges": {n: j.describe() for n, j in self.judges().items()},
                "defenses": {n: self.defense(n).describe() for n in self.cfg.defenses},
                "attacks": {n: a.describe() for n, a in self.attacks.items()},
                "model": self.ctx.lm.model_id}

    # work -----------------------------------------------------------------------

    def attack(self, job: dict) -> dict:
        ex = Example(**job["example"])
        t0 = time.perf_counter()
        attacked = self.attacks[job["attack"]].apply(ex, self.ctx, index=job["index"])
        return {"kind": "attack", "key": job["key"], "attacked": attacked.to_dict(),
                "seconds": round(time.perf_counter() - t0, 3)}

    def run(self, item: dict, attacked: dict | None = None) -> dict:
        """Answer, judge and measure one work item; returns its results line."""
        from . import metrics

        ex = Example(**item["example"])
        if attacked is None:
            ap = self.attacks[item["attack"]].apply(ex, self.ctx, index=item["index"])
        else:
            ap = AttackedPrompt.from_dict(attacked)
        gen_cfg = self.cfg.generation_config(dataset=item["dataset"])
        gen_cfg.seed = self.cfg.seed + 1000 * item["sample"] + item["index"]
        record = {"kind": "result", "key": item["key"], "dataset": item["dataset"], "prompt_id": ex.id,
                  "harmful": ex.harmful, "prompt": ex.prompt, "attack": item["attack"],
                  "attack_meta": ap.meta, "defense": item["defense"], "sample": item["sample"]}
        t0 = time.perf_counter()
        try:
            gen = self.defense(item["defense"]).generate(ap, gen_cfg, self.ctx)
        except InputError as exc:  # e.g. an attack template longer than the context window
            record.update(error=str(exc), seconds=round(time.perf_counter() - t0, 3))
            return record
        seconds = time.perf_counter() - t0
        verdicts = {name: j.judge([ex.prompt], [gen.text])[0].to_dict() for name, j in self.judges().items()}
        measures = {"degenerate": metrics.degenerate(gen.token_ids, gen.text)}
        if not ex.harmful:
            measures["ppl_base"] = metrics.perplexity_under(self.ctx.lm, ex.prompt, gen.token_ids)
        if "target" in ex.meta:
            measures["correct"] = metrics.gsm8k_correct(gen.text, ex.meta["target"])
        record.update(answer=gen.text, tokens=len(gen.token_ids), prompt_tokens=gen.prompt_tokens,
                      finish_reason=gen.trace.finish_reason, trace=gen.trace.summary(),
                      timings={**gen.timings, "total_s": round(seconds, 4)}, verdicts=verdicts,
                      metrics=measures)
        return record


def _build(factory, name: str, options: dict):
    """The part ``name`` with its options; a variant ``base@label`` takes the base part's
    options overlaid with its own."""
    base = name.split("@", 1)[0]
    opts = {**options.get(base, {}), **options.get(name, {})} if base != name else options.get(name, {})
    try:
        return factory(base, **opts)
    except TypeError as exc:
        raise InputError(f"config key 'options.{name}': {exc}") from exc


# --------------------------------------------------------------------------- files


def _check_header(lines: list[dict], path: Path, cfg: EvalConfig) -> None:
    headers = [o for o in lines if o.get("kind") == "run"]
    if not headers:
        if any(o.get("kind") == "result" for o in lines):
            raise InputError(f"{path} has results but no run header; it was not written by `rootdefense eval`")
        return
    header = headers[-1]
    if header.get("config_hash") != cfg.fingerprint() and not cfg.same_answers(header.get("answer_settings", {})):
        old = header.get("answer_settings", {})
        new = cfg.answer_settings()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(
            f"{path} was made with other answer settings (fingerprint {header.get('config_hash')}, yours "
            f"{cfg.fingerprint()}; differing keys: {', '.join(diff) or 'unknown'}); results of two settings "
            f"are never mixed: use another --out folder, or --overwrite to start again")


# what names a defense's files, and the settings it resolved from tuned defaults on disk
# (its own options are covered by the fingerprint)
IDENTITY = ("probe", "expert", "correction")


def _differs(old, new) -> bool:
    """Compare on the keys both sides have (older sessions may record fewer)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(_differs(old[k], new[k]) for k in set(old) & set(new))
    return old != new


def _check_parts(lines: list[dict], parts: dict, path: Path) -> None:
    """Refuse to continue a run whose probes, expert or judge files changed since an earlier
    session (retrained files would silently mix two settings in one results file)."""
    earlier = [o for o in lines if o.get("kind") == "parts"]
    if not earlier:
        return
    before = earlier[-1]
    changed = []
    for name, desc in parts.get("defenses", {}).items():
        old = before.get("defenses", {}).get(name, {})
        if _differs({k: old.get(k) for k in IDENTITY if k in old}, {k: desc.get(k) for k in IDENTITY if k in old}):
            changed.append(f"defense '{name}'")
    for name, desc in parts.get("judges", {}).items():
        old = before.get("judges", {}).get(name)
        if old is not None and _differs({k: v for k, v in old.items() if k != "stats"},
                                        {k: v for k, v in desc.items() if k != "stats"}):
            changed.append(f"judge '{name}'")
    if changed:
        raise InputError(
            f"{path}: the {', '.join(changed)} is not what earlier sessions used (its probe, expert or judge "
            f"files changed); results made with both would be mixed: use another --out folder, or "
            f"--overwrite to start again")


# --------------------------------------------------------------------------- driver


class _LocalPool:
    def __init__(self, config: dict, home: str | None):
        self.worker = Worker(config, home)

    def describe(self) -> dict:
        return self.worker.describe()

    def map(self, method: str, args_list):
        for args in args_list:
            yield getattr(self.worker, method)(*args)

    def close(self):
        pass


def run_eval(cfg: EvalConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
             ray_address: str | None = None, workers: int | None = None, progress: bool = True) -> dict:
    """Run (or continue) an evaluation into ``out_dir``; returns the summary."""
    out = Path(out_dir)
    results, attacks_file = out / RESULTS, out / ATTACKS_FILE
    if results.exists() and not (resume or overwrite):
        raise InputError(f"'{results}' exists; pass --resume to continue it or --overwrite to start again")
    if overwrite:
        for f in (results, attacks_file, out / SUMMARY, out / REPORT):
            f.unlink(missing_ok=True)
    earlier = read_objects(results)  # the file as this session found it (empty unless resuming)
    if resume:
        _check_header(earlier, results, cfg)
    examples = load_examples(cfg)
    jobs, items = plan(cfg, examples)
    done = {o["key"] for o in earlier if o.get("kind") == "result"}
    same = {cfg.fingerprint()} | {o.get("config_hash") for o in earlier
                                   if o.get("kind") == "run" and cfg.same_answers(o.get("answer_settings", {}))}
    cached = {o["key"]: o["attacked"] for o in read_objects(attacks_file)
              if o.get("kind") == "attack" and o.get("config_hash") in same}
    todo_jobs = [j for j in jobs if j["key"] not in cached]
    todo = [it for it in items if it["key"] not in done]

    t0 = time.time()
    home = os.environ.get("ROOTDEFENSE_HOME")
    pool = _RayPool(cfg.to_dict(), home, ray_address, workers) if ray_address else _LocalPool(cfg.to_dict(), home)
    try:
        parts = pool.describe()
        _check_parts(earlier, parts, results)  # before anything is written: a refused run changes nothing
        with JsonlWriter(results, append=True) as res:
            res.write({"kind": "run", "config": cfg.to_dict(), "config_hash": cfg.fingerprint(),
                       "answer_settings": cfg.answer_settings(), "rootdefense": __version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "planned": len(items),
                       "keys": [it["key"] for it in items]})
            res.write({"kind": "parts", "config_hash": cfg.fingerprint(), **parts})
            if todo_jobs:
                with JsonlWriter(attacks_file, append=True) as af, \
                        tqdm(total=len(todo_jobs), desc="optimising attacks", unit="prompt",
                             disable=not progress) as bar:
                    for line in pool.map("attack", [(j,) for j in todo_jobs]):
                        line["config_hash"] = cfg.fingerprint()
                        af.write(line)
                        cached[line["key"]] = line["attacked"]
                        bar.update(1)
            args = []
            for it in todo:
                akey = f"{it['dataset']}|{it['example']['id']}|{it['attack']}"
                args.append((it, cached.get(akey)))
            with tqdm(total=len(items), initial=len(items) - len(todo), desc="answering", unit="item",
                      disable=not progress) as bar:
                for record in pool.map("run", args):
                    record["config_hash"] = cfg.fingerprint()
                    res.write(record)
                    bar.update(1)
            res.write({"kind": "session", "wall_s": round(time.time() - t0, 1), "items": len(todo),
                       "attack_jobs": len(todo_jobs), "ray": ray_address, "workers": getattr(pool, "size", 1)})
    finally:
        pool.close()
    return write_outputs(results, out)


class _RayPool:
    """Work items sharded over Ray actors, each holding one :class:`Worker`."""

    def __init__(self, config: dict, home: str | None, address: str, workers: int | None):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as exc:
            raise RootDefenseError("--ray needs Ray: pip install 'rootdefense[ray]' (ray==2.60.0)") from exc
        self.ray = ray
        env = {"OMP_NUM_THREADS": str(config.get("threads") or 1), "TOKENIZERS_PARALLELISM": "false"}
        if home:
            env["ROOTDEFENSE_HOME"] = home
        if not ray.is_initialized():
            ray.init(address=None if address in ("local", "auto-local") else address,
                     include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
        resources = ray.cluster_resources()
        per = int(config.get("threads") or 1)
        gpus = resources.get("GPU", 0) if config.get("device", "auto") != "cpu" else 0
        if gpus:  # one model per GPU (or a share of one), never all actors on cuda:0 unasked
            self.size = workers or int(gpus)
            remote = ray.remote(num_cpus=per, num_gpus=gpus / self.size if self.size > gpus else 1)(Worker)
        else:
            self.size = workers or max(1, int(resources.get("CPU", 1)) // per)
            remote = ray.remote(num_cpus=per)(Worker)
        self.actors = [remote.remote(config, home) for _ in range(self.size)]
        self.pool = ActorPool(self.actors)

    def describe(self) -> dict:
        return self.ray.get(self.actors[0].describe.remote())

    def map(self, method: str, args_list):
        return self.pool.map_unordered(lambda a, args: getattr(a, method).remote(*args), list(args_list))

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.ray.shutdown()
