"""Package a built world as the checkpoints realign ships (maintainers only).

    python scripts/ship_world.py WORLD_DIR [--dest src/realign/world/shipped]

Writes DEST/SIZE-seedSEED/: every model's weights as float16 safetensors (the world is trained in
float32; realign converts them back to float32 when it installs the world), configs, one copy of
the tokenizer files, the calibration, task and evaluation data, world.json, and manifest.json with
the sha256 of every file, which ``realign demo`` checks before it uses them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from realign.world.build import ADAPTERS, MODELS, SHIPPED, TOKENIZER_FILES, WorldPaths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("--dest", type=Path, default=SHIPPED)
    args = ap.parse_args()
    world = WorldPaths(args.world.resolve())
    if not world.complete():
        raise SystemExit(f"{world.root} is not a complete world: build it with `realign world build`")
    info = world.info()
    out = args.dest / f"{info['size']}-seed{info['seed']}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in MODELS:
        src, dst = world.model(name), out / name
        dst.mkdir()
        weights = "adapter_model.safetensors" if name in ADAPTERS else "model.safetensors"
        tensors = load_file(str(src / weights))
        save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(dst / weights), metadata={"format": "pt"})
        for f in ("config.json", "generation_config.json", "adapter_config.json"):
            if (src / f).is_file():
                shutil.copy(src / f, dst / f)
    (out / "tokenizer").mkdir()
    for f in TOKENIZER_FILES:
        if (world.aligned / f).is_file():
            shutil.copy(world.aligned / f, out / "tokenizer" / f)
    for rel in ("calibration.jsonl", "task.jsonl", "world.json", "eval"):
        src = world.root / rel
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / rel)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {"size": info["size"], "seed": info["seed"], "recipe_hash": info["recipe_hash"],
                "weights_dtype": "float16", "files": {str(p.relative_to(out)): sha256(p) for p in files}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {len(files)} files, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
