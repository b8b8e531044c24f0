"""Safe Delta: the spec's "must hold" list against direct computations on small matrices, then the
method end to end on the tiny models (full and LoRA fine-tunes, bf16, prepare once / apply many)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import perturbed_copy, save_tiny
from safetensors import safe_open

from realign import api
from realign.calibration import from_rows
from realign.errors import RealignError
from realign.methods.safedelta import budget, inverse_factor, kept_entries, safe_delta


def random_factor(d_in: int, seed: int, dead: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d_in, d_in, generator=g) * torch.linspace(0.2, 3.0, d_in)
    if dead:
        x[:, :dead] = 0.0
    return inverse_factor(2.0 / x.shape[0] * x.T @ x, 0.01)[0]


# --------------------------------------------------------------- direct computations, written from the spec
def direct_mask(loss: torch.Tensor, t: torch.Tensor, limit: float, drop: float) -> torch.Tensor:
    """Sort every entry by (t, column, row), leave out the last ⌊drop·n⌋, keep running sum ≤ limit."""
    d_out, count = loss.shape
    entries = [(float(t[m]), m, r) for m in range(count) for r in range(d_out)]
    entries.sort()
    entries = entries[: len(entries) - math.floor(drop * len(entries))]
    mask = torch.zeros(d_out, count, dtype=torch.bool)
    running = 0.0
    for _t, m, r in entries:
        running += float(loss[r, m])
        if running <= limit:
            mask[r, m] = True
    return mask


def direct_safe_delta(w_a, w_f, u, s, drop, block):
    """The spec's loop as written: blocks, masks at block start, sub-blocks of 4, no batching."""
    w, w_f = w_a.double().clone(), w_f.double()
    u = u.double()
    d_out, d_in = w.shape
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        d = torch.diagonal(u)[i1:i2]
        t = 1.0 / d**2
        loss = (w_f[:, i1:i2] - w[:, i1:i2]) ** 2 / d**2
        limit = float(t.mean()) * (s / 2) * (d_out / 4096)
        mask = direct_mask(loss, t, limit, drop)
        err = torch.zeros(d_out, i2 - i1, dtype=torch.float64)
        for k1 in range(0, i2 - i1, 4):
            k2 = min(k1 + 4, i2 - i1)
            cols = w[:, i1 + k1:i1 + k2].clone()
            q = torch.where(mask[:, k1:k2], w_f[:, i1 + k1:i1 + k2], cols)
            e = (cols - q) / d[k1:k2]
            w[:, i1 + k1:i1 + k2] = q
            err[:, k1:k2] = e
            w[:, i1 + k2:i2] -= e @ u[i1 + k1:i1 + k2, i1 + k2:i2]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


# ------------------------------------------------------------------------------------------ the algebra
def test_inverse_factor_is_the_cholesky_of_the_dampened_inverse_and_gives_dead_inputs_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    x[:, 2] = 0.0  # a dead input
    gram = x.T @ x
    u, dead = inverse_factor(gram, 0.01)
    h = gram.double().clone()
    h[2, 2] = 1.0
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(6, dtype=torch.float64)
    assert dead == 1
    assert torch.allclose(u.double().T @ u.double(), torch.linalg.inv(h), atol=1e-6)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())


@pytest.mark.parametrize("seed", range(6))
def test_kept_entries_is_the_prefix_of_the_spec_order_within_the_budget(seed):
    g = torch.Generator().manual_seed(seed)
    d_out, count = 5, 7
    loss = torch.rand(d_out, count, generator=g) ** 3
    t = torch.randint(1, 5, (count,), generator=g).double()  # ties between columns on purpose
    for limit in (0.0, 0.05, 0.3, 1.0, 3.0, float(loss.sum()) + 1):
        for drop in (0.0, 0.15, 0.5):
            assert torch.equal(kept_entries(loss, t, limit, drop), direct_mask(loss, t, limit, drop)), (limit, drop)


def test_dropped_entries_are_never_kept_whatever_the_budget():
    g = torch.Generator().manual_seed(1)
    loss = torch.rand(8, 10, generator=g)
    t = torch.arange(10, 0, -1).double()  # column 0 has the largest t
    mask = kept_entries(loss, t, math.inf, 0.15)
    assert int(mask.sum()) == 80 - math.floor(0.15 * 80) == 68
    assert not mask[:, 0].any()  # column 0 (8 entries) and the last 4 rows of column 1 are the largest t
    assert not mask[4:, 1].any() and mask[:4, 1].all() and mask[:, 2:].all()


def test_budget_keeps_the_official_normalisations():
    t = torch.tensor([1.0, 3.0])
    assert budget(t, 0.11, 8192) == pytest.approx(2.0 * 0.11 / 2 * 2)


def test_s_zero_gives_the_aligned_weights():
    g = torch.Generator().manual_seed(2)
    w_a = torch.randn(6, 20, generator=g)
    w_f = w_a + 0.1 * torch.randn(6, 20, generator=g)
    res = safe_delta(w_a, w_f, random_factor(20, 3), s=0.0, block=8)
    assert torch.equal(res.weight, w_a) and res.kept == 0


@pytest.mark.parametrize("s", [0.5, 20.0, 1e4])
def test_kept_entries_equal_the_finetunes_and_the_whole_matches_the_direct_loop(s):
    g = torch.Generator().manual_seed(4)
    d_out, d_in = 9, 300  # blocks of 256 (two) and more than one batch of 128 columns inside the first
    w_a = torch.randn(d_out, d_in, generator=g)
    w_f = w_a + 0.2 * torch.randn(d_out, d_in, generator=g)
    u = random_factor(d_in, 5)
    res = safe_delta(w_a, w_f, u, s=s, block=256)
    expected = direct_safe_delta(w_a, w_f, u, s, 0.15, 256)
    assert torch.allclose(res.weight.double(), expected, atol=2e-5, rtol=1e-5)
    same = res.weight == w_f
    assert res.kept > 0 and int(same.sum()) >= res.kept  # kept entries carry W_f's value exactly
    assert torch.equal(w_a, w_a.clone()) and not torch.equal(res.weight, w_a)


def test_one_kept_column_is_the_obs_update_computed_directly():
    # m closes a sub-block of 4: the official code passes a sub-block's error on to the columns
    # after the sub-block only, so inside [4, 8) a kept column 5 would leave 6 and 7 alone.
    d_out, d_in, m = 5, 12, 7
    g = torch.Generator().manual_seed(6)
    w_a = torch.randn(d_out, d_in, generator=g)
    w_f = w_a + torch.randn(d_out, d_in, generator=g)
    u = torch.triu(torch.rand(d_in, d_in, generator=g) * 0.1) + torch.eye(d_in)
    u[m, m] = 3.0  # the smallest t: column m comes first in the order
    drop = (d_in - 1) / d_in + 1e-9  # every other column is left out
    res = safe_delta(w_a, w_f, u, s=1e9, drop=drop, block=d_in)
    expected = w_a - ((w_a[:, m] - w_f[:, m]) / u[m, m])[:, None] * u[m][None, :]
    assert torch.allclose(res.weight, expected, atol=1e-6)
    assert torch.equal(res.weight[:, m], w_f[:, m]) and torch.equal(res.weight[:, :m], w_a[:, :m])


def test_inputs_are_not_modified_and_dtype_is_float32():
    w_a = torch.randn(4, 16, dtype=torch.bfloat16)
    w_f = (w_a.float() + 0.3).to(torch.bfloat16)
    u = random_factor(16, 1)
    a0, f0, u0 = w_a.clone(), w_f.clone(), u.clone()
    res = safe_delta(w_a, w_f, u, s=50.0, block=8)
    assert res.weight.dtype == torch.float32
    assert torch.equal(w_a, a0) and torch.equal(w_f, f0) and torch.equal(u, u0)


# ------------------------------------------------------------------------------------------- the method
def _calibration(n: int = 6):
    g = torch.Generator().manual_seed(11)
    rows = []
    for _ in range(n):
        words = torch.randint(4, 90, (6,), generator=g).tolist()
        rows.append({"prompt": " ".join(f"w{w}" for w in words[:4]), "kind": "harmful",
                     "safe_response": "w1 w2 " + " ".join(f"w{w}" for w in words[4:])})
    rows.append({"prompt": "w3 w4", "kind": "benign", "response": "w5"})
    return from_rows(rows)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_repair_full_finetune_edits_linear_weights_only_and_reports(tiny_models, tmp_path):
    cal = _calibration()
    res = api.repair("safedelta", tiny_models["aligned"], tiny_models["finetuned"], tmp_path / "o",
                     calibration=cal, params={"s": 5.0})
    out, ft, al = _tensors(tmp_path / "o"), _tensors(tiny_models["finetuned"]), _tensors(tiny_models["aligned"])
    linear = [n for n in out if n.startswith("model.layers.") and "_proj." in n]
    others = [n for n in out if n not in linear]
    assert len(linear) == 14 and all(torch.equal(out[n], ft[n]) for n in others)
    for n in linear:  # between the two: some entries from W_f, none equal to W_a everywhere
        assert not torch.equal(out[n], ft[n]) and not torch.equal(out[n], al[n])
    totals = res.report["totals"]
    assert totals["modules"] == 14 and 0 < totals["entries_kept"] < totals["entries_changed_by_finetune"]
    assert len(res.report["modules"]) == 14
    assert all(0 <= m["budget_used"] <= 1 + 1e-9 for m in res.report["modules"])


def test_prepare_once_apply_many_and_s_zero_is_revert(tiny_models, tmp_path):
    cal = _calibration()
    api.prepare("safedelta", tiny_models["aligned"], tmp_path / "patch", calibration=cal)
    api.apply(tmp_path / "patch", tiny_models["finetuned"], tmp_path / "zero", params={"s": 0.0})
    api.apply(tmp_path / "patch", tiny_models["finetuned"], tmp_path / "five", params={"s": 5.0})
    repaired = api.repair("safedelta", tiny_models["aligned"], tiny_models["finetuned"], tmp_path / "r",
                          calibration=cal, params={"s": 5.0})
    zero, al = _tensors(tmp_path / "zero"), _tensors(tiny_models["aligned"])
    assert all(torch.equal(zero[n], al[n]) for n in zero if "_proj." in n)
    five, rep = _tensors(tmp_path / "five"), _tensors(tmp_path / "r")
    assert all(torch.equal(five[n], rep[n]) for n in five)  # prepare + apply == repair
    assert repaired.report["totals"]["entries_kept"] > 0


def test_lora_finetune_uses_the_dense_view_and_bf16_accumulates_in_float32(tiny_models, tmp_path):
    cal = _calibration()
    res = api.repair("safedelta", tiny_models["aligned"], tiny_models["lora"], tmp_path / "l", calibration=cal,
                     params={"s": 5.0})
    assert res.output == "checkpoint" and res.report["totals"]["modules"] == 14
    bf = save_tiny(tmp_path / "bf16-aligned", family="phi3", seed=1, dtype=torch.bfloat16)
    bf_ft = perturbed_copy(bf, tmp_path / "bf16-ft", seed=2)
    api.repair("safedelta", bf, bf_ft, tmp_path / "b", calibration=cal, params={"s": 5.0})
    out = _tensors(tmp_path / "b")
    assert all(t.dtype == torch.bfloat16 for n, t in out.items() if "_proj." in n)


def test_bad_parameters_are_one_line_errors(tiny_models, tmp_path):
    cal = _calibration()
    for params, fragment in (({"s": -1.0}, "s=-1.0"), ({"drop": 1.0}, "drop=1.0"), ({"damp": 0.0}, "damp=0.0"),
                             ({"block": 0}, "block=0")):
        with pytest.raises(RealignError, match=fragment.replace(".", r"\.")):
            api.repair("safedelta", tiny_models["aligned"], tiny_models["finetuned"], tmp_path / "x",
                       calibration=cal, params=params)
    assert not (tmp_path / "x").exists()


def test_layer_by_layer_statistics_equal_one_forward_pass(tiny_models, tmp_path):
    """prepare reads each layer's Grams layer by layer; an unedited model gives the same inputs as
    one full forward pass with hooks."""
    from realign.compute import load_model
    from realign.methods.safedelta import factor_key, input_modules
    from realign.sources import load_model as open_model
    from realign.stats import collect, encode
    from realign.tuning import split_heldout

    cal = _calibration()
    patch = api.prepare("safedelta", tiny_models["aligned"], tmp_path / "p", calibration=cal)
    aligned = open_model(tiny_models["aligned"])
    model, tok = load_model(aligned, device="cpu")
    rows = [e for e in split_heldout(cal)[0].harmful() if e.safe_response]
    encoded = encode(tok, [(e.prompt, e.safe_response) for e in rows], "auto", 256)
    sources = sorted(set(input_modules(aligned.arch).values()))
    stats = collect(model, aligned.arch, encoded, gram=sources, positions="all")
    for source in sources:
        expected, _ = inverse_factor(stats.gram[source] * (2.0 / len(encoded)), 0.01)
        assert torch.allclose(patch.tensors[factor_key(source)], expected, rtol=1e-4, atol=1e-5), source
