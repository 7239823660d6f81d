"""Refusal and safe-redirect answers written for rootdefense.

Every sentence in this module was written for this project (Apache-2.0); none is copied
from a dataset, a model output, or another project. They give a response-position probe
the "harmful request + refusal = harmless" side of a pair, so the pieces are deliberately
varied in length, tone and structure: a probe should learn *refusing*, not one phrasing.

:func:`refusal_for` combines pieces deterministically, seeded by a key (the example id),
so the same key always gets the same text on every machine and Python version.
"""

from __future__ import annotations

import hashlib
import random
import re

# Openings: the actual "no". Some are terse, some soften it.
OPENINGS: tuple[str, ...] = (
    "I can't help with that.",
    "I won't help with this one.",
    "Sorry, but I can't do that.",
    "I'm not able to help with that request.",
    "That's not something I can assist with.",
    "I have to decline this.",
    "No, I can't provide that.",
    "I'm going to pass on this request.",
    "I can't walk you through that.",
    "I'm not going to write that.",
    "This isn't something I'll help with.",
    "I'd rather not help with that, and I won't.",
    "I can't give instructions for that.",
    "Unfortunately, I can't support this request.",
    "I understand you're asking, but I can't help here.",
    "I'm sorry, I can't go along with that.",
)

# Reasons: one sentence on why, phrased without lecturing.
REASONS: tuple[str, ...] = (
    "It could put people in real danger.",
    "Doing this would likely hurt someone, and it's against the law in most places.",
    "Detailed steps like these can cause serious harm if they're acted on.",
    "Helping with this would mean helping someone get hurt or deceived.",
    "The risk of this being used against other people is too high.",
    "This kind of information is the sort that leads to injuries, losses or arrests.",
    "It targets people who haven't agreed to any of it.",
    "Even as a hypothetical, the specifics would be just as usable.",
    "I try not to produce content that's built to mislead or harm.",
    "Writing it would cross a line I keep no matter how the request is framed.",
    "The harm here wouldn't stay on the page.",
    "There's no safe version of these particular instructions.",
)

# Redirects keyed by a rough topic guess; each is a full sentence with a safer option.
_REDIRECTS: dict[str, tuple[str, ...]] = {
    "weapons": (
        "If you're worried about your safety, contacting local police or a community safety officer is a better first step.",
        "If you're interested in how these devices are regulated, I can explain the laws and licensing that apply.",
        "If someone is threatening violence, please report it to emergency services right away.",
    ),
    "cyber": (
        "If you want to protect your own accounts or systems, I'm glad to help you harden them.",
        "If you're studying security, legal practice labs and capture-the-flag events are a good place to learn.",
        "If you think you've been hacked, I can walk you through securing your accounts and reporting it.",
    ),
    "drugs": (
        "If you or someone close to you is struggling with substance use, a doctor or a local support service can help confidentially.",
        "If you're curious about the pharmacology, I can explain how these substances affect the body and why they're controlled.",
        "If there's a risk of overdose, call emergency services immediately.",
    ),
    "fraud": (
        "If you're worried about being scammed, I can explain the common warning signs and how to report fraud.",
        "If money is tight, I can suggest legitimate ways to find financial help or advice.",
        "If you've already been targeted, your bank and the consumer protection agency where you live are the people to contact.",
    ),
    "selfharm": (
        "If you're having thoughts of hurting yourself, please reach out to a crisis line or someone you trust right now; you don't have to handle this alone.",
        "If things feel overwhelming, talking to a doctor, counsellor or a local helpline can really help.",
    ),
    "hate": (
        "If you'd like, I can help you write something that makes your point without attacking a group of people.",
        "If you're trying to understand where these ideas come from, I can discuss the history and research around them.",
    ),
    "misinfo": (
        "If you want, I can summarise what reliable sources actually say on this topic.",
        "I can help you write a persuasive piece that sticks to verifiable facts instead.",
    ),
    "privacy": (
        "If you need to reach someone, official channels or a mutual contact are the right route.",
        "If you're concerned about your own privacy, I can show you how to reduce what's publicly known about you.",
    ),
    "general": (
        "If there's a legitimate goal behind the question, tell me more and I'll help with that part.",
        "I'm happy to help with a related topic that doesn't involve hurting anyone.",
        "If you're researching this for safety or prevention, I can point you toward general, non-operational information.",
        "If someone is in danger, please contact local emergency services.",
        "If you tell me what you're ultimately trying to achieve, I can suggest a lawful way to get there.",
    ),
}

_TOPIC_WORDS: tuple[tuple[str, str], ...] = (
    ("selfharm", r"suicid|self[- ]harm|kill (myself|yourself)|cut myself|starve myself|anorex|bulimi|overdose"),
    ("cyber", r"hack|malware|ransomware|virus|exploit|phishing|password|ddos|botnet|keylogger|sql injection|rootkit|crack"),
    ("drugs", r"drug|\bmeth\b|methamphetamine|cocaine|heroin|fentanyl|mdma|opioid|narcotic|\blsd\b|cannabis|marijuana"),
    ("weapons", r"bomb|explosive|weapon|firearm|\bguns?\b|rifle|ammo|ammunition|grenade|poison|nerve agent|bioweapon|chemical warfare|assassinat|murder|kill|attack|shoot|\bstab|terror"),
    ("fraud", r"fraud|scam|counterfeit|launder|steal|theft|shoplift|embezzl|tax evasion|insider trading|\bforg(e|ed|ery|ing)\b|identity theft"),
    ("hate", r"racis|sexis|\bhate|\bslurs?\b|inferior|discriminat|harass|bully|stereotyp"),
    ("misinfo", r"fake news|misinformation|disinformation|conspiracy|propaganda|hoax|false|persuasive article|election"),
    ("privacy", r"stalk|track someone|home address|spy on|surveil|dox|personal information|private"),
)

# Whole short answers: used alone on some keys, for the very terse end of the range.
SHORT_ANSWERS: tuple[str, ...] = (
    "No. I can't help with that.",
    "I can't assist with this request.",
    "Sorry, that's a request I have to turn down.",
    "I won't provide that, but I'm happy to help with something else.",
    "That's not something I'll do. Is there another way I can help?",
    "I need to stop here: I can't help with that.",
)

# Closings: optional last sentence.
CLOSINGS: tuple[str, ...] = (
    "Is there something else I can help you with?",
    "Let me know if a safer angle on this would be useful.",
    "I'm still glad to help with anything else you're working on.",
    "Happy to help if you'd like to take this in a different direction.",
)


def topic_of(prompt: str) -> str:
    """A rough guess at what a harmful prompt is about, to pick a fitting redirect."""
    low = prompt.lower()
    for topic, pattern in _TOPIC_WORDS:
        if re.search(pattern, low):
            return topic
    return "general"


def _rng(key: str) -> random.Random:
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return random.Random(seed)


def refusal_for(prompt: str, key: str) -> str:
    """A short, natural refusal or safe redirect for ``prompt``, fixed by ``key``.

    The style is drawn from the key: a bare short refusal, a refusal with a reason, a
    refusal with a topic-fitting redirect, or a refusal with a reason and a redirect,
    sometimes with a closing line.
    """
    rng = _rng(key)
    style = rng.random()
    if style < 0.12:
        return rng.choice(SHORT_ANSWERS)
    redirects = _REDIRECTS[topic_of(prompt)]
    if rng.random() < 0.3:  # widen the pool with the generic redirects
        redirects = redirects + _REDIRECTS["general"]
    parts = [rng.choice(OPENINGS)]
    if style < 0.40:
        parts.append(rng.choice(REASONS))
    elif style < 0.75:
        parts.append(rng.choice(redirects))
    else:
        parts.append(rng.choice(REASONS))
        parts.append(rng.choice(redirects))
    if rng.random() < 0.25:
        parts.append(rng.choice(CLOSINGS))
    return " ".join(parts)


def piece_count() -> int:
    """How many distinct written pieces the combinations draw from."""
    return (
        len(OPENINGS) + len(REASONS) + len(SHORT_ANSWERS) + len(CLOSINGS)
        + sum(len(v) for v in _REDIRECTS.values())
    )
