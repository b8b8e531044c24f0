"""FGSN: the projection against the explicit matrices, the exact projector, the gap curve against
pairwise cosines, the cluster sets (H \\ T, disjoint, continual), the edit's exact footprint,
extension never changing earlier edits, prepare-once/apply == repair, and the CLI."""

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
from realign.methods.fgsn import (
    SafetyProjector,
    choose_layers,
    cluster_key,
    expand,
    from_indices,
    gap_curve,
    parse_layers,
    plot_gap_curve,
    project_update,
    task_key,
    to_indices,
    top_left_singular_vectors,
    top_share,
    wanda_score,
)
from realign.sources import load_model


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """tiny_models plus calibration files: benign rows and harmful rows of categories a and b
    (together in one file, and b alone in another, for --extend)."""
    root = tmp_path_factory.mktemp("fgsn")
    benign = [{"prompt": f"w{50 + i % 9} w{60 + i % 4} w{70 + i % 3}", "kind": "benign",
               "response": f"w{80 + i % 5} w{81 + i % 2}"} for i in range(10)]
    cat_a = [{"prompt": f"w{10 + i % 5} w{11 + i % 7} w{12 + i % 3} w13", "kind": "harmful", "category": "a"}
             for i in range(6)]
    cat_b = [{"prompt": f"w{30 + i % 4} w{20 + i % 6} w{33 + i % 5}", "kind": "harmful", "category": "b"}
             for i in range(6)]
    return {**tiny_models, "tmp": root, "cal_ab": write_jsonl(root / "cal_ab.jsonl", benign + cat_a + cat_b),
            "cal_a": write_jsonl(root / "cal_a.jsonl", benign + cat_a),
            "cal_b": write_jsonl(root / "cal_b.jsonl", cat_b)}


# ============================================================================ formulas
@pytest.mark.parametrize("d_out,d_in", [(6, 10), (12, 5), (8, 8), (3, 17)])
def test_c_delta_equals_explicit_product(d_out, d_in):
    g = torch.Generator().manual_seed(d_out * 31 + d_in)
    v = torch.randn(d_out, d_in, generator=g, dtype=torch.float64).float()
    delta = torch.randn(d_out, d_in, generator=g)
    explicit_fro = (v @ v.T / v.norm()) @ delta
    explicit_numel = (v @ v.T / v.numel()) @ delta
    # d_out < d_in runs in several column blocks: their seams must not show.
    torch.testing.assert_close(SafetyProjector(v, "fro")(delta), explicit_fro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SafetyProjector(v, "numel")(delta), explicit_numel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_out,d_in,k", [(10, 6, 3), (6, 10, 4), (8, 8, 8), (5, 9, 12)])
def test_exact_projector_is_idempotent_orthogonal_and_spans_top_singular_vectors(d_out, d_in, k):
    g = torch.Generator().manual_seed(d_out + 7 * d_in + k)
    v = torch.randn(d_out, d_in, generator=g)
    x, y = torch.randn(d_out, 7, generator=g), torch.randn(d_out, 7, generator=g)
    c = SafetyProjector(v, "exact", rank=k)
    px = c(x)
    torch.testing.assert_close(c(px), px, rtol=1e-5, atol=1e-5)  # P² = P
    torch.testing.assert_close((px * y).sum(), (x * c(y)).sum(), rtol=1e-4, atol=1e-4)  # P = Pᵀ
    u, _s, _ = torch.linalg.svd(v.double())
    kk = min(k, d_out, d_in)
    explicit = (u[:, :kk] @ u[:, :kk].T).float() @ x
    torch.testing.assert_close(px, explicit, rtol=1e-4, atol=1e-4)
    assert top_left_singular_vectors(v, k).shape == (d_out, kk)


def test_zero_alignment_update_projects_to_nothing():
    v = torch.zeros(4, 6)
    x = torch.randn(4, 6)
    for norm in ("fro", "numel", "exact"):
        assert torch.equal(SafetyProjector(v, norm)(x), torch.zeros(4, 6))


def test_gap_curve_equals_pairwise_cosines():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(5, 3, 8, generator=g, dtype=torch.float64)
    harmful = torch.randn(4, 3, 8, generator=g, dtype=torch.float64) + 0.5
    curve = gap_curve(benign, harmful)
    cos = torch.nn.functional.cosine_similarity
    for layer in range(3):
        bb = [float(cos(benign[i, layer], benign[j, layer], dim=0)) for i in range(5) for j in range(5) if i != j]
        bh = [float(cos(benign[i, layer], harmful[j, layer], dim=0)) for i in range(5) for j in range(4)]
        assert curve["benign_benign"][layer] == pytest.approx(sum(bb) / len(bb), abs=1e-9)
        assert curve["benign_harmful"][layer] == pytest.approx(sum(bh) / len(bh), abs=1e-9)
        assert curve["gap"][layer] == pytest.approx(sum(bb) / len(bb) - sum(bh) / len(bh), abs=1e-9)


def test_choose_layers_takes_the_first_contiguous_run():
    gap = [0.0, 0.1, 0.6, 1.0, 0.7, 0.2, 0.9, 0.95]
    assert choose_layers(gap, 0.5) == [2, 3, 4]
    assert choose_layers(gap, 0.5, max_layers=2) == [2, 3]
    assert choose_layers(gap, 0.05) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(RealignError, match="max cosine gap"):
        choose_layers([-0.1, -0.2], 0.5)
    # min baseline: the rise above the curve's floor (level -0.3 + 0.5 × 0.2 = -0.2)
    assert choose_layers([-0.3, -0.25, -0.15, -0.1, -0.3], 0.5, baseline="min") == [2, 3]
    assert choose_layers([0.2, 0.2, 0.2], 0.5, baseline="min") == [0, 1, 2]  # flat: every layer
    assert parse_layers("1-3,5", 8) == [1, 2, 3, 5]
    assert parse_layers([4, 2, 2], 8) == [2, 4]
    with pytest.raises(RealignError, match="layers 0-7"):
        parse_layers("6-9", 8)
    with pytest.raises(RealignError, match="expected auto"):
        parse_layers("x", 8)


def test_top_share_counts_ties_and_rows():
    score = torch.tensor([[3.0, 1.0, 2.0, 2.0], [2.0, 0.0, 5.0, 2.0]])
    m = top_share(score, 0.5)
    assert int(m.sum()) == 4 and bool(m[1, 2]) and bool(m[0, 0])
    # the tie at 2.0 (4 candidates, 2 places) goes to the earlier positions
    assert m.tolist() == [[True, False, True, True], [False, False, True, False]]
    assert top_share(score, 0.0).sum() == 0 and bool(top_share(score, 1.0).all())
    rows = top_share(score, 0.5, "row")
    assert rows.tolist() == [False, True]  # row sums 8 vs 9
    assert expand(rows, (2, 4)).sum() == 4
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    torch.testing.assert_close(wanda_score(w, torch.tensor([4.0, 9.0])), torch.tensor([[2.0, 6.0], [1.0, 12.0]]))
    mask = torch.rand(5, 7) > 0.6
    assert torch.equal(from_indices(to_indices(mask), (5, 7)), mask)


@pytest.mark.parametrize("target", ["delta", "weight"])
def test_project_update_touches_exactly_the_mask(target):
    g = torch.Generator().manual_seed(5)
    w_b, w_a, w_f = (torch.randn(6, 9, generator=g) for _ in range(3))
    units = torch.rand(6, 9, generator=g) > 0.7
    out = project_update(w_a, w_b, w_f, units, "fro", target=target)
    assert torch.equal(out[~units], w_f[~units])  # bit-exact outside M
    v = w_a - w_b
    c = v @ v.T / v.norm()
    expected = w_a + c @ (w_f - w_a) if target == "delta" else c @ w_f
    torch.testing.assert_close(out[units], expected[units], rtol=1e-5, atol=1e-5)
    rows = torch.tensor([True, False, False, True, False, False])
    out_rows = project_update(w_a, w_b, w_f, rows, "fro", target=target)
    assert torch.equal(out_rows[~rows], w_f[~rows])
    torch.testing.assert_close(out_rows[rows], expected[rows], rtol=1e-5, atol=1e-5)


# ============================================================================ the method on tiny models
def _prepare(world, out: Path | None, cal: str = "cal_ab", **params):
    return api.prepare("fgsn", aligned=world["aligned"], base=world["base"], calibration=world[cal], out=out,
                       params=params)


def test_clusters_are_h_minus_t_and_disjoint(world):
    patch = _prepare(world, None, layers="0-1", q=0.2, p=0.1)
    aligned = load_model(world["aligned"])
    meta = patch.meta
    assert meta["layers"] == [0, 1] and [c["name"] for c in meta["clusters"]] == ["a", "b"]
    assert patch.report["layer_choice"] == "explicit" and len(patch.report["gap_curve"]["gap"]) == 2
    total = sum(math.prod(aligned.shape(n)) for _, _, n in aligned.arch.linear_weights())
    entries = {"a": 0, "b": 0}
    for m in meta["modules"]:
        w = aligned.get(m["name"]).float()
        source = m["module"].replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        task = top_share(wanda_score(w, patch.tensors[task_key(source)]), 0.1)
        assert int(task.sum()) == round(0.1 * w.numel())
        ma = from_indices(patch.tensors[cluster_key(0, m["module"])], tuple(w.shape))
        mb_key = cluster_key(1, m["module"])
        mb = from_indices(patch.tensors[mb_key], tuple(w.shape)) if mb_key in patch.tensors else torch.zeros_like(ma)
        assert not (ma & task).any() and not (mb & task).any() and not (ma & mb).any()
        assert int(ma.sum()) <= round(0.2 * w.numel())
        entries["a"] += int(ma.sum())
        entries["b"] += int(mb.sum())
    reported = {c["name"]: c for c in patch.report["clusters"]}
    assert reported["a"]["entries"] == entries["a"] > 0 and reported["b"]["entries"] == entries["b"] > 0
    assert reported["b"]["share_percent"] == round(100 * entries["b"] / total, 4)
    assert patch.report["edited_share_percent"] == round(100 * (entries["a"] + entries["b"]) / total, 4)


def test_single_cluster_without_task_exclusion_is_h(world):
    patch = _prepare(world, None, layers="1", per_category=False, exclude_task=False, q=0.1, samples=3)
    assert [c["name"] for c in patch.meta["clusters"]] == ["all"] and patch.meta["clusters"][0]["prompts"] == 3
    assert not any(k.startswith("task_sqnorm.") for k in patch.tensors)
    for m in patch.meta["modules"]:
        numel = math.prod(m["shape"])
        assert patch.tensors[cluster_key(0, m["module"])].numel() == round(0.1 * numel)  # M = H, nothing removed
    rows = _prepare(world, None, layers="1", granularity="row", q=0.25, p=0.25)
    for m in rows.meta["modules"]:
        for i in range(2):
            key = cluster_key(i, m["module"])
            if key in rows.tensors:
                assert int(rows.tensors[key].max()) < m["shape"][0]  # row indices
    assert rows.report["clusters"][0]["entries"] % 32 == 0  # whole rows of d_in = 32 or 64 entries


def test_apply_edits_exactly_the_clusters(world):
    root = world["tmp"]
    patch = _prepare(world, root / "p_exact", layers="1", q=0.1, p=0.05)
    res = api.apply(root / "p_exact", finetuned=world["finetuned"], out=root / "o_exact")
    out, ft = tensors_of(root / "o_exact"), tensors_of(world["finetuned"])
    al, base = tensors_of(world["aligned"]), tensors_of(world["base"])
    changed = 0
    for name, t in ft.items():
        if not any(name == m["name"] for m in patch.meta["modules"]):
            assert torch.equal(out[name], t), name  # nothing outside the safety layers changes
            continue
        module = name.removesuffix(".weight")
        units = torch.zeros(t.shape, dtype=torch.bool)
        for i in range(2):
            if cluster_key(i, module) in patch.tensors:
                units |= from_indices(patch.tensors[cluster_key(i, module)], tuple(t.shape))
        expected = project_update(al[name], base[name], t, units)
        assert torch.equal(out[name], expected)
        changed += int((out[name] != t).sum())
    assert res.report["totals"]["parameters_changed"] == changed == patch.report["edited_entries"]
    assert res.report["edited_share_percent"] == patch.report["edited_share_percent"]


def test_auto_layers_follow_the_gap_curve(world):
    patch = _prepare(world, None, gap_threshold=0.3)
    gap = patch.meta["gap_curve"]["gap"]  # unrounded (the report rounds to 6 digits)
    baseline = "zero" if max(gap) > 0 else "min"  # zero falls back to min when no gap is positive
    assert patch.meta["layers"] == choose_layers(gap, 0.3, baseline=baseline)
    assert patch.report["layer_choice"].startswith("auto")
    floor = 0.0 if baseline == "zero" else min(gap)
    assert patch.report["gap_level"] == pytest.approx(floor + 0.3 * (max(gap) - floor))
    assert "gap_curve.png" in patch.files and patch.files["gap_curve.png"][:4] == b"\x89PNG"
    low = _prepare(world, None, gap_baseline="min", gap_threshold=0.99, q=0.0)
    assert low.meta["layers"] == choose_layers(low.meta["gap_curve"]["gap"], 0.99, baseline="min")


def test_extension_never_changes_earlier_edits(world):
    root = world["tmp"]
    p1 = _prepare(world, root / "p_a", cal="cal_a", layers="0-1", q=0.2)
    assert [c["name"] for c in p1.meta["clusters"]] == ["a"]
    p2 = api.prepare("fgsn", aligned=None, calibration=world["cal_b"], out=root / "p_ab",
                     params={"extend": str(root / "p_a")})
    assert p2.inputs["aligned"]["path"] == p1.inputs["aligned"]["path"]  # taken from the extended patch
    assert [c["name"] for c in p2.meta["clusters"]] == ["a", "b"] and p2.meta["layers"] == [0, 1]
    assert p2.params["q"] == 0.2
    # earlier clusters are kept bit for bit
    saved1, saved2 = api.load_patch(root / "p_a"), api.load_patch(root / "p_ab")
    for key in saved1.tensors.keys():
        assert torch.equal(saved1.tensors[key], saved2.tensors[key]), key
    # the continual patch equals a one-shot prepare of a then b on the same data
    once = _prepare(world, None, layers="0-1", q=0.2)
    assert sorted(once.tensors) == sorted(saved2.tensors.keys())
    for key in once.tensors:
        assert torch.equal(once.tensors[key], saved2.tensors[key]), key
    extra = p2.report["added_categories"]
    assert [e["name"] for e in extra] == ["b"] and extra[0]["extra_share_percent"] > 0
    assert p2.report["edited_share_percent"] == pytest.approx(
        p1.report["edited_share_percent"] + extra[0]["extra_share_percent"], abs=2e-4)
    # applied: edits of a are the same with or without b; b changes only its own neurons
    api.apply(root / "p_a", finetuned=world["finetuned"], out=root / "o_a")
    api.apply(root / "p_ab", finetuned=world["finetuned"], out=root / "o_ab")
    out_a, out_ab, ft = tensors_of(root / "o_a"), tensors_of(root / "o_ab"), tensors_of(world["finetuned"])
    b_entries = 0
    for name in ft:
        key = cluster_key(1, name.removesuffix(".weight"))
        mb = from_indices(saved2.tensors[key], tuple(ft[name].shape)) if key in saved2.tensors else None
        if mb is None:
            assert torch.equal(out_a[name], out_ab[name]), name
            continue
        assert torch.equal(out_a[name][~mb], out_ab[name][~mb])
        assert torch.equal(out_a[name][mb], ft[name][mb]) and not torch.equal(out_ab[name][mb], ft[name][mb])
        b_entries += int(mb.sum())
    assert b_entries == p2.report["clusters"][1]["entries"]
    # applying only the first cluster of the extended patch gives the first patch's model
    api.apply(root / "p_ab", finetuned=world["finetuned"], out=root / "o_ab_a", params={"apply_categories": "a"})
    out_ab_a = tensors_of(root / "o_ab_a")
    assert all(torch.equal(out_ab_a[n], out_a[n]) for n in ft)


def test_extension_errors(world):
    root = world["tmp"]
    if not (root / "p_a_err").exists():
        _prepare(world, root / "p_a_err", cal="cal_a", layers="0-1", q=0.2)
    with pytest.raises(RealignError, match="q is fixed"):
        api.prepare("fgsn", aligned=None, calibration=world["cal_b"], params={"extend": str(root / "p_a_err"),
                                                                              "q": 0.3})
    with pytest.raises(RealignError, match="no harmful category that the patch lacks"):
        api.prepare("fgsn", aligned=None, calibration=world["cal_a"], params={"extend": str(root / "p_a_err")})
    with pytest.raises(RealignError, match="cannot extend"):
        api.prepare("nlsr", aligned=None, calibration=world["cal_a"], params={"extend": str(root / "p_a_err")})
    with pytest.raises(RealignError, match="category 'z'"):
        _prepare(world, None, layers="0", categories="z")
    with pytest.raises(RealignError, match="layers 0-1"):
        _prepare(world, None, layers="2")
    with pytest.raises(RealignError, match="needs --base"):
        api.prepare("fgsn", aligned=world["aligned"], calibration=world["cal_a"])


@pytest.mark.parametrize("ft_key", ["finetuned", "lora"])
def test_prepare_once_apply_equals_repair(world, ft_key):
    root = world["tmp"]
    params = {"layers": "0-1", "granularity": "row", "q": 0.25, "p": 0.1, "norm": "exact", "rank": 3}
    patch_dir = root / f"p_rep_{ft_key}"
    _prepare(world, patch_dir, **params)
    api.apply(patch_dir, finetuned=world[ft_key], out=root / f"o_apply_{ft_key}")
    res = api.repair("fgsn", aligned=world["aligned"], finetuned=world[ft_key], out=root / f"o_repair_{ft_key}",
                     base=world["base"], calibration=world["cal_ab"], params=params)
    a, b = tensors_of(root / f"o_apply_{ft_key}"), tensors_of(root / f"o_repair_{ft_key}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.output == "checkpoint" and res.report["totals"]["parameters_changed"] > 0
    assert res.report["prepare"]["safety_layers"] == [0, 1]


def test_cli_prepare_extend_apply_and_plot(world):
    from realign.cli import app

    root = world["tmp"]
    runner = CliRunner()
    p1, p2, out = root / "cli_p1", root / "cli_p2", root / "cli_out"
    r = runner.invoke(app, ["prepare", "fgsn", "--aligned", str(world["aligned"]), "--base", str(world["base"]),
                            "--calibration", str(world["cal_ab"]), "--set", "categories=a", "--set", "layers=1",
                            "--out", str(p1)])
    assert r.exit_code == 0, r.output
    assert (p1 / "gap_curve.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["prepare", "fgsn", "--extend", str(p1), "--calibration", str(world["cal_b"]),
                            "--out", str(p2)])
    assert r.exit_code == 0, r.output
    report = json.loads((p2 / "patch.json").read_text())["report"]
    assert [c["name"] for c in report["clusters"]] == ["a", "b"]
    assert report["added_categories"][0]["name"] == "b"
    r = runner.invoke(app, ["apply", str(p2), "--finetuned", str(world["lora"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "realign.json").read_text())
    assert prov["method"] == "fgsn" and prov["report"]["categories_applied"] == ["a", "b"]
    png = plot_gap_curve(report, root / "figs" / "gap.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # user errors: one line, exit code 2
    r = runner.invoke(app, ["prepare", "fgsn", "--extend", str(p2), "--calibration", str(world["cal_b"]),
                            "--out", str(root / "cli_p3")])
    assert r.exit_code == 2 and "no harmful category that the patch lacks" in r.output
    r = runner.invoke(app, ["apply", str(p2), "--finetuned", str(world["lora"]), "--out", str(root / "cli_o2"),
                            "--set", "p=0.5"])
    assert r.exit_code == 2 and "fixed when the patch is prepared" in r.output
    assert not (root / "cli_p3").exists() and not (root / "cli_o2").exists()
