"""Build the shipped warm-up base of a CPU recipe (`make warmup-base`): the recipe's own warm-up, run by the
project's warm-up code, written to the recipe's `warmup.prebuilt` directory with its fingerprint.

    python tools/build_warmup_base.py [--config recipes/tiny_cpu.yaml] [overrides ...]

Runs whenever the warm-up changes: tests/test_warmup.py fails while the shipped base's fingerprint (the
warm-up's settings and a digest of its code) differs from what the recipe would train. The old base is
replaced only once the new one is complete (a temporary directory, then a rename).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "recipes" / "tiny_cpu.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. warmup.prebuilt=...")
    args = parser.parse_args(argv)

    from megatron_hbpo.config import ConfigError, load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides, world_size=1)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    w = recipe.warmup
    if not w.prebuilt or not w.steps:
        print(f"config error: {args.config}: warmup.prebuilt: the recipe names no prebuilt base to build "
              f"(warmup.prebuilt={w.prebuilt}, warmup.steps={w.steps})", file=sys.stderr)
        return 2
    target = Path(w.prebuilt)
    staging = target.with_name(f".{target.name}.building")
    shutil.rmtree(staging, ignore_errors=True)

    from megatron_hbpo import runtime

    runtime.configure()
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.train import load_tokenizer_and_config
    from megatron_hbpo.warmup import run_warmup

    parallel.initialize(recipe.parallel, recipe.train.seed)
    tokenizer, hf_config = load_tokenizer_and_config(recipe.model, recipe.data, summary_markers=recipe.tree_rows)
    start = time.perf_counter()
    # The same call as a run's, with no prebuilt base to reuse and the staging directory as warmup.dir.
    built = run_warmup(dataclasses.replace(w, prebuilt=None, dir=str(staging)),
                       model=recipe.model, parallel=recipe.parallel, optimizer=recipe.optimizer, data=recipe.data,
                       algo=recipe.algo, micro_batch_tokens=recipe.train.micro_batch_tokens,
                       checkpoint_dir=recipe.checkpoint.dir, hf_config=hf_config, tokenizer=tokenizer)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {target} ({w.steps} steps in {time.perf_counter() - start:.0f} s, final loss "
          f"{built.record['final_loss']:.4f}, slip rate {100 * built.record['slip_rate']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
