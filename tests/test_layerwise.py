"""The layer-by-layer runner: per-layer statistics equal those of one forward pass of the whole
model for every family the tests build (per-layer attention masks and rotary embeddings
included), spilled hidden states give the same numbers, and an edit of layer l changes exactly
what the later layers read."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS, tiny_config

from realign.archs import arch_from_config
from realign.layerwise import Layerwise
from realign.stats import Encoded, collect


def examples() -> list[Encoded]:
    # lengths beyond gemma2's sliding window (16): its sliding and full layers see different masks
    g = torch.Generator().manual_seed(0)
    return [Encoded(torch.randint(3, 90, (n,), generator=g).tolist(), p)
            for n, p in [(22, 6), (30, 10), (18, 4), (25, 12), (9, 3)]]


def tiny(family: str, layers: int = 3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(family, layers=layers)
    return AutoModelForCausalLM.from_config(cfg).eval(), arch_from_config(cfg.to_dict())


def layer_stats(run: Layerwise, arch, edit=None) -> list:
    out = []
    for layer in run:
        names = [arch.module_name(layer.index, r) for r in arch.roles]
        out.append(layer.collect(gram=names, out_gram=names[-1:], sqnorm=names))
        if edit is not None:
            edit(layer)
    return out


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_layer_by_layer_statistics_equal_one_forward_pass(family):
    model, arch = tiny(family)
    enc = examples()
    names = [arch.module_name(i, r) for i in range(arch.num_layers) for r in arch.roles]
    downs = [arch.module_name(i, arch.roles[-1]) for i in range(arch.num_layers)]
    want = collect(model, arch, enc, gram=names, out_gram=downs, sqnorm=names, batch_size=2)
    with Layerwise(model, arch, enc, batch_size=2, edits=False) as run:
        got = layer_stats(run, arch)
    for stats in got:
        for kind in ("gram", "out_gram", "sqnorm"):
            for name, value in getattr(stats, kind).items():
                assert torch.allclose(value, getattr(want, kind)[name], rtol=1e-5, atol=1e-6), (kind, name)
    assert sum(len(s.gram) for s in got) == len(names)
    assert all(s.tokens == want.tokens for s in got)


def test_spilled_hidden_states_give_the_same_numbers_and_are_removed():
    model, arch = tiny("llama")
    enc = examples()
    with Layerwise(model, arch, enc, batch_size=2, edits=False) as run:
        kept = layer_stats(run, arch)
        assert run.spilled == 0
    one_batch = 2 * 30 * arch.hidden_size * 4  # the first batch (2 × 30 tokens, float32) fits, no other does
    for budget, spilled in ((0, 3), (one_batch, 2)):
        with Layerwise(model, arch, enc, batch_size=2, edits=False, max_bytes=budget) as run:
            got = layer_stats(run, arch)
            assert run.spilled == spilled
            folder = run.store._dir
            assert folder is not None and len(list(folder.iterdir())) == spilled  # replaced files are deleted
        assert not folder.exists()
        for a, b in zip(kept, got, strict=True):
            assert all(torch.equal(a.gram[n], b.gram[n]) for n in a.gram)


def test_an_edit_of_layer_l_is_what_later_layers_read():
    model, arch = tiny("qwen3")
    enc = examples()
    o0 = arch.module_name(0, "o")

    def halve_o0(layer):
        if layer.index == 0:
            with torch.no_grad():
                model.get_submodule(o0).weight.mul_(0.5)

    saved = model.get_submodule(o0).weight.detach().clone()
    before = collect(model, arch, enc, gram=[o0, arch.module_name(0, "down")], batch_size=2)
    with Layerwise(model, arch, enc, batch_size=2, edits=True) as run:
        got = layer_stats(run, arch, edit=halve_o0)
    # layer 0 was read before its edit; layers 1 and 2 read the edited model
    after = collect(model, arch, enc, gram=[arch.module_name(i, r) for i in (1, 2) for r in arch.roles],
                    batch_size=2)
    assert torch.allclose(got[0].gram[arch.module_name(0, "down")], before.gram[arch.module_name(0, "down")],
                          rtol=1e-5, atol=1e-6)
    for stats in got[1:]:
        for name, value in stats.gram.items():
            assert torch.allclose(value, after.gram[name], rtol=1e-5, atol=1e-6), name
    q1 = arch.module_name(1, "q")
    with torch.no_grad():
        model.get_submodule(o0).weight.copy_(saved)
    unedited = collect(model, arch, enc, gram=[q1], batch_size=2)
    assert not torch.allclose(got[1].gram[q1], unedited.gram[q1], rtol=1e-3)  # the edit did reach layer 1


@pytest.mark.parametrize("d_in", [511, 512, 515])
def test_wide_gram_matrices_summed_by_blocks_equal_the_full_product(d_in):
    """From BLOCK_GRAM columns on, XᵀX is summed over its upper block triangle and mirrored."""
    from realign.stats import BLOCK_GRAM, Accumulator, Stats

    model = torch.nn.Sequential(torch.nn.Linear(d_in, 600, bias=False))
    stats, g = Stats(), torch.Generator().manual_seed(d_in)
    acc = Accumulator(model, stats, gram=["0"], out_gram=["0"])
    xs, outs = [], []
    for tokens in (7, 12, 5):
        x = torch.randn(1, tokens, d_in, generator=g)
        mask = torch.rand(1, tokens, generator=g) < 0.7
        acc.batch(mask)
        with torch.no_grad():
            outs.append(model(x)[mask])
        xs.append(x[mask])
    acc.finish()
    acc.remove()
    x, s = torch.cat(xs), torch.cat(outs)
    for got, want in ((stats.gram["0"], x.T @ x), (stats.out_gram["0"], s.T @ s)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        if got.shape[0] >= BLOCK_GRAM:
            assert torch.equal(got, got.T)  # mirrored exactly
