"""Does a weight step teach? Iris as a one-call Predict task over data files, a `w+` step on gold labels.

    python bench/learning.py --run-dir runs/learning                      # the small budget's LoRA
    python bench/learning.py --run-dir runs/learning-paper -- --no-stratify --learning-rate 3e-4

Writes Iris's 50/50/50 split (the built-in task's) as CSV files, then runs `tandem optimize --data ...
--program predict --strategy w+ --samples 0 --budget small`: every training flower whose greedy answer is
wrong is rationalized with its gold species as a hint, so the step trains on gold-labelled calls, class
balanced. Prints the learning curve (val and train accuracy at every checkpoint, the loss per optimizer
step); the run folder's report has it as charts. Flags after `--` go to `tandem optimize`.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from tandem.tasks import load_task
from tandem.tasks.iris import FEATURES, INSTRUCTIONS, SPECIES


def write_split(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=[*FEATURES, "species"])
        out.writeheader()
        out.writerows({k: row[k] for k in (*FEATURES, "species")} for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/learning", help="where the run folder goes")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="small")
    parser.add_argument("extra", nargs="*", help="more flags for tandem optimize (after --)")
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    data = run_dir.parent / f"{run_dir.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    task = load_task("iris")
    for name, rows in (("train", task.train), ("val", task.val), ("test", task.test)):
        write_split(rows, data / f"{name}.csv")
    command = [sys.executable, "-m", "tandem", "optimize", "--data", str(data / "train.csv"), "--val",
               str(data / "val.csv"), "--test", str(data / "test.csv"),
               "--signature", f"{', '.join(FEATURES)} -> species: {'|'.join(SPECIES)}", "--instructions", INSTRUCTIONS,
               "--program", "predict", "--metric", "exact", "--model", args.model, "--strategy", "w+", "--samples", "0",
               "--budget", args.budget, "--run-dir", str(run_dir), *args.extra]
    print(" ".join(command[1:]), flush=True)
    done = subprocess.run(command)
    if done.returncode:
        return done.returncode

    results = json.loads((run_dir / "results-w+.json").read_text())
    step = results["steps"][-1]["details"]
    training = step.get("training", {})
    print(f"\n{step['notes'][0]}; {training.get('steps')} optimizer steps, {training.get('seconds')} s "
          f"({training.get('tokens_per_second')} tok/s)")
    print("| checkpoint | epoch | val % | train % | answers on val |\n|---|---|---|---|---|")
    for c in step.get("checkpoints", []):
        name = "start" if c["step"] == 0 else f"step {c['step']}"
        train = "-" if c.get("train") is None else f"{c['train']:.0f}"
        answers = ", ".join(f"{k} {n}" for k, n in c["answers"].items())
        print(f"| {name}{' (kept)' if c['step'] == step.get('kept_step') else ''} | {c['epoch']:g} | {c['val']:.0f} | "
              f"{train} | {answers} |")
    losses = training.get("step_losses", [])
    print("loss per optimizer step:", " ".join(f"{x:.2f}" for x in losses))
    print("test:", results["steps"][-1]["test"], "(start:", results["steps"][0]["test"], ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
