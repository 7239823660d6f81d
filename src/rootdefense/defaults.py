"""Per-model defense defaults, saved with the probe they were tuned for.

`rootdefense tune` measures a model's undefended answers and writes ``defaults.json`` next
to its response probe; :func:`load_defaults` reads it back so that users get the tuned
behaviour without flags. For the embedded model a measured file ships with the package
(``tuned/<slug>.json``), used until the user tunes their own.

The file holds the chosen defense and its settings, plus everything that justified them
(the sweep, the rates, the prompts' counts, the command) and the sha256 of the probe's
weights, so a probe retrained since is noticed.

Named presets sit beside the tuned defaults: ``paper`` is the paper-faithful setting (the
paper's rule, least harmful of the top-10 by probability, on the paper's probe), and
``tuned`` (the default) is whatever the model's defaults file says.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from . import paths
from .errors import InputError

FILE = paths.DEFAULTS_FILE
FORMAT_VERSION = 1
PRESETS = ("tuned", "paper")
# the paper-faithful setting: RDS with the paper's Eq. 9 (read as intended) on the paper's probe
PAPER_PRESET = {"defense": "rds", "rule": "paper", "k": 10}
# used when a model has no tuned defaults: the token rule on the calibrated probe threshold
FALLBACK = {"defense": "rds", "rule": "threshold"}


# a probe folder's files, as rootdefense.probes.base names them (not imported from there:
# that would load torch with this module); the metadata comes last and marks a probe present
PROBE_FILES = ("probe.safetensors", "probe.json")


def weights_sha256(folder: str | Path, name: str = PROBE_FILES[0]) -> str | None:
    """The sha256 of a folder's weights file, a probe's by default (None when it has none)."""
    f = Path(folder) / name
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None


def save_defaults(folder: str | Path, defaults: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, **defaults}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"defaults file {path} cannot be read: {exc}; rerun `rootdefense tune` or delete it") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION or "defense" not in data:
        raise InputError(f"defaults file {path} is not a rootdefense defaults file (format {FORMAT_VERSION})")
    return data


def shipped_defaults(model_id: str) -> dict | None:
    """The measured defaults shipped with the package for an embedded model, or None."""
    res = resources.files("rootdefense") / "tuned" / f"{paths.model_slug(model_id)}.json"
    if not res.is_file():
        return None
    data = json.loads(res.read_text(encoding="utf-8"))
    return {**data, "source": f"shipped with rootdefense (tuned/{paths.model_slug(model_id)}.json)"}


SHIPPED_KINDS = ("response", "query", "paper")


def shipped_probe_dir(model_id: str, kind: str) -> Path | None:
    """The probe of ``kind`` shipped with the package for an embedded model (the one its
    shipped defaults were measured with), or None. Probe training is not bit-reproducible
    across machines, so a fresh install copies these instead of training its own."""
    res = resources.files("rootdefense") / "tuned" / paths.model_slug(model_id) / kind
    if not all((res / name).is_file() for name in PROBE_FILES):
        return None
    return Path(str(res))


def install_shipped_probe(model_id: str, kind: str, dest: str | Path, hidden_size: int, num_layers: int) -> Path | None:
    """Copy the shipped probe of ``kind`` into ``dest`` after checking that it was made for
    this model; None when the package ships none."""
    from .probes.base import LinearProbe

    src = shipped_probe_dir(model_id, kind)
    if src is None:
        return None
    LinearProbe.load(src).check_model(model_id, hidden_size, num_layers)
    return _copy_files(src, Path(dest), PROBE_FILES)


EXPERT_FILES = ("adapter_model.safetensors", "expert.json", "adapter_config.json")  # the config marks it present


def shipped_expert_dir(model_id: str) -> Path | None:
    """The safety-expert adapter shipped with the package for an embedded model (the one its
    correction results were measured with), or None."""
    res = resources.files("rootdefense") / "tuned" / paths.model_slug(model_id) / "expert"
    if not all((res / name).is_file() for name in EXPERT_FILES):
        return None
    return Path(str(res))


def install_shipped_expert(model_id: str, dest: str | Path, hidden_size: int) -> Path | None:
    """Copy the shipped expert adapter into ``dest`` after checking that it was made for this
    model; None when the package ships none."""
    from .errors import ExpertError
    from .expert.adapter import read_meta

    src = shipped_expert_dir(model_id)
    if src is None:
        return None
    meta = read_meta(src)
    if meta["model_id"] != model_id or meta["hidden_size"] != hidden_size:
        raise ExpertError(f"the shipped expert in {src} was made for {meta['model_id']} (hidden size "
                          f"{meta['hidden_size']}), not {model_id} (hidden size {hidden_size})")
    return _copy_files(src, Path(dest), EXPERT_FILES)


# sha256 of the weights that earlier releases shipped, per part ("response", "query", "paper",
# "expert"): `prepare` replaces those with this release's, and keeps weights trained here
HISTORY = "history.json"


def _weights_name(part: str) -> str:
    return EXPERT_FILES[0] if part == "expert" else PROBE_FILES[0]


def earlier_shipped(model_id: str) -> dict[str, list[str]]:
    """The weights' sha256 that earlier releases shipped for an embedded model, by part."""
    res = resources.files("rootdefense") / "tuned" / paths.model_slug(model_id) / HISTORY
    return json.loads(res.read_text(encoding="utf-8")) if res.is_file() else {}


def superseded(model_id: str, part: str, folder: str | Path) -> bool:
    """True when ``folder`` holds what an earlier release shipped for ``part`` (a probe kind or
    "expert"), this release ships other weights, and no defaults tuned in this home were
    measured with it: `prepare` then installs this release's, which its shipped defaults were
    measured with. Weights trained here are never superseded."""
    current = weights_sha256(folder, _weights_name(part))
    if current is None or current not in earlier_shipped(model_id).get(part, []):
        return False
    own = paths.defaults_file(model_id)
    if own.exists():  # the user tuned on it: replacing it would void their defaults
        try:
            tuned = _read(own)
        except InputError:
            return False  # unreadable: keep what is there rather than guess
        if current in (tuned.get("probe_sha256"), tuned.get("query_probe_sha256")):
            return False
    return True


def _copy_files(src: Path, dest: Path, names) -> Path:
    """Copy ``names`` from ``src`` into ``dest``, each through a temporary file, renamed in
    order once all are written (the last name marks the folder as complete)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dest / (name + ".tmp"))
    for name in names:
        (dest / (name + ".tmp")).replace(dest / name)
    return dest


def ship_tuned(model_id: str, package_dir: str | Path) -> list[Path]:
    """Copy a model's tuned defaults, the probes they were measured with and its expert
    adapter (when trained) from the rootdefense home into ``package_dir``
    (``src/rootdefense/tuned``): what a release ships so that a fresh install decodes exactly
    as measured. Refused when the defaults do not match the probes in the home."""
    folder = paths.probe_dir(model_id)
    path = paths.defaults_file(model_id)
    if not path.exists():
        raise InputError(f"no tuned defaults at {path}; run `rootdefense tune --model {model_id}` first")
    data = _read(path)
    if data.get("probe_sha256") != weights_sha256(folder) or (
            data.get("query_probe_sha256") and data["query_probe_sha256"] != weights_sha256(paths.probe_dir(model_id, "query"))):
        raise InputError(f"{path} was tuned for other probes than those in {folder.parent}; rerun `rootdefense tune`")
    out = Path(package_dir)
    _record_superseded(model_id, out)
    written = []
    for kind in SHIPPED_KINDS:
        src = paths.probe_dir(model_id, kind)
        if not (src / PROBE_FILES[-1]).exists():
            continue
        written.append(_copy_files(src, out / paths.model_slug(model_id) / kind, PROBE_FILES))
    src = paths.expert_dir(model_id)
    if all((src / name).exists() for name in EXPERT_FILES):
        dest = _copy_files(src, out / paths.model_slug(model_id) / "expert", EXPERT_FILES[:2])
        config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = model_id  # not this machine's path (the loader passes the model)
        (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        written.append(dest)
    target = out / f"{paths.model_slug(model_id)}.json"
    target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return [*written, target]


def _record_superseded(model_id: str, package_dir: Path) -> None:
    """Before ``ship_tuned`` replaces the package's weights, add those it replaces to the
    package's history, so that `prepare` on a home installed from them updates it."""
    pkg = package_dir / paths.model_slug(model_id)
    path = pkg / HISTORY
    history = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for part in (*SHIPPED_KINDS, "expert"):
        name = _weights_name(part)
        old = weights_sha256(pkg / part, name)
        new = weights_sha256(paths.expert_dir(model_id) if part == "expert" else paths.probe_dir(model_id, part), name)
        if old is not None and new is not None and old != new and old not in history.get(part, []):
            history.setdefault(part, []).append(old)
    if history:
        pkg.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")


def fallback_notes(model_id: str, correction: dict) -> list[str]:
    """What rds-expert runs without, of the model's tuned defaults, because this home has not
    trained it: one line per part (the safety expert, the query probe of the gate), with the
    command that trains it. ``correction``: the correction settings in use (a defender's
    ``settings.correction``); empty when they are the tuned ones or not tuned at all."""
    tuned = load_defaults(model_id)
    if not correction or not tuned or tuned.get("defense") != "rds-expert":
        return []
    want, notes = tuned.get("settings", {}), []
    if want.get("use_expert", True) and correction.get("use_expert", True) is False:
        notes.append("expert not trained: steering among the base model's candidates (train it with "
                     f"`rootdefense expert train --model {model_id}`)")
    if want.get("gate") is not None and correction.get("gate") is None:
        notes.append("query probe not trained: one monitor for every request, no gate (train it with "
                     f"`rootdefense probe train --model {model_id} --kind query`)")
    return notes


def load_defaults(model_id: str) -> dict | None:
    """The model's tuned defaults: the file beside its response probe, else the shipped one,
    else None. Adds ``source`` and ``probe_matches`` (False when the response probe, or the
    query probe of a gate, was retrained since tuning)."""
    folder = paths.probe_dir(model_id)
    path = paths.defaults_file(model_id)
    data = {**_read(path), "source": str(path)} if path.exists() else shipped_defaults(model_id)
    if data is None:
        return None
    current = weights_sha256(folder)
    data["probe_matches"] = current is None or data.get("probe_sha256") in (None, current)
    if data.get("query_probe_sha256"):  # tuned with a gate: the query probe counts too
        query = weights_sha256(paths.probe_dir(model_id, "query"))
        data["probe_matches"] = data["probe_matches"] and query in (None, data["query_probe_sha256"])
    return data
