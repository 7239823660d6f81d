"""Command line: a thin layer over :mod:`rootdefense.api`. Errors caused by input exit 2
with one line naming the problem."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .data.split import SPLITS
from .errors import InputError, RootDefenseError


class UserError(click.ClickException):
    exit_code = 2


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RootDefenseError as exc:
            raise UserError(str(exc)) from exc


def dtype_option(f):
    from .models.loading import DTYPES

    return click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))(f)


def kind_option(f):
    from .probes.base import KINDS

    return click.option("--kind", type=click.Choice(list(KINDS)), default="response", show_default=True,
                        help="probe kind (eval: which cached probe, when PROBE_PATH is not given)")(f)


def model_options(f):
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")(f)
    f = dtype_option(f)
    f = click.option("--model", default="smollm2-135m", show_default=True,
                     help="embedded name, hub id or local folder of a chat model")(f)
    return f


def defense_options(f):
    from .api import DEFENSES
    from .decoding.rules import RULES
    from .defaults import PRESETS
    from .drafting.factory import DRAFTER_NAMES

    f = click.option("--rollback", type=click.Choice(["answer", "sentence"]), default=None,
                     help="rds-expert: where a flagged answer restarts  [default: tuned, else answer]")(f)
    f = click.option("--expert", default=None, help="rds-expert: expert adapter folder (default: the cached one)")(f)
    f = click.option("--probe", default=None, help="probe folder (default: the cached one for the model and rule)")(f)
    f = click.option("--lam", type=float, default=None, help="weighted rule: lambda  [default: 2.0]")(f)
    f = click.option("--k", "k", type=int, default=None, help="paper rule: top-k by probability  [default: 10]")(f)
    f = click.option("--tau", type=float, default=None,
                     help="harm threshold (default: the tuned one, else the probe's calibrated one)")(f)
    f = click.option("--rule", type=click.Choice(list(RULES)), default=None,
                     help="rds: decision rule  [default: threshold]")(f)
    f = click.option("--defense", type=click.Choice(list(DEFENSES)), default=None,
                     help="default: the model's tuned defense (`rootdefense tune`), else rds")(f)
    f = click.option("--max-draft", type=int, default=None, help="drafted tokens verified per forward  [default: 8]")(f)
    f = click.option("--drafter", default=None,
                     help="speculative decoding (the same answers, fewer forwards): " + ", ".join(DRAFTER_NAMES)
                          + "; auto: prompt lookup, with the draft head behind it when a trained one drafts well "
                          "enough; lazy: no drafts, candidates scored only where a token is flagged  [default: the "
                          "preset's: auto for the tuned rds (threshold rule) and rds-expert, else none]")(f)
    f = click.option("--preset", type=click.Choice(list(PRESETS)), default="tuned", show_default=True,
                     help="tuned: the model's measured defaults; paper: the paper's rule and probe")(f)
    return f


def generation_options(f):
    f = click.option("--candidate-top-p", type=float, default=1.0, show_default=True,
                     help="keep only candidates inside this probability mass (the top one always)")(f)
    f = click.option("--top-m", type=int, default=20, show_default=True, help="candidates scored per step")(f)
    f = click.option("--stop", multiple=True, help="stop string (repeatable)")(f)
    f = click.option("--seed", type=int, default=None)(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")(f)
    f = click.option("--max-new-tokens", type=int, default=128, show_default=True)(f)
    return f


def _config(o):
    from .decoding import GenerationConfig

    return GenerationConfig(max_new_tokens=o["max_new_tokens"], temperature=o["temperature"], top_p=o["top_p"],
                            seed=o["seed"], stop=list(o["stop"]), top_m=o["top_m"],
                            candidate_top_p=o["candidate_top_p"])


def _defender(o):
    from .api import Defender
    from .defaults import fallback_notes

    d = Defender.load(o["model"], dtype=o["dtype"], device=o["device"], preset=o["preset"], defense=o["defense"],
                      rule=o["rule"], tau=o["tau"], k=o["k"], lam=o["lam"], probe=o["probe"], expert=o["expert"],
                      rollback=o["rollback"], drafter=o["drafter"], max_draft=o["max_draft"])
    for note in fallback_notes(d.lm.model_id, d.settings.correction):
        click.echo(f"note: {note}", err=True)
    return d


@click.group(cls=Group)
@click.version_option(package_name="rootdefense")
def cli():
    """rootdefense: make an open LLM safer while it decodes (Root Defense Strategies)."""
    from .quiet import silence_unactionable_warnings

    silence_unactionable_warnings()


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--probes/--no-probes", default=True, show_default=True,
              help="also install (or train) the default probes and the shipped expert")
@click.option("--train-probes", is_flag=True,
              help="train the probes here even where the package ships the tuned ones")
@click.option("--reinstall", is_flag=True,
              help="replace the probes and expert already here with the shipped ones (where the package has them)")
def prepare(model, probes, train_probes, reinstall):
    """Convert the embedded model once and install its default probes (cached): the probes
    its shipped defaults were measured with where the package has them, else trained here.
    Probes and an expert that an earlier release installed are replaced by this release's;
    those trained here are kept (`--reinstall` replaces them too)."""
    from .install import prepare as install

    install(model, probes=probes, train_probes=train_probes, reinstall=reinstall, log=click.echo)


@cli.command()
@click.argument("prompt", required=False)
@model_options
@defense_options
@generation_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (single prompt)")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="write the trace page here")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None,
              help="batch mode: JSONL with {\"prompt\": ...} or {\"messages\": [...]} per line")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), default=None, help="batch mode: JSONL out")
@click.option("--resume", is_flag=True, help="batch mode: skip input lines already in --output")
@click.option("--overwrite", is_flag=True, help="batch mode: replace an existing --output")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="batch mode: lines decoded together (same answers, one forward per step for all)")
def generate(prompt, as_json, html, input_path, output_path, resume, overwrite, batch_size, **o):
    """Answer PROMPT (or every line of --input) with or without the defense."""
    from .batch import run_batch
    from .render import write_trace_page

    cfg = _config(o)
    if input_path or output_path:
        if prompt:
            raise InputError("give either PROMPT or --input/--output, not both")
        if not (input_path and output_path):
            raise InputError("batch mode needs both --input and --output")
        if batch_size < 1:
            raise InputError(f"batch size must be an integer >= 1, got {batch_size}")
        defender = _defender(o)
        summary = run_batch(defender, cfg, input_path, output_path, resume=resume, overwrite=overwrite, html=html,
                            batch_size=batch_size)
        click.echo(json.dumps(summary) if as_json else
                   f"{summary['written']} answers written to {output_path} ({summary['skipped']} already done)")
        return
    if prompt is None:
        raise InputError("give a PROMPT, or --input FILE.jsonl --output FILE.jsonl")
    defender = _defender(o)
    stream = not as_json and sys.stdout.isatty()
    # the stream receives final text only: nothing shown is ever withdrawn
    gen = defender.generate(prompt, config=cfg, on_text=(lambda piece: click.echo(piece, nl=False)) if stream else None)
    record = {"prompt": prompt, **gen.to_dict(), "settings": defender.describe()}
    if html:
        write_trace_page(html, [{"prompt": prompt, "label": _label(defender), "text": gen.text,
                                 "trace": record["trace"], "meta": gen.timings}], title="rootdefense trace")
    if as_json:
        click.echo(json.dumps(record, ensure_ascii=False))
        return
    if not stream:
        click.echo(gen.text, nl=False)
    s = gen.trace.summary()
    click.echo(f"\n[{_label(defender)}] {s['replaced']} of {s['tokens']} tokens replaced{_withheld(gen)}; "
               f"{gen.timings['tokens_per_s']} tok/s" + (f"; trace: {html}" if html else ""), err=True)


def _withheld(gen) -> str:
    """What the status line says of an answer rds-expert withheld (else nothing)."""
    return "; withheld: the expert's correction never came" if gen.trace.finish_reason == "withheld" else ""


def _label(defender) -> str:
    d = defender.describe()
    if d["defense"] == "none":
        return "undefended"
    if d["defense"] == "rds-expert":
        return f"rds-expert tau={d['tau']:.3f}"
    extra = f" tau={d['tau']:.3f}" if "tau" in d else ""
    return f"rds {d['rule']}{extra}"


@cli.command()
@model_options
@defense_options
@generation_options
def chat(**o):
    """Interactive chat; /reset clears the conversation, /exit or Ctrl-D quits."""
    cfg = _config(o)
    defender = _defender(o)
    click.echo(f"rootdefense chat [{_label(defender)}] on {defender.lm.model_id}; /exit to quit", err=True)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            gen = defender.generate(messages=messages, config=cfg)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": gen.text})
        click.echo(f"bot> {gen.text}")
        click.echo(f"     ({gen.trace.replaced} of {len(gen.token_ids)} tokens replaced{_withheld(gen)})", err=True)


@cli.group(cls=Group)
def probe():
    """Train and evaluate harm probes."""


@probe.command("train")
@click.option("--model", default="smollm2-135m", show_default=True)
@kind_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="default: the model's probe cache")
@click.option("--per-dataset", type=int, default=300, show_default=True, help="prompts per dataset (cap)")
@click.option("--self-answers", type=int, default=96, show_default=True, help="response probe: own answers per side")
@click.option("--target-fpr", type=float, default=None, help="benign flag rate for the threshold")
@click.option("--disguised", type=click.IntRange(min=0), default=100, show_default=True,
              help="query probe: harmful and benign requests per attack family wrapped in it (0: plain only)")
@click.option("--traffic", type=click.IntRange(min=0), default=0, show_default=True,
              help="query probe: this many more ShareGPT user turns (ordinary traffic) as benign requests")
@click.option("--alarming-disguised", type=click.IntRange(min=0), default=50, show_default=True,
              help="query probe: benign-but-alarming fit requests per attack family wrapped in it (0: none)")
@click.option("--layers", default=None, help="comma-separated layers to sweep (default: all / every 3rd)")
@dtype_option
def probe_train(model, kind, out, per_dataset, self_answers, target_fpr, disguised, traffic, alarming_disguised,
                layers, dtype):
    """Collect hidden states from installed datasets and fit a probe."""
    from .models import load_model
    from .paths import probe_dir
    from .probes.train import TrainSpec, train_probe

    try:
        layer_list = [int(x) for x in layers.split(",")] if layers else None
    except ValueError as exc:
        raise InputError(f"--layers must be comma-separated integers, got '{layers}'") from exc
    if self_answers < 8:
        raise InputError("--self-answers must be at least 8")
    spec = TrainSpec(kind=kind, per_dataset=per_dataset, layers=layer_list, target_fpr=target_fpr,
                     self_answers=self_answers, disguised=disguised, traffic=traffic,
                     alarming_disguised=alarming_disguised)
    lm = load_model(model, dtype=dtype)
    if layer_list and not all(0 <= layer <= lm.num_layers for layer in layer_list):
        raise InputError(f"--layers must lie in 0..{lm.num_layers} for this model")
    probe_obj, metrics = train_probe(lm, spec, log=click.echo)
    folder = probe_obj.save(out or probe_dir(lm.model_id, kind))
    click.echo(json.dumps({"saved": str(folder), "layer": probe_obj.layer, "threshold": probe_obj.threshold,
                           "metrics": metrics}, indent=2))


@probe.command("eval")
@click.argument("probe_path", required=False)
@click.option("--model", default="smollm2-135m", show_default=True)
@kind_option
@click.option("--limit", type=int, default=None, help="held-out prompts per dataset (cap)")
@click.option("--json", "as_json", is_flag=True)
def probe_eval(probe_path, model, kind, limit, as_json):
    """Re-score a saved probe on held-out data: AUROC, per-dataset TPR, edgy FPR."""
    from .api import find_probe
    from .models import load_model
    from .probes.base import LinearProbe
    from .probes.evaluate import evaluate_probe, format_report

    if limit is not None and limit < 5:
        raise InputError("--limit must be at least 5")
    lm = load_model(model)
    p = LinearProbe.load(probe_path) if probe_path else find_probe(lm.model_id, kind)
    p.check_model(lm.model_id, lm.hidden_size, lm.num_layers)
    report = evaluate_probe(lm, p, limit=limit)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.group(cls=Group)
def expert():
    """The safety expert adapter (LoRA) used for correction and by SafeDecoding."""


@expert.command("train")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="default: the model's expert cache")
@click.option("--harmful", type=int, default=160, show_default=True, help="harmful prompts (-> refusals)")
@click.option("--benign", type=int, default=160, show_default=True, help="benign prompts (-> own answers)")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--answer-tokens", type=int, default=48, show_default=True)
@click.option("--disguised", type=int, default=0, show_default=True,
              help="harmful and benign requests asked inside each wrapper family (0: none, as shipped)")
@click.option("--families", default="roleplay,fiction,prefix-injection,dan,inthewild", show_default=True,
              help="the wrapper families trained on (comma-separated; those left out are held out)")
@click.option("--alarming", type=int, default=0, show_default=True,
              help="benign-but-alarming requests (fit part) answered by the model, half of them wrapped")
@click.option("--check/--no-check", default=True, show_default=True,
              help="afterwards, compare refusal rates of base and expert on held-out prompts")
def expert_train(model, out, harmful, benign, epochs, rank, answer_tokens, disguised, families, alarming, check):
    """Fit the expert: refusals for harmful prompts, the model's own answers for benign ones
    (with --disguised, also inside wrapper families)."""
    from .expert import ExpertSpec, train_expert
    from .models import load_model
    from .paths import expert_dir

    spec = ExpertSpec(harmful=harmful, benign=benign, epochs=epochs, rank=rank, answer_tokens=answer_tokens,
                      disguised=disguised, families=tuple(f.strip() for f in families.split(",") if f.strip()),
                      alarming=alarming)
    lm = load_model(model)
    folder = out or expert_dir(lm.model_id)
    meta = train_expert(lm, spec, folder, log=click.echo, check=check)
    click.echo(json.dumps({"saved": str(folder), **meta}, indent=2))


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@dtype_option
@click.option("--harmful", type=int, default=40, show_default=True, help="calibration harmful prompts (validation split)")
@click.option("--benign", type=int, default=40, show_default=True, help="calibration benign prompts (validation split)")
@click.option("--attacks", default="none,prefill,roleplay", show_default=True,
              help="template attacks and wrappers the harmful ones are asked under")
@click.option("--benign-attacks", default="none,roleplay", show_default=True,
              help="wrappers the benign ones are asked under (a wrapper alone must not make the monitor fire)")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--max-benign-flag", type=float, default=0.03, show_default=True,
              help="largest share of benign answers the monitor may flag (they would be rewritten)")
@click.option("--steer-tau", type=float, default=None,
              help="harm steered tokens must stay below once an answer is flagged (default: the flagging "
                   "monitor's tau); choose it on validation prompts with scripts/steer_tau_val.py")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="folder for defaults.json (default: beside the model's response probe, where it is used)")
@click.option("--reuse", is_flag=True,
              help="re-sweep the calibration answers of an earlier run (calibration.jsonl) instead of decoding")
@click.option("--suspicion-sharegpt", type=int, default=400, show_default=True,
              help="ShareGPT user turns read (with the benign validation prompts) to set the suspicion check "
                   "just above them, where a gate or blend is chosen (0: no suspicion check)")
@click.option("--armed", type=click.IntRange(min=0), default=0, show_default=True,
              help="benign validation requests that reach the lowest gate tried, decoded for the strict setting "
                   "alone (0: none)")
@click.option("--max-armed-flag", type=float, default=0.1, show_default=True,
              help="with --armed: the share of those a gate arms that its strict setting may flag")
@click.option("--json", "as_json", is_flag=True, help="print the defaults as JSON")
def tune(model, dtype, harmful, benign, attacks, benign_attacks, max_new_tokens, max_benign_flag, steer_tau, out, reuse,
         suspicion_sharegpt, armed, max_armed_flag, as_json):
    """Measure the model's undefended answers and save its tuned defense defaults.

    The answers' per-token harms go to calibration.jsonl beside defaults.json as they are
    made (an interrupted run resumes); --reuse re-sweeps them with other settings."""
    from .models import load_model
    from .tuning import TuneSpec, tune_and_save

    spec = TuneSpec(harmful=harmful, benign=benign, attacks=tuple(_csv(attacks)),
                    benign_attacks=tuple(_csv(benign_attacks)), max_new_tokens=max_new_tokens,
                    max_benign_flag=max_benign_flag, steer_tau=steer_tau, suspicion_sharegpt=suspicion_sharegpt,
                    armed=armed, max_armed_flag=max_armed_flag)
    lm = load_model(model, dtype=dtype)
    command = " ".join(["rootdefense", "tune", *sys.argv[2:]]) if sys.argv[1:2] == ["tune"] else "rootdefense tune"
    result, path = tune_and_save(lm, spec, out, reuse=reuse, command=command, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else f"defaults saved: {path}")


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--prompts", type=int, default=5, show_default=True, help="prompts per set (benign, harmful)")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--methods", default=None, help="comma-separated (default: all that need no draft model)")
@click.option("--draft-model", default=None, help="a small model sharing the tokenizer (hf-assisted, rds-spec-model)")
@click.option("--max-draft", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
@click.option("--batch-size", type=int, default=8, show_default=True, help="prompts per batch (the *-batch methods)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="save the JSON here as well")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with a 'results' list")
def bench(model, prompts, max_new_tokens, methods, draft_model, max_draft, threads, batch_size, out, as_json):
    """Tokens/s, ms/token, accepted length and peak RSS of every decoding method, side by side."""
    from .bench import DEFAULT_METHODS, BenchSpec, bench_table, run_bench

    spec = BenchSpec(model=model, prompts=prompts, max_new_tokens=max_new_tokens,
                     methods=tuple(_csv(methods) or DEFAULT_METHODS), draft_model=draft_model, max_draft=max_draft,
                     threads=threads, batch_size=batch_size)
    report = run_bench(spec, log=lambda m: click.echo(m, err=True))
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    click.echo(text if as_json else bench_table(report))


@cli.group(cls=Group)
def draft():
    """Draft heads for speculative decoding."""


@draft.command("train")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--data", "source", type=click.Choice(["reference", "self"]), default="reference", show_default=True,
              help="reference: one teacher-forced forward over each ShareGPT answer (as EAGLE trains; fast); "
                   "self: the model decodes its own answers (slow)")
@click.option("--prompts", type=int, default=1500, show_default=True, help="ShareGPT conversations (fit split)")
@click.option("--answer-tokens", type=int, default=256, show_default=True)
@click.option("--val-prompts", type=int, default=24, show_default=True,
              help="--data reference: held-out prompts (val split) the model answers itself, to measure acceptance")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--draft-vocab", type=int, default=8192, show_default=True, help="tokens the head may propose")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="learning rate over the epochs (cosine: decays to 0)")
@click.option("--unroll", type=int, default=1, show_default=True,
              help="training passes per window; each further pass reads the head's own predicted features")
@click.option("--taps", default=None,
              help="comma-separated extra target layers the head reads beside the final features, as EAGLE-3 "
                   "does (hidden-state indices, e.g. 4,16); default: none")
@click.option("--init", "init_from", type=click.Path(file_okay=False), default=None,
              help="a trained head (folder) for this model to start from, e.g. to train on more data")
@click.option("--fresh-data", is_flag=True, help="make the data again even when a matching set is saved")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="default: the model's draft-head cache")
def draft_train(model, source, prompts, answer_tokens, val_prompts, epochs, lr, draft_vocab, schedule, unroll,
                taps, init_from, fresh_data, out):
    """Fit a one-layer draft head (EAGLE-style) on the model's own features and greedy tokens.

    The data (features and the model's greedy choices) is saved beside the head
    (distill-*.safetensors), so training again with other epochs or learning rate reuses it."""
    from .drafting.head import HeadSpec, train_from_sharegpt
    from .models import load_model

    try:
        tap_list = tuple(int(t) for t in (_csv(taps) or ()))
    except ValueError as exc:
        raise InputError(f"--taps must be comma-separated integers, got {taps!r}") from exc
    spec = HeadSpec(prompts=prompts, answer_tokens=answer_tokens, epochs=epochs, draft_vocab=draft_vocab, lr=lr,
                    schedule=schedule, unroll=unroll, taps=tap_list)
    if val_prompts < 1:
        raise InputError("--val-prompts must be positive")
    lm = load_model(model)
    folder, metrics, n = train_from_sharegpt(lm, spec, source, val_prompts=val_prompts, folder=out,
                                             init_from=init_from, fresh_data=fresh_data, log=click.echo)
    data_s = metrics["data_seconds"]
    click.echo(f"draft head saved: {folder} ({n} prompts, {metrics['fit_tokens']} answer tokens; "
               f"data {data_s if data_s is not None else 'reused'} s, training {metrics['seconds']} s; held-out "
               f"top-1 {metrics['val_top1']:.2f}, mean accepted of 4: {metrics['val_mean_accepted_of_4']})")


@cli.group(cls=Group)
def data():
    """List and export the datasets read from installed packages."""


@data.command("list")
def data_list():
    """Each dataset with its kind, size, package and licence."""
    from .data import dataset_table

    for row in dataset_table():
        rows = row["rows"] if row["rows"] is not None else f"missing ({row.get('error')})"
        click.echo(f"{row['name']:<14} {row['kind']:<8} {rows!s:>6}  {row['package'] or '-':<32} {row['licence']}")


@data.command("export")
@click.argument("names", nargs=-1, required=True)
@click.option("--split", type=click.Choice(SPLITS), default="all",
              show_default=True, help="test: never trained on by probes; edgy-eval: the held-out edgy half; "
                                      "alarming-test: the alarming set's test part")
@click.option("--limit", type=int, default=None, help="rows per dataset")
def data_export(names, split, limit):
    """Print prompts of NAMES as JSONL ({"id", "prompt", "harmful", "source"}) for batch mode."""
    from .data import load_dataset
    from .data.split import in_split

    if limit is not None and limit < 1:
        raise InputError("--limit must be positive")
    for name in names:
        rows = [e for e in load_dataset(name) if in_split(e.prompt, split)]
        for e in rows[:limit]:
            click.echo(json.dumps({"id": e.id, "prompt": e.prompt, "harmful": e.harmful, "source": e.source},
                                  ensure_ascii=False))


@cli.command()
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="default: $ROOTDEFENSE_HOME/demo")
@click.option("--rule", type=click.Choice(["paper", "threshold", "weighted"]), default=None,
              help="show RDS with this token rule instead of the model's tuned default defense")
def demo(max_new_tokens, out, rule):
    """5 AdvBench + 5 benign prompts, undefended vs the default defense, with a trace page."""
    from .demo import run_demo

    run_demo(max_new_tokens=max_new_tokens, out=out, rule=rule)


def _csv(value):
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@cli.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (flags below override its keys)")
@click.option("--model", default=None, help="embedded name, hub id or local folder [default: smollm2-135m]")
@click.option("--datasets", default=None, help="comma-separated, e.g. advbench,mtbench,edgy")
@click.option("--attacks", default=None, help="comma-separated, e.g. none,prefill,dan")
@click.option("--benign-attacks", default=None,
              help="template attacks for the benign datasets, e.g. none,roleplay,fiction [default: none]")
@click.option("--defenses", default=None, help="comma-separated, e.g. none,rds,safedecoding")
@click.option("--judges", default=None, help="comma-separated [default: refusal,harm]")
@click.option("--limit", type=int, default=None, help="prompts per dataset [default: 30]")
@click.option("--optimised-limit", type=int, default=None, help="prompts per harmful dataset for gcg/adaptive [10]")
@click.option("--samples", type=int, default=None, help="answers per prompt (needs --temperature > 0)")
@click.option("--max-new-tokens", type=int, default=None, help="[default: 64]")
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=int, default=None, help="torch threads per worker")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="results folder")
@click.option("--resume", is_flag=True, help="continue the results in --out (same config only)")
@click.option("--overwrite", is_flag=True, help="discard the results in --out and start again")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="shard over Ray actors: --ray (a local instance) or --ray ADDRESS (a cluster)")
@click.option("--workers", type=int, default=None, help="Ray actors (default: CPUs / threads)")
@click.option("--print-config", is_flag=True, help="print the merged config as YAML and exit")
def eval_cmd(config_path, out_dir, resume, overwrite, ray_address, workers, print_config, **flags):
    """Attacks x defenses x datasets, judged; writes results.jsonl, summary.json, report.html."""
    from .evaluation import EvalConfig, run_eval

    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    for key in ("datasets", "attacks", "benign_attacks", "defenses", "judges"):
        flags[key] = _csv(flags[key])
    cfg = EvalConfig.from_yaml(config_path) if config_path else EvalConfig.from_dict({})
    cfg = cfg.override(**flags)
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    summary = run_eval(cfg, out_dir, resume=resume, overwrite=overwrite, ray_address=ray_address, workers=workers)
    _print_summary(summary)


@cli.command("report")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="where summary.json and report.html go (default: beside RESULTS)")
def report_cmd(results, out_dir):
    """Rebuild summary.json and report.html from a results.jsonl alone."""
    from .evaluation import write_outputs

    _print_summary(write_outputs(results, out_dir))


def _print_summary(summary: dict) -> None:
    from .evaluation.table import summary_table

    click.echo(summary_table(summary))
    click.echo(f"summary: {summary['files']['summary']}")
    click.echo(f"report:  {summary['files']['report']}")


@cli.group(cls=Group)
def judge():
    """The evaluation's judges: train and check the offline harm judge."""


@judge.command("train")
@click.option("--force", is_flag=True, help="retrain even if a judge is cached")
@click.option("--learn-readings/--no-learn-readings", default=True, show_default=True,
              help="also learn from the checkout's blind readings (agreement with readers then out of fold)")
@click.option("--read-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="a read answer's weight in the fit  [default: 1]")
def judge_train(force, learn_readings, read_weight):
    """Fit the MiniLM harm judge on human-labelled data from installed packages and the
    evaluation runs' blind readings (the options apply when it trains: with --force, or when
    no judge is cached)."""
    from .evaluation.judging import HarmModel, ensure_harm_judge, train_harm_judge

    options = {"learn_readings": learn_readings, **({"read_weight": read_weight} if read_weight else {})}
    metrics = train_harm_judge(**options) if force else None
    folder = ensure_harm_judge(**options)
    if metrics is None:
        metrics = HarmModel.load(folder).meta.get("metrics", {})
    click.echo(json.dumps({"saved": str(folder), "metrics": metrics}, indent=2))


@judge.command("apply")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--judges", "names", default="harm", show_default=True, help="comma-separated judges to (re)run")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="the re-judged results file (its folder gets summary.json and report.html)")
def judge_apply(results, names, out_path):
    """Judge a finished run's answers again (new or retrained judges); nothing is regenerated."""
    from .evaluation import write_outputs
    from .evaluation.rejudge import rejudge

    path = rejudge(results, _csv(names) or [], out_path)
    _print_summary(write_outputs(path))


@cli.command()
@model_options
@defense_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (loopback by default)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key-env", default=None, metavar="VAR",
              help="require the API key held in this environment variable (Authorization: Bearer KEY)")
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="requests decoded together")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="requests waiting for a batch slot; beyond it: 429")
@click.option("--max-body", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="largest request body in bytes; beyond it: 413")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="seconds a request may take; then its answer ends (finish_reason length)")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(1), default=256, show_default=True,
              help="new tokens for a request that names none")
@click.option("--allow-undefended", is_flag=True,
              help="let requests turn the defense off or weaken it (rootdefense: {defense: none})")
@click.option("--log-prompts", is_flag=True, help="log prompts and answers (off: ids, sizes and timings only)")
@click.option("--ray", "use_ray", is_flag=True, help="deploy on Ray Serve (a local instance unless RAY_ADDRESS)")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="--ray: model replicas")
def serve(host, port, api_key_env, max_batch, max_queue, max_body, request_timeout, default_max_tokens,
          allow_undefended, log_prompts, use_ray, replicas, **o):
    """Serve the defended model over the OpenAI API (chat, completions, streams), with
    /health, /metrics and a playground page at /."""
    from .serving import ServeOptions
    from .serving.access import api_key_from_env
    from .serving.run import serve as run_server

    if replicas > 1 and not use_ray:
        raise click.UsageError("--replicas needs --ray (one process serves one model worker)")
    options = ServeOptions(api_key=api_key_from_env(api_key_env), max_batch=max_batch, max_queue=max_queue,
                           max_body=max_body, request_timeout=request_timeout, allow_undefended=allow_undefended,
                           log_prompts=log_prompts, default_max_tokens=default_max_tokens)
    if use_ray:
        from .serving.ray_serve import serve_on_ray

        serve_on_ray(o, options, host, port, replicas)
        return
    run_server(lambda: _defender(o), options, host, port)


@cli.command()
@click.option("--url", required=True, help="the server's base URL; loopback only (127.0.0.1, localhost, ::1)")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=300, show_default=True,
              help="requests sent at EACH concurrency level (the same held-out prompts each time)")
@click.option("--concurrency", default="1,4,16", show_default=True,
              help="comma-separated levels, run one after another: requests in flight at once")
@click.option("--max-tokens", type=click.IntRange(1), default=48, show_default=True, help="new tokens per answer")
@click.option("--api-key-env", default=None, metavar="VAR", help="send the API key held in this environment variable")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="results/serve/loadtest.json",
              show_default=True, help="the report (one JSON object); per-request lines go beside it (.jsonl)")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=400.0, show_default=True,
              help="seconds per level: then no new request is sent, those in flight are dropped, and the report "
                   "says the limit was hit")
@click.option("--seed", type=int, default=0, show_default=True, help="shuffles the held-out prompts")
def loadtest(url, n_requests, concurrency, max_tokens, api_key_env, out_path, time_limit, seed):
    """Load test a running `rootdefense serve` on this machine: streamed chat completions over
    held-out benign and harmful prompts (half each, interleaved), one concurrency level after
    another, with --requests requests per level. Reports throughput, time to first token,
    latency, errors by status and server memory, and checks the serving targets."""
    from .serving.loadtest import LoadTestConfig, main as run_loadtest

    try:
        levels = [int(c) for c in _csv(concurrency)]
    except ValueError:
        raise click.BadParameter(f"{concurrency!r}: comma-separated integers, e.g. 1,4,16",
                                 param_hint="--concurrency") from None
    run_loadtest(LoadTestConfig(url=url, requests=n_requests, concurrency=levels, max_tokens=max_tokens,
                                api_key_env=api_key_env, out=out_path, time_limit=time_limit, seed=seed))

def main():
    cli(prog_name="rootdefense")


if __name__ == "__main__":
    main()
