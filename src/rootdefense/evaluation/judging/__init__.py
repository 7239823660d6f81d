"""Judges of (request, answer) pairs; see :mod:`rootdefense.evaluation.judges` for the registry.

Modules: :mod:`.refusal` (phrase matching), :mod:`.harm` (MiniLM + logistic regression, the
primary attack-success judge), :mod:`.harm_data` (its labelled data), :mod:`.embedding`
(MiniLM sentence embeddings), :mod:`.llm` (LLM-as-judge with a rubric). Importing this
package is cheap: torch, transformers and scikit-learn load on first use.
"""
