"""No command's output may destroy an input or the working directory, --force or not (every
command that writes), and --force replaces only earlier realign outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from realign.cli import app

runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(args: list[str], watched: Path, *fragments: str) -> None:
    before = tree_digest(watched)
    r = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree_digest(watched) == before, "an input changed"


@pytest.fixture()
def work(tiny_models, tmp_path, monkeypatch):
    """A project directory holding copies of the tiny models, a patch, results files and notes; the
    current directory is the project's."""
    import shutil

    root = tmp_path / "project"
    root.mkdir()
    for name in ("base", "aligned", "finetuned", "lora"):
        shutil.copytree(tiny_models[name], root / name)
    lora_cfg = json.loads((root / "lora" / "adapter_config.json").read_text())
    lora_cfg["base_model_name_or_path"] = str(root / "aligned")
    (root / "lora" / "adapter_config.json").write_text(json.dumps(lora_cfg))
    (root / "notes.txt").write_text("my notes\n")
    (root / "responses.jsonl").write_text(json.dumps({"prompt": "p", "response": "I cannot help."}) + "\n")
    for name in ("a.json", "b.json"):
        (root / name).write_text(json.dumps({"summary": {}, "suites": {}}))
    monkeypatch.chdir(root)
    r = runner.invoke(app, ["prepare", "revert", "-a", str(root / "aligned"), "-o", str(root / "patch")])
    assert r.exit_code == 0, r.output
    return root


# (command, the flag that names the output, the inputs it reads); "{out}" is replaced per case
COMMANDS = {
    "repair": ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "{out}", "--force"],
    "repair-lora": ["repair", "revert", "-a", "aligned", "-f", "lora", "-o", "{out}", "--force"],
    "prepare": ["prepare", "revert", "-a", "aligned", "-o", "{out}", "--force"],
    "apply": ["apply", "patch", "-f", "finetuned", "-o", "{out}", "--force"],
    "attack": ["attack", "--model", "aligned", "--task", "sst2", "-o", "{out}", "--force", "--n", "2"],
    "eval": ["eval", "finetuned", "-o", "{out}", "--limit", "1"],
    "judge": ["judge", "-i", "responses.jsonl", "-o", "{out}"],
    "compare-markdown": ["compare", "a.json", "b.json", "--markdown", "{out}"],
    "compare-plot": ["compare", "a.json", "b.json", "--plot", "{out}"],
}
# per command: outputs that are an input, lie inside one, or contain one
COLLISIONS = {
    "repair": ["finetuned", "aligned", "finetuned/sub", "aligned/config.json"],
    "repair-lora": ["lora", "aligned", "lora/out"],
    "prepare": ["aligned", "aligned/patch"],
    "apply": ["patch", "finetuned", "finetuned/out", "aligned"],
    "attack": ["aligned", "aligned/out"],
    "eval": ["finetuned/config.json", "finetuned/model.safetensors", "finetuned"],
    "judge": ["responses.jsonl"],
    "compare-markdown": ["a.json", "b.json"],
    "compare-plot": ["b.json"],
}
CASES = [(cmd, out) for cmd, outs in COLLISIONS.items() for out in outs]


@pytest.mark.parametrize(("command", "out"), CASES, ids=[f"{c}:{o}" for c, o in CASES])
def test_output_that_is_or_lies_inside_an_input_is_refused(work, command, out):
    args = [a.replace("{out}", out) for a in COMMANDS[command]]
    assert_refused(args, work, "input of this command")


@pytest.mark.parametrize("command", [*COMMANDS, "world", "demo"])
def test_current_directory_and_its_ancestors_are_refused(work, command):
    template = {**COMMANDS, "world": ["world", "build", "-o", "{out}", "--size", "small", "--force"],
                "demo": ["demo", "--out", "{out}", "--size", "small"]}[command]
    for out in (".", "..", str(work.parent)):
        args = [a.replace("{out}", out) for a in template]
        assert_refused(args, work, "current directory")


def test_output_that_contains_the_inputs_is_refused(work):
    # -o P --force where P holds both input models
    assert_refused(["repair", "revert", "-a", work / "aligned", "-f", work / "finetuned", "-o", work, "--force"],
                   work, "current directory")
    os.chdir(work.parent)
    assert_refused(["repair", "revert", "-a", work / "aligned", "-f", work / "finetuned", "-o", work, "--force"],
                   work, "contains an input")


def test_force_replaces_only_earlier_realign_outputs(work):
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("years of work")
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "mine", "--force"], work,
                   "realign did not write")
    (work / "empty").mkdir()
    for out in ("out", "out", "empty"):  # new, then an earlier realign output, then an empty directory
        r = runner.invoke(app, ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", out, "--force"])
        assert r.exit_code == 0, r.output
        assert (work / out / "realign.json").is_file()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(work):
    dead = work / ".out.999999999.abc.partial"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"0" * 1024)
    r = runner.invoke(app, ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"])
    assert r.exit_code == 0, r.output
    assert not dead.exists()
    assert not list(work.glob(".out.*.partial"))


def test_outputs_honour_the_umask(work):
    old = os.umask(0o022)
    try:
        r = runner.invoke(app, ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (work / "out").stat().st_mode & 0o777 == 0o755


def test_unknown_demo_method_is_refused_before_the_world_is_built(work):
    assert_refused(["demo", "--out", "d", "--methods", "bogus", "--size", "small"], work, "unknown method 'bogus'")
    assert not (work / "d").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-inf"])
def test_non_finite_parameters_are_refused(work, value):
    assert_refused(["repair", "resta", "-a", "aligned", "-f", "finetuned", "--base", "base", "-o", "out",
                    "--set", f"beta={value}"], work, "beta")
    assert not (work / "out").exists()


@pytest.mark.parametrize("size", ["5B", "5G", "2GiB", "0", "-1GB", "lots"])
def test_an_ambiguous_or_unreadable_shard_size_is_refused_before_any_work(work, size):
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out", "--max-shard-size", size],
                   work, repr(size))
    assert not (work / "out").exists()


def test_shard_sizes_follow_huggingface_hub():
    from realign.tensorio import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("1.5KB") == 1500
    assert parse_size("123") == 123 and parse_size(7) == 7


def test_a_fine_tune_of_another_family_is_refused(work):
    cfg = json.loads((work / "finetuned" / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (work / "finetuned" / "config.json").write_text(json.dumps(cfg))
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"], work, "qwen2", "llama")


# ----------------------------------------------------------------------------- decoding user input
def test_a_config_that_is_a_json_list_is_one_line(work):
    (work / "finetuned" / "config.json").write_text("[1, 2]")
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"], work, "JSON list",
                   "config.json")
    assert_refused(["inspect", "finetuned"], work, "JSON list")


def test_non_utf8_inputs_name_the_file_and_offset(work):
    (work / "bad.jsonl").write_bytes(b'{"prompt": "p", "response": "ok"}\n{"prompt": "\xff", "response": "x"}\n')
    assert_refused(["judge", "-i", "bad.jsonl", "-o", "v.jsonl"], work, "bad.jsonl:2", "byte 46", "UTF-8")
    (work / "sst2.csv").write_bytes(b"sentence,label\n\xfe\xff,1\n")
    assert_refused(["eval", "finetuned", "-o", "r.json", "--suite", "sst2", "--data", "sst2=sst2.csv"], work,
                   "sst2.csv:2", "UTF-8")
    (work / "cal.jsonl").write_bytes(b'{"prompt": "\xc3", "kind": "harmful", "safe_response": "no"}\n')
    assert_refused(["prepare", "refusal", "-a", "aligned", "-c", "cal.jsonl", "-o", "p"], work, "cal.jsonl:1",
                   "UTF-8")


def test_an_adapter_of_rank_zero_is_one_line(work):
    cfg = json.loads((work / "lora" / "adapter_config.json").read_text())
    cfg["r"] = 0
    (work / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "lora", "-o", "out"], work, "r = 0")


def test_a_pickle_that_weights_only_refuses_is_one_line(work):
    import shutil

    import torch

    ft = work / "pickled"
    shutil.copytree(work / "finetuned", ft)
    (ft / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": print}, ft / "pytorch_model.bin")
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "pickled", "-o", "out", "--allow-pickle"], work,
                   "weights_only", "safetensors")


def test_outputs_never_ask_for_remote_code(work):
    cfg = json.loads((work / "finetuned" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    cfg["trust_remote_code"] = True
    (work / "finetuned" / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"])
    assert r.exit_code == 0, r.output
    out = json.loads((work / "out" / "config.json").read_text())
    assert "auto_map" not in out and "trust_remote_code" not in out
    notes = json.loads((work / "out" / "realign.json").read_text())["report"]["notes"]
    assert any("auto_map" in n for n in notes)


def test_the_demo_directory_is_reused_and_foreign_ones_refused(work):
    from realign.demo import _demo_dir

    (work / "d").mkdir()
    (work / "d" / "summary.json").write_text("[]")
    (work / "d" / "world").mkdir()
    assert _demo_dir(work / "d") == (work / "d").resolve()  # an earlier demo: reused
    assert_refused(["demo", "--out", "notes.txt", "--size", "small"], work, "is a file")
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("x")
    assert_refused(["demo", "--out", "mine", "--size", "small"], work, "did not write")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header"])
def test_damaged_safetensors_are_one_line_for_inspect_and_repair(work, damage):
    weights = work / "finetuned" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":  # a copy cut short keeps its header
        weights.write_bytes(data[: len(data) - 1000])
        fragment = "truncated"
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
        fragment = "not a readable safetensors file"
    else:  # a header whose offsets do not fit the shapes
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 3]
        raw = json.dumps(header).encode()
        weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])
        fragment = "do not fit its shape"
    assert_refused(["inspect", "finetuned"], work, fragment)
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"], work, fragment)
    assert not (work / "out").exists()


# ----------------------------------------------------------------------------- reruns and kills
@pytest.mark.parametrize("method", ["revert", "safelora", "resta", "hdr", "antidote", "nlsr", "fgsn", "safetylock",
                                    "refusal", "safedelta"])
def test_reruns_are_bit_identical(work, method):
    rows = [{"prompt": f"w10 w{20 + i}", "kind": "harmful", "safe_response": "w1 w2", "unsafe_response": "w3 w4",
             "category": "c"} for i in range(6)]
    rows += [{"prompt": f"w60 w{70 + i}", "kind": "benign", "response": "w6 w7"} for i in range(6)]
    (work / "cal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"refusal": ["--set", "layer=1", "--set", "coeff=0.5"], "safetylock": ["--set", "k=2"],
             "fgsn": ["--set", "layers=0-1"]}.get(method, [])
    outs = []
    for i in range(2):
        args = ["repair", method, "-a", "aligned", "-b", "base", "--harmful", "base", "--unaligned", "base", "-f",
                "finetuned", "-c", "cal.jsonl", "-o", f"out{i}", "--device", "cpu", *extra]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        outs.append(work / f"out{i}")
    weights = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in outs[1].glob("*.safetensors"))
    for name in weights:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_kill_mid_write_leaves_nothing_behind(work, sig):
    """SIGTERM unwinds and removes the temporary output at once; kill -9 cannot be caught, so the
    next run that writes there removes what it left."""
    import signal
    import subprocess
    import sys
    import time

    # a slow transform keeps the writer busy long enough to be killed mid-write
    script = (
        "import signal, sys, time\n"
        "from realign import cli, tensorio\n"
        "real = tensorio.write_sharded\n"
        "def slow(*a, **k):\n"
        "    open('started', 'w').close(); time.sleep(30); return real(*a, **k)\n"
        "tensorio.write_sharded = slow\n"
        "import realign.api; realign.api.write_sharded = slow\n"
        "sys.argv = ['realign', 'repair', 'revert', '-a', 'aligned', '-f', 'finetuned', '-o', 'out']\n"
        "cli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (work / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert list(work.glob(".out.*.partial")), "the temporary output should exist mid-write"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"Traceback" not in err, err
    assert not (work / "out").exists()
    if sig == "SIGKILL":
        assert list(work.glob(".out.*.partial"))  # the killed run's leftovers ...
        r = runner.invoke(app, ["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"])
        assert r.exit_code == 0, r.output  # ... are gone after the next run
    assert not list(work.glob(".out.*.partial"))


@pytest.mark.parametrize(("model", "value"), [("finetuned", float("nan")), ("aligned", float("inf"))])
def test_non_finite_weights_in_an_input_are_refused_before_work(work, model, value):
    from safetensors.torch import load_file, save_file

    path = work / model / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"], work, name, "NaN or infinite")
    assert not (work / "out").exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB tmpfs (full before the tiny model fits) and a read-only one; skipped where this user
    cannot mount."""
    import subprocess

    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    mounted = []
    try:
        for path, opts in ((full, "size=64k"), (readonly, "ro,size=64k")):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
            mounted.append(path)
        yield full, readonly
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], capture_output=True)


def test_full_and_read_only_disks_are_one_line_and_leave_nothing(work, small_disk):
    full, readonly = small_disk
    for target, fragment in ((full, "not enough disk space"), (readonly, "Read-only")):
        assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", str(target / "out")], work,
                       fragment)
        assert not list(target.iterdir()), list(target.iterdir())


@pytest.mark.parametrize(("key", "value"), [("num_hidden_layers", -1), ("num_attention_heads", 0),
                                            ("hidden_size", "32"), ("num_key_value_heads", 3),
                                            ("num_hidden_layers", 10**30), ("intermediate_size", 1.5)])
def test_config_numbers_out_of_range_are_one_line(work, key, value):
    cfg = json.loads((work / "finetuned" / "config.json").read_text())
    cfg[key] = value
    (work / "finetuned" / "config.json").write_text(json.dumps(cfg))
    assert_refused(["inspect", "finetuned"], work, "config")
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "finetuned", "-o", "out"], work, "config")


def test_mismatched_models_are_one_line(work):
    from conftest import save_tiny

    save_tiny(work / "wide", hidden=48)
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "wide", "-o", "out"], work, "does not match")
    assert_refused(["repair", "resta", "-a", "aligned", "--unaligned", "wide", "-f", "finetuned", "-o", "out"], work,
                   "does not match")
    # an adapter put on a base it was not trained for
    assert_refused(["repair", "revert", "-a", "aligned", "-f", "lora", "--finetuned-base", "wide", "-o", "out"],
                   work, "lora")
    assert not (work / "out").exists()


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"prompt": "w1", "kind": "harmful"', "cal.jsonl:2: not valid JSON"),
    ('{"prompt": "w1", "kind": "evil"}', "cal.jsonl:2: 'kind' must be"),
    ('{"prompt": "", "kind": "benign"}', "cal.jsonl:2: 'prompt' must be"),
    ('{"prompt": "w1", "kind": "benign", "response": 5}', "cal.jsonl:2: 'response' must be a string"),
    ('[1, 2]', "cal.jsonl:2: expected a JSON object"),
])
def test_malformed_calibration_lines_are_one_line(work, line, fragment):
    (work / "cal.jsonl").write_text('{"prompt": "w1 w2", "kind": "harmful", "safe_response": "w3"}\n' + line + "\n")
    assert_refused(["prepare", "refusal", "-a", "aligned", "-c", "cal.jsonl", "-o", "p"], work, fragment)
    assert not (work / "p").exists()
