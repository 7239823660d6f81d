"""What `rootdefense prepare` installs in the home, and the policy it follows.

The converted embedded model, the model's default probes (``response``, ``paper`` and
``query``, the tuned defaults' gate) and its safety expert. (The evaluation's harm judge is
trained when an evaluation first needs it, or by `rootdefense judge train`.) A probe or
expert the package ships (the one its tuned defaults were measured with) is copied in; a
probe it does not ship is trained here. What an earlier release installed is replaced by
this release's; what was trained here is kept (``reinstall`` replaces it with the shipped
one too, where the package has one).
"""

from __future__ import annotations

from . import defaults, paths
from .errors import InputError

PROBE_KINDS = ("response", "paper", "query")


def prepare(model: str = "smollm2-135m", probes: bool = True, train_probes: bool = False, reinstall: bool = False,
            log=print):
    """Install what ``model``'s defenses read (see the module); returns the loaded model.
    ``probes``: also the probes and the expert; ``train_probes``: train the
    missing probes here even where the package ships them."""
    from .models import load_model

    if reinstall and train_probes:
        raise InputError("--reinstall installs the shipped probes and --train-probes trains new ones: choose one")
    lm = load_model(model)
    log(f"model ready: {lm.model_id} ({lm.num_layers} layers, hidden {lm.hidden_size})")
    if not probes:
        return lm
    for kind in PROBE_KINDS:
        install_probe(lm, kind, train=train_probes, reinstall=reinstall, log=log)
    if reinstall:
        tuned = defaults.load_defaults(lm.model_id)
        if tuned and not tuned["probe_matches"]:
            log(f"note: {tuned['source']} was tuned for other probes; delete it to use the shipped defaults")
    install_expert(lm, reinstall=reinstall, log=log)
    return lm


def install_probe(lm, kind: str, train: bool = False, reinstall: bool = False, log=print):
    """The model's probe of ``kind`` in the home: kept when there, unless an earlier release
    shipped it (or ``reinstall``); else the shipped one, else (or with ``train``) trained here."""
    from .probes import train as probe_training

    folder = paths.probe_dir(lm.model_id, kind)
    update = not train and defaults.superseded(lm.model_id, kind, folder)
    if (folder / "probe.json").exists() and not update \
            and not (reinstall and defaults.shipped_probe_dir(lm.model_id, kind)):
        log(f"probe ready: {folder}")
        return folder
    if not train and defaults.install_shipped_probe(lm.model_id, kind, folder, lm.hidden_size, lm.num_layers):
        log(f"probe {'updated' if update else 'ready'}: {folder} (shipped with rootdefense: the probe its tuned "
            "defaults were measured with" + ("; it replaces an earlier release's)" if update else ")"))
        return folder
    log(f"training the '{kind}' probe (once) ...")
    probe, metrics = probe_training.train_probe(lm, probe_training.TrainSpec(kind=kind), log=log)
    probe.save(folder)
    log(f"probe saved: {folder} (layer {probe.layer}, held-out AUROC {metrics['test_auroc']:.3f})")
    return folder


def install_expert(lm, reinstall: bool = False, log=print):
    """The model's safety expert in the home: kept when there, unless an earlier release
    shipped it (or ``reinstall``); else the shipped one, where the package has one (an
    expert is never trained here by `prepare`: `rootdefense expert train` does that)."""
    folder = paths.expert_dir(lm.model_id)
    update = defaults.superseded(lm.model_id, "expert", folder)
    if (folder / "adapter_config.json").exists() and not update \
            and not (reinstall and defaults.shipped_expert_dir(lm.model_id)):
        log(f"expert ready: {folder}")
    elif defaults.install_shipped_expert(lm.model_id, folder, lm.hidden_size):
        log(f"expert {'updated' if update else 'ready'}: {folder} (shipped with rootdefense: the adapter its "
            "correction results were measured with" + ("; it replaces an earlier release's)" if update else ")"))
    return folder
