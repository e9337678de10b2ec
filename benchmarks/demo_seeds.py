"""The embedded demo for a list of seeds: does the default recipe learn whatever the seed?

    python benchmarks/demo_seeds.py --seeds 0-7 [--demo-config FILE] [--out /tmp/demo_seeds]

Each seed runs the whole demo (data, the base: shipped, or trained with vendored_base = false; DoRA phase,
GGUF export, evaluation with the adapters off and on and of the GGUF files in llama.cpp) as `stratos-lite
demo` does, with only the seed changed
(and FILE's settings laid over demo.toml, as `--demo-config` does). One row per seed: held-out Spearman
(torch with adapters, and each GGUF), MAE, the profile-awareness spread against the truth's, parse
failures, the base's verdict errors (its adapters-off completions read back: how many of the "matches /
differs", "listed / unlisted", "same / elsewhere" verdicts disagree with the true reasoning's), and wall
time. Then the worst seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stratos_lite.demo.base import verdict_errors
from stratos_lite.demo.config import DemoConfig
from stratos_lite.demo.run import run_demo


def seed_list(text: str) -> list[int]:
    """'0-7' or '0,3,5' (or both: '0-3,9')."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def base_verdict_errors(folder: Path) -> dict[str, int]:
    """The adapters-off model's verdict errors on the seed's held-out records, read from its completions."""
    truth = [json.loads(line)["reasoning"] for line in (folder / "data" / "eval.jsonl").read_text().splitlines()]
    written = [json.loads(line)["raw"] for line in (folder / "eval_before" / "predictions.jsonl").read_text()
               .splitlines()]
    return verdict_errors(truth, written)


def run_seed(seed: int, overlay: Path | None, out: Path) -> dict:
    config = DemoConfig.from_toml(overlay) if overlay else DemoConfig()
    config.seed, config.out_dir = seed, str(out / f"seed-{seed}")
    start = time.perf_counter()
    summary = run_demo(config)
    seconds = time.perf_counter() - start
    folder = Path(config.out_dir)
    after = summary["after"]
    return {"seed": seed, "spearman": after["spearman"], "mae": after["mae"],
            "gguf_spearman": {name: row["spearman"] for name, row in summary.get("gguf", {}).items()},
            "gguf_kl": {name: row.get("kl_divergence") for name, row in summary.get("gguf", {}).items()},
            "gguf_mb": {name: row.get("size_mb") for name, row in summary.get("gguf", {}).items()},
            "chosen_gguf": summary.get("chosen_gguf"),
            "spread": after.get("predicted_spread"), "truth_spread": after.get("truth_spread"),
            "parse_failures": after["parse_failures"],
            "adapters_off_spearman": summary["before"]["spearman"],
            "base_verdict_errors": base_verdict_errors(folder),
            "seconds": seconds}


def format_row(row: dict) -> str:
    def number(value):
        return "n/a" if value is None else f"{value:.3f}"

    ggufs = " / ".join(number(v) for v in row["gguf_spearman"].values()) or "n/a"
    errors = row["base_verdict_errors"]
    spread = "n/a" if row["spread"] is None else f"{row['spread']:.2f} / {row['truth_spread']:.2f}"
    return (f"| {row['seed']} | {number(row['spearman'])} | {ggufs} | {number(row['adapters_off_spearman'])} | "
            f"{number(row['mae'])} | {spread} | {row['parse_failures']} | "
            f"{errors['sector']} / {errors['topic']} / {errors['country']} | {row['seconds']:.0f} s |")


def print_quant_table(rows: list[dict]) -> None:
    """Each GGUF file's Spearman and next-token KL from the torch model, seed by seed, and the file chosen."""
    names = list(rows[0]["gguf_spearman"])
    if not names:
        return
    print("\n| file | MB | " + " | ".join(f"seed {r['seed']}: Spearman, KL" for r in rows) + " |")
    print("|---|---:|" + "---:|" * len(rows))
    for name in names:
        cells = []
        for r in rows:
            kl = r["gguf_kl"].get(name)
            cells.append(f"{r['gguf_spearman'][name]:.3f}, " + ("n/a" if kl is None else f"{kl:.3g}"))
        print(f"| {name} | {rows[0]['gguf_mb'][name]:.2f} | " + " | ".join(cells) + " |")
    print("| torch model | | " + " | ".join(f"{r['spearman']:.3f}" for r in rows) + " |")
    print("| chosen | | " + " | ".join(str(r["chosen_gguf"]) for r in rows) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-7"))
    parser.add_argument("--demo-config", type=Path, help="settings laid over demo.toml (the seed is set here)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/demo_seeds"))
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.demo_config, args.out))
        (args.out / "rows.jsonl").open("a").write(json.dumps(rows[-1]) + "\n")
    print("\n| seed | Spearman (torch, adapters on) | Spearman (GGUF files) | adapters off | MAE | spread / truth | "
          "parse failures | base verdict errors (sector / topic / country, of each kind's count) | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(format_row(row))
    print_quant_table(rows)
    worst = min(rows, key=lambda r: -1.0 if r["spearman"] is None else r["spearman"])
    print(f"\nworst seed: {worst['seed']} (Spearman {worst['spearman']}, MAE {worst['mae']:.3f})")


if __name__ == "__main__":
    main()
