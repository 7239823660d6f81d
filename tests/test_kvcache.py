"""The append-in-place cache: same numbers as transformers' DynamicCache, without copying the
cache on every append."""

import pytest
import torch
from transformers import DynamicCache

from rootdefense.decoding.candidates import forward_candidates, keep_candidate
from rootdefense.decoding.kvcache import AppendLayer, new_cache
from rootdefense.decoding.verify import crop_to, forward_chain


def _ids(n, seed=0, batch=1):
    return torch.randint(3, 200, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_every_layer_appends_in_place(tiny_model):
    cache = new_cache(tiny_model)
    assert cache.layers and all(isinstance(layer, AppendLayer) for layer in cache.layers)
    tiny_model(input_ids=_ids(10), cache=cache, use_cache=True)
    layer = cache.layers[0]
    ptr = layer.keys.data_ptr()
    tiny_model(input_ids=_ids(3, 1), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 13
    assert layer.keys.data_ptr() == ptr  # the append wrote into the same buffer: nothing was copied
    crop_to(cache, 11)
    assert cache.get_seq_length() == 11 and layer.keys.data_ptr() == ptr  # a crop moves the fill mark only


@torch.no_grad()
def test_same_logits_as_dynamic_cache_through_chains_crops_and_candidates(tiny_model):
    prompt = _ids(12)
    caches = [DynamicCache(config=tiny_model.config), new_cache(tiny_model)]
    outs = [[] for _ in caches]
    for i, cache in enumerate(caches):
        outs[i].append(tiny_model(input_ids=prompt, cache=cache, use_cache=True).logits)
        n = 12
        for round_ in range(60):  # long enough to outgrow the first buffer more than once
            chain = _ids(4, 10 + round_)[0]
            out = forward_chain(tiny_model, cache, chain, n, layer=1)
            outs[i].append(out.logits)
            outs[i].append(out.hidden)
            n += 2
            crop_to(cache, n)  # keep two of the four
            if round_ % 5 == 0:  # an exact step: three candidates, keep the second
                step = forward_candidates(tiny_model, cache, _ids(3, 100 + round_)[0], n, layer=1)
                keep_candidate(cache, n, 3, 1)
                outs[i].append(step.logits)
                n += 1
        assert cache.get_seq_length() == n
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_batch_rows_can_be_dropped(tiny_model):
    prompts = _ids(8, 3, batch=3)
    caches = [DynamicCache(config=tiny_model.config), new_cache(tiny_model)]
    logits = []
    for cache in caches:
        tiny_model(input_ids=prompts, cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([0, 2]))  # a row finished
        for layer in cache.layers:  # as the batched decoders drop rows
            layer.keys, layer.values = layer.keys[[0, 1]], layer.values[[0, 1]]
        logits.append(tiny_model(input_ids=_ids(2, 4, batch=2), cache=cache, use_cache=True).logits)
        assert cache.get_seq_length() == 10
    assert torch.equal(*logits)


def test_reset_empties_the_layer(tiny_model):
    cache = new_cache(tiny_model)
    with torch.no_grad():
        tiny_model(input_ids=_ids(5), cache=cache, use_cache=True)
    cache.reset()
    assert cache.get_seq_length() == 0


def test_appending_another_batch_size_is_refused(tiny_model):
    cache = new_cache(tiny_model)
    with torch.no_grad():
        tiny_model(input_ids=_ids(5, batch=2), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="cannot append keys"):
            tiny_model(input_ids=_ids(2, batch=3), cache=cache, use_cache=True)
