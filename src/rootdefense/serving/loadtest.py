"""Load test a running ``rootdefense serve``: streamed chat completions at one level of
concurrency after another, over a deterministic mix of held-out benign and harmful prompts.

Each level sends the same ``requests`` prompts (half benign, half harmful, interleaved) with
``concurrency`` requests in flight, and is bounded in time (``time_limit``: no new request
after it, and the ones in flight are cancelled and reported as unfinished). Per request it
records the time to the first non-empty content delta (TTFT), the time to ``[DONE]``, the
HTTP status and the usage the server reports. Per level it reports throughput, latency
percentiles (all, benign, harmful), errors by status and the server's resident memory
(``process_resident_memory_bytes`` from ``/metrics``) before, during and after.

Only loopback servers are tested: this is a benchmark of the local machine, not a tool to
send traffic elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import shlex
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from ..errors import InputError
from .access import LOOPBACK, api_key_from_env

BENIGN_DATASETS = ("sharegpt", "mtbench")  # real user requests; mtbench's are longer, multi-part
HARMFUL_DATASETS = ("advbench", "harmbench")
MEMORY_METRIC = "process_resident_memory_bytes"
MEMORY_POLL_S = 2.0
INFO_TIMEOUT_S = 10.0  # /metrics, /health, /v1/models

# the targets
TARGET_SPEEDUP = 3.0  # output tokens/s at concurrency 16 over concurrency 1
TARGET_TTFT_P95_S = 2.0  # benign prompts at concurrency 4
TARGET_MEMORY_GROWTH = 0.10  # over the whole run


@dataclass
class Prompt:
    text: str
    kind: str  # "benign" or "harmful"
    dataset: str


@dataclass
class LoadTestConfig:
    url: str
    requests: int = 300
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_tokens: int = 48
    api_key_env: str | None = None
    out: str = "results/serve/loadtest.json"
    time_limit: float = 400.0  # seconds per level (three levels: under 20 minutes)
    seed: int = 0
    request_timeout: float = 600.0  # seconds a request may wait between two bytes

    def command(self) -> str:
        """The command line that reruns this test."""
        args = ["rootdefense", "loadtest", "--url", self.url, "--requests", str(self.requests),
                "--concurrency", ",".join(map(str, self.concurrency)), "--max-tokens", str(self.max_tokens),
                "--out", self.out, "--time-limit", f"{self.time_limit:g}", "--seed", str(self.seed)]
        if self.api_key_env:
            args += ["--api-key-env", self.api_key_env]
        return shlex.join(args)


# --------------------------------------------------------------------------- checks and inputs

def check_url(url: str) -> str:
    """The base URL without a trailing slash; InputError unless it is http(s) on a loopback host."""
    try:
        parsed = httpx.URL(url)
    except Exception as e:
        raise InputError(f"--url {url!r} is not a URL: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise InputError(f"--url {url!r}: use http://127.0.0.1:PORT (scheme http or https)")
    host = parsed.host.strip("[]").lower()
    if host not in LOOPBACK:
        raise InputError(f"--url {url!r}: the load test only targets this machine; the host must be one of "
                         f"{', '.join(LOOPBACK)}, not {host!r}")
    return url.rstrip("/")


def check_config(cfg: LoadTestConfig) -> None:
    if cfg.requests < 1:
        raise InputError(f"--requests must be at least 1, got {cfg.requests}")
    if not cfg.concurrency or any(c < 1 for c in cfg.concurrency):
        raise InputError(f"--concurrency must list positive integers, got {cfg.concurrency}")
    if cfg.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    if cfg.time_limit <= 0:
        raise InputError(f"--time-limit must be positive, got {cfg.time_limit}")


def _pool(names: tuple[str, ...], kind: str, rng: random.Random) -> list[Prompt]:
    """The held-out prompts of ``names``, each dataset shuffled by ``rng``, taken in turn."""
    from ..data.split import held_out

    lists = []
    for name in names:
        rows = [Prompt(e.prompt, kind, name) for e in held_out(name)]
        rng.shuffle(rows)
        lists.append(rows)
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [rows[i] for rows in lists if i < len(rows)]
    return out


def held_out_prompts(n: int, seed: int = 0) -> tuple[list[Prompt], dict]:
    """``n`` prompts, benign and harmful in turn (benign first), from the held-out splits of
    :data:`BENIGN_DATASETS` and :data:`HARMFUL_DATASETS`; the same for the same seed. A pool
    smaller than its half is cycled (the report counts the repeats)."""
    rng = random.Random(seed)
    benign, harmful = _pool(BENIGN_DATASETS, "benign", rng), _pool(HARMFUL_DATASETS, "harmful", rng)
    if not benign or not harmful:
        raise InputError("no held-out prompts: install the dataset packages (`rootdefense data list`)")
    prompts = []
    for i in range(n):
        pool = benign if i % 2 == 0 else harmful
        prompts.append(pool[(i // 2) % len(pool)])
    info = {"split": "held out (rootdefense.data.split.held_out: the test split, never trained on)",
            "benign": {"datasets": list(BENIGN_DATASETS), "available": len(benign)},
            "harmful": {"datasets": list(HARMFUL_DATASETS), "available": len(harmful)},
            "seed": seed, "order": "benign and harmful alternate, benign first; each kind takes its datasets in turn"}
    return prompts, info


# --------------------------------------------------------------------------- measuring

def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_memory(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(MEMORY_METRIC + " ") or line.startswith(MEMORY_METRIC + "{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


async def server_memory(client: httpx.AsyncClient) -> int | None:
    try:
        r = await client.get("/metrics", timeout=INFO_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return parse_memory(r.text) if r.status_code == 200 else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def spread(values: list[float]) -> dict:
    out = {"n": len(values)}
    for q in (50, 95, 99):
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else round(p, 4)
    out["mean"] = round(sum(values) / len(values), 4) if values else None
    out["max"] = round(max(values), 4) if values else None
    return out


async def one_request(client: httpx.AsyncClient, prompt: Prompt, max_tokens: int) -> dict:
    """One streamed chat completion; what it measured. ``ok`` only for a 200 stream that ended
    with ``[DONE]`` and held no error."""
    body = {"messages": [{"role": "user", "content": prompt.text}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    rec = {"kind": prompt.kind, "dataset": prompt.dataset, "prompt_chars": len(prompt.text), "ok": False,
           "status": None, "error": None, "ttft_s": None, "latency_s": None, "prompt_tokens": None,
           "completion_tokens": None, "finish_reason": None, "defense": None, "replaced": None, "chars": 0,
           "in_stream": False}
    t0 = time.perf_counter()
    rec["t_start"] = time.time()
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                try:
                    rec["error"] = json.loads(text)["error"]["message"][:300]
                except (ValueError, KeyError, TypeError):
                    rec["error"] = text[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:  # an error inside a 200 stream
                        err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
                        rec["status"] = 500 if err.get("type") == "server_error" else 200
                        rec["in_stream"] = True
                        rec["error"] = "in stream: " + str(err.get("message"))[:300]
                        continue
                    for choice in obj.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if rec["ttft_s"] is None:
                                rec["ttft_s"] = time.perf_counter() - t0
                            rec["chars"] += len(text)
                        if choice.get("finish_reason"):
                            rec["finish_reason"] = choice["finish_reason"]
                    if obj.get("rootdefense") and "defense" in obj["rootdefense"]:
                        ext = obj["rootdefense"]
                        rec["defense"], rec["replaced"] = ext.get("defense"), ext.get("replaced")
                        rec["finish_reason"] = ext.get("finish_reason", rec["finish_reason"])
                    if obj.get("usage"):
                        rec["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                        rec["completion_tokens"] = obj["usage"].get("completion_tokens")
    except httpx.HTTPError as e:
        rec["error"] = f"transport: {type(e).__name__}: {e}"[:300]
    rec["latency_s"] = time.perf_counter() - t0
    if rec["status"] == 200 and rec["error"] is None:
        if not done:
            rec["error"] = "the stream ended without [DONE]"
        elif rec["completion_tokens"] is None:
            rec["error"] = "no usage chunk"
        else:
            rec["ok"] = True
    return rec


def error_key(rec: dict) -> str:
    if rec["status"] is None:
        return "transport: " + rec["error"].split(":")[1].strip() if rec["error"] else "transport"
    if rec.get("in_stream"):
        return f"{rec['status']} in stream"
    if rec["status"] == 200:
        return "200: " + (rec["error"] or "")[:40]
    return str(rec["status"])


async def run_level(client: httpx.AsyncClient, prompts: list[Prompt], cfg: LoadTestConfig, concurrency: int,
                    on_done: Callable[[], None] | None = None) -> tuple[dict, list[dict]]:
    records: list[dict] = []
    next_index = 0
    memory_samples: list[int] = []
    before = await server_memory(client)
    start = time.perf_counter()
    deadline = start + cfg.time_limit

    async def worker():
        nonlocal next_index
        while next_index < len(prompts) and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            rec = await one_request(client, prompts[i], cfg.max_tokens)
            rec.update(index=i, concurrency=concurrency)
            records.append(rec)
            if on_done:
                on_done()

    async def watch_memory():
        while True:
            await asyncio.sleep(MEMORY_POLL_S)
            m = await server_memory(client)
            if m is not None:
                memory_samples.append(m)

    watcher = asyncio.create_task(watch_memory())
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0))
    for t in pending:  # the time limit: requests still in flight are dropped
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    after = await server_memory(client)
    records.sort(key=lambda r: r["index"])
    summary = summarise_level(records, concurrency, wall, sent=next_index, limit_hit=bool(pending),
                              cfg=cfg)
    peak = max([m for m in [before, after, *memory_samples] if m is not None], default=None)
    summary["memory_bytes"] = {"before": before, "after": after, "peak": peak, "samples": len(memory_samples)}
    return summary, records


def summarise_level(records: list[dict], concurrency: int, wall: float, *, sent: int, limit_hit: bool,
                    cfg: LoadTestConfig) -> dict:
    ok = [r for r in records if r["ok"]]
    errors = Counter(error_key(r) for r in records if not r["ok"])
    out_tokens = sum(r["completion_tokens"] for r in ok)
    all_tokens = sum(r["completion_tokens"] + (r["prompt_tokens"] or 0) for r in ok)

    def by(metric: str, kind: str | None = None) -> dict:
        return spread([r[metric] for r in ok if r[metric] is not None and (kind is None or r["kind"] == kind)])

    return {
        "concurrency": concurrency, "sent": sent, "finished": len(records), "ok": len(ok),
        "failed": len(records) - len(ok), "unfinished": sent - len(records),
        "ok_by_kind": dict(Counter(r["kind"] for r in ok)),
        "time_limit_s": cfg.time_limit, "time_limit_hit": limit_hit, "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 3) if wall > 0 else None,
        "prompt_and_output_tokens_per_s": round(all_tokens / wall, 3) if wall > 0 else None,
        "output_tokens_per_request": round(out_tokens / len(ok), 2) if ok else None,
        "no_text": sum(1 for r in ok if r["ttft_s"] is None),
        "ttft_s": {"all": by("ttft_s"), "benign": by("ttft_s", "benign"), "harmful": by("ttft_s", "harmful")},
        "latency_s": {"all": by("latency_s"), "benign": by("latency_s", "benign"),
                      "harmful": by("latency_s", "harmful")},
        "errors": dict(sorted(errors.items())),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in ok)),
        "tokens_replaced": sum(r["replaced"] or 0 for r in ok),
        "answers_with_replacements": sum(1 for r in ok if r["replaced"]),
    }


def check_targets(levels: list[dict], memory: dict) -> dict:
    by_c = {lv["concurrency"]: lv for lv in levels}
    out = {}
    c1, c16 = by_c.get(1), by_c.get(16)
    if c1 and c16 and c1["output_tokens_per_s"]:
        ratio = c16["output_tokens_per_s"] / c1["output_tokens_per_s"]
        out["throughput_c16_vs_c1"] = {"target": f"output tokens/s at concurrency 16 >= {TARGET_SPEEDUP:g}x "
                                                 "concurrency 1 (all streams together)",
                                       "c1_tokens_per_s": c1["output_tokens_per_s"],
                                       "c16_tokens_per_s": c16["output_tokens_per_s"],
                                       "ratio": round(ratio, 3), "met": ratio >= TARGET_SPEEDUP}
    else:
        out["throughput_c16_vs_c1"] = {"target": f">= {TARGET_SPEEDUP:g}x", "met": None,
                                       "note": "needs levels 1 and 16 with finished requests"}
    c4 = by_c.get(4)
    p95 = c4["ttft_s"]["benign"]["p95"] if c4 else None
    out["benign_ttft_p95_c4"] = {"target": f"p95 time to first token on benign prompts at concurrency 4 <= "
                                           f"{TARGET_TTFT_P95_S:g} s", "p95_s": p95,
                                 "met": None if p95 is None else p95 <= TARGET_TTFT_P95_S}
    n5xx = sum(n for lv in levels for k, n in lv["errors"].items() if k[:1] == "5")
    out["no_5xx"] = {"target": "no 5xx answers (nor errors inside a stream)", "count": n5xx, "met": n5xx == 0}
    growth = memory.get("growth")
    out["memory_growth"] = {"target": f"server resident memory grows < {TARGET_MEMORY_GROWTH:.0%} over the run",
                            "before_bytes": memory.get("before"), "after_bytes": memory.get("after"),
                            "growth": growth, "met": None if growth is None else growth < TARGET_MEMORY_GROWTH}
    return out


async def _server_info(client: httpx.AsyncClient) -> dict:
    info = {}
    for name, path in (("health", "/health"), ("models", "/v1/models")):
        try:
            r = await client.get(path, timeout=INFO_TIMEOUT_S)
            info[name] = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            if r.status_code != 200:
                info[name] = {"status": r.status_code, "body": info[name]}
        except httpx.HTTPError as e:
            info[name] = {"error": f"{type(e).__name__}: {e}"}
    return info


async def _run(cfg: LoadTestConfig, base: str, key: str | None, prompts: list[Prompt],
               progress: Callable[[int, int], Callable[[], None]] | None) -> tuple[list[dict], list[dict], dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4, max_keepalive_connections=max(cfg.concurrency))
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout,
                                 trust_env=False) as client:
        server = await _server_info(client)
        levels, records = [], []
        for c in cfg.concurrency:
            tick = progress(c, len(prompts)) if progress else None
            summary, recs = await run_level(client, prompts, cfg, c, tick)
            levels.append(summary)
            records += recs
    return levels, records, server


def run_loadtest(cfg: LoadTestConfig, *, prompts: list[Prompt] | None = None, prompt_info: dict | None = None,
                 progress: Callable[[int, int], Callable[[], None]] | None = None) -> dict:
    """Run every level, write ``cfg.out`` (the report, one JSON object) and its sibling
    ``.jsonl`` (one line per request), and return the report. ``prompts`` replaces the
    held-out mix (tests); ``progress(concurrency, total)`` returns a callback run per request."""
    base = check_url(cfg.url)
    check_config(cfg)
    key = api_key_from_env(cfg.api_key_env)
    if prompts is None:
        prompts, prompt_info = held_out_prompts(cfg.requests, cfg.seed)
    else:
        prompts = [prompts[i % len(prompts)] for i in range(cfg.requests)]
        prompt_info = prompt_info or {"source": "given by the caller"}
    prompt_info = {**prompt_info, "sent_per_level": len(prompts),
                   "benign": {**prompt_info.get("benign", {}), "count": sum(p.kind == "benign" for p in prompts)},
                   "harmful": {**prompt_info.get("harmful", {}), "count": sum(p.kind == "harmful" for p in prompts)},
                   "distinct": len({p.text for p in prompts}),
                   "by_dataset": dict(Counter(p.dataset for p in prompts))}
    started = time.time()
    load_before = os.getloadavg()
    levels, records, server = asyncio.run(_run(cfg, base, key, prompts, progress))
    load_after = os.getloadavg()
    mems = [m for lv in levels for m in (lv["memory_bytes"]["before"], lv["memory_bytes"]["after"])]
    first = levels[0]["memory_bytes"]["before"] if levels else None
    last = levels[-1]["memory_bytes"]["after"] if levels else None
    memory = {"before": first, "after": last, "peak": max([lv["memory_bytes"]["peak"] for lv in levels
                                                          if lv["memory_bytes"]["peak"] is not None], default=None),
              "growth": round((last - first) / first, 4) if first and last else None,
              "measured": sum(m is not None for m in mems)}
    out = Path(cfg.out)
    report = {
        "command": cfg.command(), "url": base, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "client": {"processor": processor_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                   "httpx": httpx.__version__,
                   "load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in load_after],
                   "note": "client and server share this machine (loopback)"},
        "server": server,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "prompts": prompt_info,
        "levels": levels,
        "memory": memory,
        "targets": check_targets(levels, memory),
        "requests_file": str(out.with_suffix(".jsonl")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    with out.with_suffix(".jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return report


# --------------------------------------------------------------------------- terminal

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def report_table(report: dict):
    """The per-level figures as a rich table."""
    from rich.table import Table

    t = Table(title=f"rootdefense loadtest: {report['url']} ({report['client']['processor']})")
    for col in ("conc.", "ok/sent", "req/s", "out tok/s", "TTFT p50/p95/p99 ms", "benign TTFT p95", "E2E p50/p95/p99 ms",
                "errors", "RSS MiB before→after", "limit hit"):
        t.add_column(col, justify="right")
    for lv in report["levels"]:
        tt, ee = lv["ttft_s"]["all"], lv["latency_s"]["all"]
        mem = lv["memory_bytes"]
        rss = "-" if mem["before"] is None or mem["after"] is None else \
            f"{mem['before'] / 2**20:.0f}→{mem['after'] / 2**20:.0f}"
        t.add_row(str(lv["concurrency"]), f"{lv['ok']}/{lv['sent']}", f"{lv['requests_per_s']:.3f}",
                  f"{lv['output_tokens_per_s']:.1f}", "/".join(_ms(tt[f"p{q}"]) for q in (50, 95, 99)),
                  _ms(lv["ttft_s"]["benign"]["p95"]), "/".join(_ms(ee[f"p{q}"]) for q in (50, 95, 99)),
                  ", ".join(f"{k}: {n}" for k, n in lv["errors"].items()) or "0",
                  rss, "yes" if lv["time_limit_hit"] else "no")
    return t


def target_lines(report: dict) -> list[str]:
    lines = []
    for name, t in report["targets"].items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        figures = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("target", "met"))
        lines.append(f"{name}: {mark} ({t['target']}; {figures})")
    return lines


def main(cfg: LoadTestConfig) -> dict:
    """What ``rootdefense loadtest`` runs: the test with a progress bar, then the table and
    the targets on the terminal (the JSON is written first)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    check_url(cfg.url)
    check_config(cfg)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        def progress(concurrency: int, total: int) -> Callable[[], None]:
            task = bar.add_task(f"concurrency {concurrency}", total=total)
            return lambda: bar.advance(task)

        report = run_loadtest(cfg, progress=progress)
    out = Console()
    if not out.is_terminal:  # a log file: wide enough for the whole table
        out = Console(width=170)
    out.print(report_table(report))
    for line in target_lines(report):
        out.print(line, highlight=False)
    out.print(f"report: {cfg.out}  requests: {report['requests_file']}", highlight=False)
    return report
