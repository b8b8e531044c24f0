"""NLSR: each formula against a direct dense computation, the transplant's exact footprint, the
selection modes, dense and LoRA-factor modes, and prepare-once/apply-many == repair, bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from realign import api
from realign.errors import RealignError
from realign.lora_factors import factor_cosine, factor_gradients
from realign.masks import (
    cosine,
    gather,
    lowrank_projection,
    masked_similarity,
    pack_mask,
    transplant,
    transplant_packed,
    unpack_mask,
)
from realign.methods.nlsr import region_mask, select_modules, wanda_score
from realign.sources import load_model
from realign.stats import collect, encode, example_gradient_sums, loss_gradients

ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tensors_of(directory: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob(pattern)):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """tiny_models plus a calibration file and, for LoRA-factor mode, an aligned adapter on the base
    and a fine-tune adapter that continued training it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("nlsr")
    rows = [{"prompt": f"w{i} w{i + 1} w{i + 2} w{(i * 7) % 90}", "kind": "harmful",
             "safe_response": f"w{(i * 3) % 90} w{(i * 5) % 90} w{i + 3} w4 w5"} for i in range(4, 40)]
    rows.append({"prompt": "w1 w2", "kind": "benign", "response": "w3"})
    cal = root / "cal.jsonl"
    cal.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ROLES, lora_dropout=0.0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(root / "aligned_adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    cont = PeftModel.from_pretrained(model, root / "aligned_adapter", is_trainable=True)
    with torch.no_grad():
        for name, p in cont.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    cont.save_pretrained(root / "ft_adapter")
    return {**tiny_models, "cal": cal, "aligned_adapter": root / "aligned_adapter",
            "ft_adapter": root / "ft_adapter", "tmp": root}


# ============================================================================ formulas
@pytest.mark.parametrize("d_out,d_in", [(6, 10), (12, 5), (8, 8)])
def test_lowrank_from_gram_equals_svd_of_activations(d_out, d_in):
    g = torch.Generator().manual_seed(d_out * 100 + d_in)
    x = torch.randn(40, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    r = math.floor(0.8 * min(d_out, d_in))
    # Direct: the top-r right singular vectors of S = X Wᵀ span the output directions kept.
    _, _, vh = torch.linalg.svd(x @ w.T, full_matrices=False)
    v = vh[:r].T
    expected = v @ v.T @ w
    from_gram = lowrank_projection(w, r, gram=x.T @ x)
    from_out_gram = lowrank_projection(w, r, out_gram=(x @ w.T).T @ (x @ w.T))
    assert torch.allclose(from_gram.double(), expected, atol=1e-5)
    assert torch.allclose(from_out_gram.double(), expected, atol=1e-5)
    assert not torch.allclose(expected, w, atol=1e-3)  # the projection really removes something


def test_wanda_score():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, generator=g)
    w = torch.randn(5, 7, generator=g)
    assert torch.allclose(wanda_score(w, (x * x).sum(0)), w.abs() * x.norm(dim=0).unsqueeze(0), atol=1e-6)


def test_region_size_is_the_official_count():
    """Spec: the region is the entries scored strictly above the ⌊n·sparsity⌋-th score (0-based,
    ascending) of their group: the matrix (lowrank) or each output row (wanda, snip)."""
    score = torch.tensor([[3.0, 9.0, 1.0, 7.0, 5.0], [0.0, 8.0, 6.0, 2.0, 4.0]])  # the scores 0..9
    # n = 10, ⌊10·0.8⌋ = 8: sorted[8] = 8, only 9 is above it (the top 20 % would be 2 entries)
    assert region_mask(score, 0.8).nonzero().tolist() == [[0, 1]]
    # ⌊10·0.5⌋ = 5: sorted[5] = 5, above it 6, 7, 8, 9
    assert sorted(score[region_mask(score, 0.5)].tolist()) == [6.0, 7.0, 8.0, 9.0]
    assert int(region_mask(score, 0.0).sum()) == 9  # sparsity 0 still leaves out the smallest
    # per row, n = 5: ⌊5·0.6⌋ = 3, rows sorted [1 3 5 7 9] and [0 2 4 6 8]: above 7 and above 6
    assert region_mask(score, 0.6, group="row").nonzero().tolist() == [[0, 1], [1, 1]]
    # ⌊5·0.2⌋ = 1: above 3 (row 0) and above 2 (row 1), three entries in each row
    assert score[region_mask(score, 0.2, group="row")].tolist() == [9.0, 7.0, 5.0, 8.0, 6.0, 4.0]
    # entries tied with the threshold score are all left out: sorted [0 1 2 2 2], ⌊5·0.4⌋ = 2
    assert not region_mask(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]), 0.4).any()
    # whole rows by summed score (25 and 20), counted the same way over the rows: ⌊2·0.4⌋ = 0
    rows = region_mask(score, 0.4, "row")
    assert rows[0].all() and not rows[1].any()
    # any shape, distinct scores: n − ⌊n·s⌋ − 1 per group
    g = torch.Generator().manual_seed(0)
    for d_out, d_in, sparsity in [(5, 7, 0.8), (16, 32, 0.8), (64, 32, 0.7), (3, 10, 0.29)]:
        sc = torch.rand(d_out, d_in, generator=g)
        n = d_out * d_in
        assert int(region_mask(sc, sparsity).sum()) == n - math.floor(n * sparsity) - 1
        per_row = region_mask(sc, sparsity, group="row").sum(1)
        assert per_row.eq(d_in - math.floor(d_in * sparsity) - 1).all()


@pytest.mark.parametrize("n", [1, 8, 13, 100])
def test_pack_unpack_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.6
    packed = pack_mask(mask.view(1, n))
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_mask(packed, (1, n)), mask.view(1, n))


def test_adaptive_selection_probabilities_and_seeded_draw():
    c = [0.9, 0.1, 0.5, 0.3, 0.7, -0.2]
    sel = select_modules(c, "adaptive", prune_rate=0.5, epsilon=0.2, seed=42, direction="paper")
    # paper: n_j = 1 for the least similar (c = -0.2), 0 for the most similar (0.9)
    order = sorted(range(6), key=lambda i: -c[i])
    expected = [0.0] * 6
    for pos, i in enumerate(order):
        expected[i] = 0.3 + 0.4 * pos / 5
    assert sel.probability == pytest.approx(expected, abs=1e-6)
    assert sel.rank == [6, 2, 4, 3, 5, 1]
    # the official code's ranking, written as it is there: highest probability to the MOST similar
    t = torch.tensor(c)
    idx = torch.argsort(t, descending=True)
    ranking = torch.zeros_like(t)
    ranking[idx] = torch.arange(t.numel() + 1, 1, step=-1, dtype=t.dtype)
    norm = (ranking - ranking.min()) / (ranking.max() - ranking.min())
    official_p = ((0.5 - 0.2) + norm * 0.4).clip(0, 1)
    off = select_modules(c, "adaptive", seed=42, direction="official")
    assert off.probability == pytest.approx(official_p.tolist(), abs=1e-6)
    # the seeded draw: reproducible, and the same as the official torch.manual_seed + torch.bernoulli
    torch.manual_seed(42)
    assert off.restored == [bool(x) for x in torch.bernoulli(official_p).tolist()]
    assert select_modules(c, "adaptive", seed=42).restored == sel.restored
    draws = {tuple(select_modules(c, "adaptive", seed=s).restored) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    # clipping
    assert select_modules(c, "adaptive", prune_rate=0.95, epsilon=0.2).probability[5] == 1.0


def test_threshold_and_fraction_select_documented_modules():
    c = [0.9, 0.1, 0.5, 0.3, 0.7, -0.2]
    assert select_modules(c, "threshold", tau=0.35).restored == [False, True, False, True, False, True]
    assert select_modules(c, "threshold", tau=-1).restored == [False] * 6
    assert select_modules(c, "fraction", k=2).restored == [False, True, False, False, False, True]
    # default k = round(prune_rate × modules): the 3 least similar
    assert select_modules(c, "fraction", prune_rate=0.5).restored == [False, True, False, True, False, True]
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_factor_cosine_equals_cosine_of_products():
    g = torch.Generator().manual_seed(5)
    a1, a2 = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    b1, b2 = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    assert factor_cosine(a1, b1, a2, b2) == pytest.approx(cosine(b1 @ a1, b2 @ a2), abs=1e-6)
    assert factor_cosine(a1, b1, a1, 2 * b1) == pytest.approx(1.0, abs=1e-6)
    assert factor_cosine(a1, torch.zeros(7, 3), a2, b2) == 0.0


def test_factor_gradients_match_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    w_b = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (w_b + 2.0 * b @ a).detach().requires_grad_(True)
    torch.sin(x @ w.T).sum().backward()
    torch.sin(x @ (w_b + 2.0 * b @ a).T).sum().backward()
    g_a, g_b = factor_gradients(w.grad, a.detach(), b.detach(), 2.0)
    assert torch.allclose(g_a.double(), a.grad, atol=1e-5) and torch.allclose(g_b.double(), b.grad, atol=1e-5)


def test_transplant_changes_only_masked_entries():
    w = torch.randn(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    new = transplant(w, mask, torch.tensor([5.0, 7.0]))
    assert new[1, 2] == 5.0 and new[3, 0] == 7.0
    assert torch.equal(new[~mask], w[~mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_chunked_similarity_and_transplant_equal_the_direct_computation(monkeypatch, dtype, with_base):
    import realign.masks as masks

    monkeypatch.setattr(masks, "_CHUNK", 64)  # many chunks, and a last one that is cut short
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 29, generator=g).to(dtype)
    mask = torch.rand(37, 29, generator=g) < 0.3
    ref = (gather(w, mask).float() + 0.1 * torch.randn(int(mask.sum()), generator=g)).to(dtype)
    ref[:3] = gather(w, mask)[:3]  # a few entries equal: not counted as changed
    base = (0.5 * gather(w, mask).float()).to(dtype) if with_base else None
    kept = [t.clone() for t in (w, ref)] + ([base.clone()] if base is not None else [])
    f = gather(w, mask)
    b = base.double() if base is not None else torch.zeros(f.shape, dtype=torch.float64)
    c, changed = masked_similarity(w, pack_mask(mask), ref, base)
    assert c == pytest.approx(cosine(f.double() - b, ref.double() - b), abs=1e-12)
    assert changed == int(torch.count_nonzero(ref != f)) <= int(mask.sum()) - 3
    new, n_changed = transplant_packed(w, pack_mask(mask), ref)
    assert torch.equal(new, transplant(w, mask, ref)) and n_changed == int(torch.count_nonzero(new != w)) == changed
    owned = w.clone()
    in_place, n_in_place = transplant_packed(owned, pack_mask(mask), ref, in_place=True)
    assert in_place.data_ptr() == owned.data_ptr() and torch.equal(in_place, new) and n_in_place == n_changed
    # Inputs untouched (the patch's value vectors are read by every apply).
    assert all(torch.equal(a, b) for a, b in zip(kept, [w, ref] + ([base] if base is not None else []), strict=True))


# ============================================================================ statistics
def _encoded(world, tokenizer):
    from realign.calibration import load_calibration
    from realign.tuning import split_heldout

    rows = split_heldout(load_calibration(world["cal"]))[0].with_safe_response()  # the rows prepare sees
    return encode(tokenizer, [(r.prompt, r.safe_response) for r in rows], "raw")


def test_projected_gram_and_loss_gradients(world):
    from realign.compute import load_model as run_model

    model, tok = run_model(world["aligned"], device="cpu")
    arch = load_model(world["aligned"]).arch
    enc = _encoded(world, tok)
    q = arch.module_name(0, "q")
    proj = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    down = arch.module_name(1, "down")
    stats = collect(model, arch, enc, capture=[q, down], project={q: proj}, out_gram=[down], batch_size=5)
    x = torch.cat(stats.capture[q])
    assert torch.allclose(stats.proj_gram[q], (x @ proj.T).T @ (x @ proj.T), rtol=1e-4, atol=1e-4)
    s = torch.cat(stats.capture[down]) @ model.get_submodule(down).weight.T  # SᵀS, read from the output
    assert torch.allclose(stats.out_gram[down], s.T @ s, rtol=1e-4, atol=1e-4)

    # ∂(mean NLL of response tokens)/∂W, accumulated over batches == one direct computation
    name = arch.weight_name(1, "down")
    grads = loss_gradients(model, enc, [name], batch_size=4)
    param = model.get_parameter(name)
    param.requires_grad_(True)
    total, loss = 0, 0.0
    for e in enc:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0]
        loss = loss + torch.nn.functional.cross_entropy(logits[e.prompt_len - 1:-1], ids[0, e.prompt_len:],
                                                        reduction="sum")
        total += e.response_len
    (loss / total).backward()
    assert torch.allclose(grads[name], param.grad, atol=1e-6)
    assert not param.grad.eq(0).all()
    param.requires_grad_(False)


# ============================================================================ dense mode
def _repair(world, out, ft="finetuned", **kw):
    params = kw.pop("params", {})
    return api.repair("nlsr", aligned=world[kw.pop("aligned", "aligned")], finetuned=world[ft], out=out,
                      base=kw.pop("base", world["base"]), calibration=world["cal"], template="raw",
                      params=params, device="cpu", **kw)


def test_dense_repair_transplants_exactly_the_region_of_selected_modules(world, tmp_path):
    patch = api.prepare("nlsr", aligned=world["aligned"], base=world["base"], calibration=world["cal"],
                        template="raw", device="cpu")
    res = api.apply(patch, world["finetuned"], tmp_path / "out", device="cpu")
    out = tensors_of(tmp_path / "out")
    ft, al, base = load_model(world["finetuned"]), load_model(world["aligned"]), load_model(world["base"])
    rows = {r["module"]: r for r in res.report["modules"]}
    assert len(rows) == 14
    restored = [m for m, r in rows.items() if r["restored"]]
    assert 0 < len(restored) < 14
    linear = {n for _, _, n in ft.arch.linear_weights()}
    for name in ft.tensor_names:
        if name not in linear:
            assert torch.equal(out[name], ft.get(name)), name  # nothing outside the linear weights moves
            continue
        module = name.removesuffix(".weight")
        mask = unpack_mask(patch.tensors[f"{name}.mask"], tuple(ft.shape(name)))
        w_f, w_a, w_b = ft.get(name), al.get(name), base.get(name)
        w_e = w_a + 0.9 * (w_a - w_b)
        assert torch.allclose(patch.tensors[f"{name}.ref"], w_e[mask], atol=1e-6)
        assert torch.equal(patch.tensors[f"{name}.base"], w_b[mask])
        # c_j against a direct dense computation
        c = torch.nn.functional.cosine_similarity(((w_f - w_b) * mask).flatten(), ((w_e - w_b) * mask).flatten(),
                                                  dim=0)
        assert rows[module]["c"] == pytest.approx(float(c), abs=1e-5)
        assert int(mask.sum()) == w_f.numel() - math.floor(w_f.numel() * 0.8) - 1  # the official count
        if module in restored:
            assert torch.equal(out[name][mask], patch.tensors[f"{name}.ref"])
            assert torch.equal(out[name][~mask], w_f[~mask])
            changed = int((out[name] != w_f).sum())
            assert rows[module]["entries_changed"] == changed == res.report["changed_per_tensor"][name]
            assert rows[module]["fraction_changed"] == pytest.approx(changed / w_f.numel(), abs=1e-6)
        else:
            assert torch.equal(out[name], w_f)
            assert rows[module]["fraction_changed"] == 0
    totals = res.report["totals"]
    assert totals["modules_restored"] == f"{len(restored)}/14"
    assert totals["seed"] == 42 and totals["direction"] == "paper" and totals["alpha"] == 0.9
    assert totals["sparsity"] == 0.8 and totals["parameters_changed"] > 0
    saved = json.loads((tmp_path / "out" / "realign.json").read_text())
    assert "modules" in json.dumps(saved)


def projected(x: torch.Tensor, w: torch.Tensor, ratio: float = 0.8) -> torch.Tensor:
    """The spec's W̃ = U_r U_rᵀ W: U_r the top-r right singular vectors of S = X Wᵀ (here by an SVD)."""
    r = math.floor(ratio * min(w.shape))
    _, _, vh = torch.linalg.svd(x.double() @ w.double().T, full_matrices=False)
    return vh[:r].T @ vh[:r] @ w.double()


def spec_inputs(model, arch, enc, layer: int, sequential: bool, new_weight) -> dict[str, torch.Tensor]:
    """The inputs of layer ``layer``'s modules as the spec reads them: from the reference model as
    it is (one-pass), or (sequential) after every earlier layer l got the weights
    ``new_weight(module, X)`` computed from ITS inputs X, taken before layer l itself changed."""
    def names(i):
        return [arch.module_name(i, r) for r in arch.roles]

    with torch.no_grad():
        for earlier in range(layer if sequential else 0):
            stats = collect(model, arch, enc, capture=names(earlier))
            for m in names(earlier):
                model.get_parameter(m + ".weight").copy_(new_weight(m, torch.cat(stats.capture[m])).float())
        stats = collect(model, arch, enc, capture=names(layer))
    return {m: torch.cat(stats.capture[m]).double() for m in names(layer)}


def _reference(world):
    """The dense reference model W_e = W_a + 0.9 (W_a − W_b), loaded to run."""
    from realign.compute import load_model as run_model

    al, base = load_model(world["aligned"]), load_model(world["base"])
    model, tok = run_model(world["aligned"], device="cpu")
    w_e = {}
    with torch.no_grad():
        for _, _, name in al.arch.linear_weights():
            w_a = al.get(name)
            w_e[name.removesuffix(".weight")] = w_a + 0.9 * (w_a - base.get(name))
            model.get_parameter(name).copy_(w_e[name.removesuffix(".weight")])
    return model, tok, al.arch, w_e


@pytest.mark.parametrize("activations", ["sequential", "one-pass"])
def test_lowrank_region_matches_direct_computation(world, activations):
    """Every mask of the patch equals the region of |U_r U_rᵀ W_e| computed here from each module's
    inputs: read from W_e itself (one-pass), or with layer 0 projected first (sequential, the
    official order); shared-input modules (q, k, v) and ones scored from SᵀS (down) included."""
    patch = api.prepare("nlsr", aligned=world["aligned"], base=world["base"], calibration=world["cal"],
                        template="raw", device="cpu", params={"activations": activations})
    assert patch.report["activations"] == activations
    model, tok, arch, w_e = _reference(world)
    enc = _encoded(world, tok)
    for layer in (0, 1):
        inputs = spec_inputs(model, arch, enc, layer, activations == "sequential",
                             lambda m, x: projected(x, w_e[m]))
        for module, x in inputs.items():
            expected = region_mask(projected(x, w_e[module]).abs(), 0.8)
            got = unpack_mask(patch.tensors[f"{module}.weight.mask"], tuple(w_e[module].shape))
            assert torch.equal(got, expected), module


def test_sequential_and_one_pass_differ_exactly_where_the_projection_changes_the_inputs(world):
    common = dict(aligned=world["aligned"], base=world["base"], calibration=world["cal"], template="raw",
                  device="cpu")
    masks = {}
    for act in ("sequential", "one-pass"):
        for ratio in (0.8, 1.0):
            masks[act, ratio] = api.prepare("nlsr", **common, params={"activations": act, "rank_ratio": ratio}).tensors
    differ = {0: 0, 1: 0}
    for name in masks["sequential", 0.8]:
        if name.endswith(".mask"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            same = torch.equal(masks["sequential", 0.8][name], masks["one-pass", 0.8][name])
            differ[layer] += not same
            # at full rank W̃ = W: projecting changes no input, so the two orders read the same data
            assert torch.equal(masks["sequential", 1.0][name], masks["one-pass", 1.0][name]), name
    assert differ[0] == 0  # layer 0 reads the embeddings either way
    assert differ[1] >= 4, differ  # layer 1 reads a model whose layer 0 is projected


def per_row_region(score: torch.Tensor, sparsity: float = 0.8) -> torch.Tensor:
    """The spec's per-row rule, written out: in each row, the entries above its ⌊d_in·s⌋-th smallest score."""
    thresh = score.sort(dim=1).values[:, math.floor(score.shape[1] * sparsity)]
    return score > thresh.unsqueeze(1)


def test_wanda_and_snip_keep_the_same_share_of_every_row(world):
    """wanda |W_ij|·‖X_j‖ and snip |W_ij|·Σ_n|∂L_n/∂W_ij| (L_n: the mean NLL of example n's safe
    response), each compared within its output row, against activations and per-example gradients
    computed here one example at a time; today's rules remain as group=matrix, snip_gradients=pooled."""
    common = dict(aligned=world["aligned"], base=world["base"], calibration=world["cal"], template="raw",
                  device="cpu")
    wanda = api.prepare("nlsr", **common, params={"score": "wanda"}).tensors
    snip = api.prepare("nlsr", **common, params={"score": "snip"}).tensors
    old = api.prepare("nlsr", **common, params={"score": "snip", "group": "matrix",
                                                 "snip_gradients": "pooled"}).tensors
    model, tok, arch, w_e = _reference(world)
    enc = _encoded(world, tok)
    names = list(w_e)
    inputs = collect(model, arch, enc, capture=names).capture
    abs_sum = {m: torch.zeros_like(w) for m, w in w_e.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in names:
        model.get_parameter(m + ".weight").requires_grad_(True)
    for e in enc:
        model.zero_grad()
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0]
        torch.nn.functional.cross_entropy(logits[e.prompt_len - 1:-1], ids[0, e.prompt_len:]).backward()
        for m in names:
            abs_sum[m] += model.get_parameter(m + ".weight").grad.abs()
    sums = example_gradient_sums(model, enc, names, batch_size=5)
    pooled = loss_gradients(model, enc, [m + ".weight" for m in names], batch_size=5)
    differ = 0
    for m, w in w_e.items():
        assert torch.allclose(sums[m][0], abs_sum[m], rtol=1e-4, atol=1e-7), m
        x = torch.cat(inputs[m])
        keep = w.shape[1] - math.floor(w.shape[1] * 0.8) - 1
        for patch, score in ((wanda, w.abs() * x.norm(dim=0)), (snip, w.abs() * abs_sum[m])):
            got = unpack_mask(patch[f"{m}.weight.mask"], tuple(w.shape))
            assert torch.equal(got, per_row_region(score)), m
            assert got.sum(1).eq(keep).all(), m
        got = unpack_mask(old[f"{m}.weight.mask"], tuple(w.shape))
        assert torch.equal(got, region_mask((w * pooled[m + ".weight"]).abs(), 0.8)), m
        differ += not torch.equal(got, unpack_mask(snip[f"{m}.weight.mask"], tuple(w.shape)))
    assert differ == len(names)  # the official rule and today's pick different regions


def test_prepare_once_apply_many_equals_repair_bit_for_bit(world, tmp_path):
    api.prepare("nlsr", aligned=world["aligned"], base=world["base"], calibration=world["cal"],
                out=tmp_path / "patch", template="raw", device="cpu")
    a = api.apply(tmp_path / "patch", world["finetuned"], tmp_path / "applied", device="cpu")
    b = _repair(world, tmp_path / "repaired")
    ta, tb = tensors_of(tmp_path / "applied"), tensors_of(tmp_path / "repaired")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.report["modules"] == b.report["modules"]
    # a patch prepared before the official region rules (no activations/group/snip_gradients) applies as it is
    old = api.load_patch(tmp_path / "patch")
    for key in ("activations", "group", "snip_gradients"):
        del old.params[key]
    d = api.apply(old, world["finetuned"], tmp_path / "old", device="cpu")
    assert d.report["modules"] == a.report["modules"] and d.report["totals"]["activations"] == "one-pass"
    # apply-stage parameters change per fine-tune without preparing again; prepare-stage ones cannot
    c = api.apply(tmp_path / "patch", world["finetuned"], tmp_path / "thr", params={"selection": "threshold",
                                                                                    "tau": 2.0}, device="cpu")
    assert c.report["totals"]["modules_restored"] == "14/14"
    with pytest.raises(RealignError, match="fixed when the patch is prepared"):
        api.apply(tmp_path / "patch", world["finetuned"], tmp_path / "x", params={"alpha": "0.5"})


def test_cli_prepare_apply_equals_repair(world, tmp_path):
    from realign.cli import app

    runner = CliRunner()
    common = ["--calibration", str(world["cal"]), "--template", "raw", "--base", str(world["base"])]
    r1 = runner.invoke(app, ["prepare", "nlsr", "--aligned", str(world["aligned"]), *common,
                             "--set", "score=wanda", "--out", str(tmp_path / "patch")])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["apply", str(tmp_path / "patch"), "--finetuned", str(world["finetuned"]),
                             "--set", "selection=fraction", "--set", "k=5", "--out", str(tmp_path / "a")])
    assert r2.exit_code == 0, r2.output
    assert "modules restored" in r2.output and "5/14" in r2.output
    r3 = runner.invoke(app, ["repair", "nlsr", "--aligned", str(world["aligned"]), "--finetuned",
                             str(world["finetuned"]), *common, "--set", "score=wanda", "--set", "selection=fraction",
                             "--set", "k=5", "--out", str(tmp_path / "b")])
    assert r3.exit_code == 0, r3.output
    ta, tb = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and ta.keys() == tb.keys()
    bad = runner.invoke(app, ["repair", "nlsr", "--aligned", str(world["aligned"]), "--finetuned",
                              str(world["finetuned"]), "--set", "sparsity=1.5", *common, "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: nlsr: sparsity")


def test_dense_mode_on_fresh_lora_adapter_checkpoint_and_adapter_outputs(world, tmp_path):
    from realign.compute import load_model as run_model

    params = {"selection": "fraction", "k": 4, "score": "snip"}
    res = _repair(world, tmp_path / "ckpt", ft="lora", params=params)
    assert res.output == "checkpoint"
    out = tensors_of(tmp_path / "ckpt")
    lora = load_model(world["lora"])
    restored = {r["module"] for r in res.report["modules"] if r["restored"]}
    assert len(restored) == 4
    for _, _, name in lora.arch.linear_weights():
        dense = lora.get(name)  # W_a + s·B·A
        diff = out[name] != dense
        if name.removesuffix(".weight") in restored:
            assert 0 < int(diff.sum()) <= math.ceil(0.2 * dense.numel())
        else:
            assert not diff.any()
    res2 = _repair(world, tmp_path / "adapter", ft="lora", params=params, output="adapter")
    assert res2.output == "adapter" and (tmp_path / "adapter" / "adapter_config.json").exists()
    # PEFT itself reads the adapter back to the same weights (restored modules at full rank)
    merged, _ = run_model(tmp_path / "adapter", device="cpu")
    for _, _, name in lora.arch.linear_weights():
        assert torch.allclose(merged.get_parameter(name).detach(), out[name], atol=1e-5), name


def test_no_base_reference_is_aligned_and_said_so(world, tmp_path):
    res = api.repair("nlsr", aligned=world["aligned"], finetuned=world["finetuned"], out=tmp_path / "o",
                     calibration=world["cal"], template="raw", device="cpu", params={"score": "wanda"})
    assert any("W_e = W_a" in n for n in res.notes)
    assert res.report["reference"] == "W_e = W_a (no base model)"


def test_errors_are_one_line_realign_errors(world, tmp_path):
    with pytest.raises(RealignError, match="needs --calibration"):
        api.prepare("nlsr", aligned=world["aligned"], base=world["base"])
    with pytest.raises(RealignError, match="mode=lora needs --aligned to be a LoRA adapter"):
        api.prepare("nlsr", aligned=world["aligned"], base=world["base"], calibration=world["cal"],
                    params={"mode": "lora"}, template="raw")
    with pytest.raises(RealignError, match="selection"):
        api.prepare("nlsr", aligned=world["aligned"], calibration=world["cal"], params={"selection": "random"})
    with pytest.raises(RealignError, match="granularity=row selects whole rows"):
        api.prepare("nlsr", aligned=world["aligned"], calibration=world["cal"],
                    params={"granularity": "row", "group": "row"})
    factor_patch = api.prepare("nlsr", aligned=world["aligned_adapter"], calibration=world["cal"], template="raw",
                               device="cpu", out=tmp_path / "fp", params={"score": "wanda"})
    assert factor_patch.meta["mode"] == "lora"
    with pytest.raises(RealignError, match="LoRA-factor mode"):
        api.apply(tmp_path / "fp", world["finetuned"], tmp_path / "o")
    with pytest.raises(RealignError, match="on the same base"):
        api.apply(tmp_path / "fp", world["lora"], tmp_path / "o2")


# ============================================================================ LoRA-factor mode
@pytest.mark.parametrize("amplify,factor", [("paper", math.sqrt(1.9)), ("lora-factors", 1.8)])
def test_lora_factor_mode(world, tmp_path, amplify, factor):
    from realign.compute import load_model as run_model

    res = api.repair("nlsr", aligned=world["aligned_adapter"], finetuned=world["ft_adapter"], out=tmp_path / "o",
                     calibration=world["cal"], template="raw", device="cpu",
                     params={"amplify": amplify, "selection": "fraction", "k": 6})
    assert res.output == "adapter" and res.report["mode"] == "lora"
    out = tensors_of(tmp_path / "o")
    al, ft = load_model(world["aligned_adapter"]), load_model(world["ft_adapter"])
    rows = {r["module"]: r for r in res.report["modules"]}
    assert sum(r["restored"] for r in rows.values()) == 6

    # the reference model W_b + s·(cB)(cA); the inputs of each layer's modules as the official order
    # reads them (layer 0 holding W_b + s·B̃Ã first), for direct masks
    model, tok = run_model(world["base"], device="cpu")
    refs, w_b = {}, {}
    with torch.no_grad():
        for _, _, name in al.arch.linear_weights():
            a, b, s = al.lora_factors(name)
            refs[name.removesuffix(".weight")] = (factor * a, factor * b, s)
            w_b[name.removesuffix(".weight")] = model.get_parameter(name).detach().clone()
            model.get_parameter(name).add_(s * factor * factor * b @ a)

    def factors_projected(module, x):
        a_e, b_e, s = refs[module]
        x = x.double()
        return w_b[module].double() + s * projected(x @ a_e.double().T, b_e) @ projected(x, a_e)

    enc = _encoded(world, tok)
    inputs = {**spec_inputs(model, al.arch, enc, 0, True, factors_projected),
              **spec_inputs(model, al.arch, enc, 1, True, factors_projected)}
    for module, row in rows.items():
        a_name, b_name = ft.adapter.modules[module]
        a_a, b_a, _ = al.adapter.factors(module)
        a_f, b_f, _ = ft.adapter.factors(module)
        a_e, b_e = factor * a_a, factor * b_a
        x = inputs[module]
        y = x @ a_e.double().T  # B's input
        for w, inp, part in ((a_e, x, "lora_A"), (b_e, y, "lora_B")):
            expected = region_mask(projected(inp, w).abs(), 0.8)
            got = unpack_mask(res_patch_tensor(world, amplify, f"{module}.{part}.mask"), tuple(w.shape))
            assert torch.equal(got, expected), (module, part)
        m_a = unpack_mask(res_patch_tensor(world, amplify, f"{module}.lora_A.mask"), tuple(a_a.shape))
        m_b = unpack_mask(res_patch_tensor(world, amplify, f"{module}.lora_B.mask"), tuple(b_a.shape))
        c = torch.nn.functional.cosine_similarity(((b_f * m_b) @ (a_f * m_a)).flatten(),
                                                  ((b_e * m_b) @ (a_e * m_a)).flatten(), dim=0)
        assert row["c"] == pytest.approx(float(c), abs=1e-5)
        if row["restored"]:
            assert torch.allclose(out[a_name][m_a], a_e[m_a], atol=1e-6)
            assert torch.equal(out[a_name][~m_a], a_f[~m_a]) and torch.equal(out[b_name][~m_b], b_f[~m_b])
            assert torch.allclose(out[b_name][m_b], b_e[m_b], atol=1e-6)
        else:
            assert torch.equal(out[a_name], a_f) and torch.equal(out[b_name], b_f)
    least = sorted(rows, key=lambda m: rows[m]["c"])[:6]
    assert {m for m, r in rows.items() if r["restored"]} == set(least)


_PATCHES: dict[str, object] = {}


def res_patch_tensor(world, amplify: str, key: str) -> torch.Tensor:
    """The LoRA-factor patch for ``amplify`` (prepared once per test session)."""
    if amplify not in _PATCHES:
        _PATCHES[amplify] = api.prepare("nlsr", aligned=world["aligned_adapter"], calibration=world["cal"],
                                        template="raw", device="cpu", params={"amplify": amplify})
    return _PATCHES[amplify].tensors[key]  # type: ignore[attr-defined]
