#!/usr/bin/env bash
# The main job (README): the whole optimus_ckpt story with the example app, on CPU, in a few
# minutes on two cores. Sets itself up (.venv + install, like the test command), then:
#   1. trains 200 steps straight (the reference);
#   2. trains again and preempts it with SIGTERM: it saves a checkpoint and exits 143;
#   3. reruns in the same directory: it resumes by itself; the loss curve and the final weights
#      must be bit-identical to the reference's (plot: runs/demo/resume_vs_straight.png);
#   4. fine-tunes on a 4-class task (a new head, reported as a shape mismatch), against a
#      from-scratch baseline;
#   5. evaluates the reference's weights (trains and saves nothing);
#   6. sweeps -m load_strategy=resume,finetune,eval from the reference's step-100 checkpoint.
# Exits non-zero if any step fails or the resumed run is not identical to the reference.
# Usage: bash examples/demo.sh            (outputs under runs/demo; DEMO_DIR=... to move them)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source .ci/venv.sh

demo="${DEMO_DIR:-$root/runs/demo}"
if [ -e "$demo" ]; then
  if [ ! -f "$demo/.optimus-demo" ]; then
    echo "$demo exists and was not made by this demo; set DEMO_DIR to another path." >&2
    exit 2
  fi
  rm -rf "$demo"
fi
mkdir -p "$demo"
touch "$demo/.optimus-demo"
demo="$(cd "$demo" && pwd)"
started=$SECONDS

train() { python examples/train.py "$@"; }
banner() { printf '\n\033[1m==== %s\033[0m\n' "$*"; }

banner "1/6  Train 200 steps without interruption (the reference): $demo/straight"
train hydra.run.dir="$demo/straight"

banner "2/6  Train the same run again, and preempt it with SIGTERM after its first checkpoint"
log="$demo/interrupted.log"
# step_sleep slows the steps down (it changes no numbers), so the signal lands mid-run.
# (python itself in the background, not a shell function, so that $! is python's pid.)
python examples/train.py hydra.run.dir="$demo/resumed" trainer.step_sleep=0.02 > >(tee "$log") 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT # never leave it running if the demo stops here
until grep -q "saved checkpoint" "$log" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the run ended before its first checkpoint" >&2
    exit 1
  fi
  sleep 0.1
done
echo ">>> kill -TERM $pid"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
trap - EXIT
sleep 0.2 # let tee finish printing
if [ "$rc" -ne 143 ]; then
  echo "expected the preempted run to save and exit 143 (128+SIGTERM), got $rc" >&2
  exit 1
fi
echo ">>> exit status $rc; checkpoints left behind:"
ls "$demo/resumed/checkpoints"

banner "3/6  Rerun in the same directory: it resumes by itself from its newest checkpoint"
train hydra.run.dir="$demo/resumed"
identical=0
python examples/plot.py "$demo/straight/loss.csv" "$demo/resumed/loss.csv" \
  --out "$demo/resume_vs_straight.png" --require-identical || identical=$?

banner "4/6  Fine-tune on task=coarse (4 classes: a new head) from the reference's weights"
train hydra.run.dir="$demo/finetune" load_strategy=finetune task=coarse \
  checkpoint.load_from="$demo/straight/checkpoints"
echo ">>> the same task from scratch, for comparison (load_strategy=scratch loads nothing)"
train hydra.run.dir="$demo/scratch" load_strategy=scratch task=coarse

banner "5/6  Evaluate the reference's final weights (load_strategy=eval: nothing trained or saved)"
train hydra.run.dir="$demo/eval" load_strategy=eval checkpoint.load_from="$demo/straight/checkpoints"

banner "6/6  Sweep: -m load_strategy=resume,finetune,eval from the reference's step-100 checkpoint"
train -m load_strategy=resume,finetune,eval \
  checkpoint.load_from="$demo/straight/checkpoints/step_0000000100" hydra.sweep.dir="$demo/sweep"

banner "Summary"
python - "$demo" "$identical" <<'EOF'
import json
import os
import sys

demo, identical = sys.argv[1], sys.argv[2] == "0"


def summary(name):
    with open(os.path.join(demo, name, "summary.json")) as f:
        return json.load(f)


runs = [
    ("straight", "reference, 200 steps"),
    ("resumed", "SIGTERM, then resumed"),
    ("finetune", "finetune -> coarse"),
    ("scratch", "scratch on coarse"),
    ("eval", "eval of the reference"),
]
for i in range(3):
    job = os.path.join("sweep", str(i))
    runs.append((job, f"sweep: {summary(job)['load_strategy']}"))
print(f"{'run':<26} {'task':<7} {'steps':<9} {'eval acc':>8} {'eval loss':>9}  weights sha256")
for name, label in runs:
    s = summary(name)
    steps = f"{s['start_step']}->{s['final_step']}" if s["mode"] == "train" else "-"
    print(
        f"{label:<26} {s['task']:<7} {steps:<9} {s['eval']['accuracy']:>8.3f} "
        f"{s['eval']['loss']:>9.4f}  {s['weights_sha256'][:16]}"
    )
same_weights = summary("straight")["weights_sha256"] == summary("resumed")["weights_sha256"]
sweep_resume = next(
    summary(os.path.join("sweep", str(i)))
    for i in range(3)
    if summary(os.path.join("sweep", str(i)))["load_strategy"] == "resume"
)
print()
print(f"resumed loss curve identical to the reference at every step: {'yes' if identical else 'NO'}")
print(f"resumed final weights bit-identical to the reference:        {'yes' if same_weights else 'NO'}")
print(
    "sweep's resume job (from step 100, another dir) bit-identical:  "
    + ("yes" if sweep_resume["weights_sha256"] == summary("straight")["weights_sha256"] else "NO")
)
print(f"plot: {os.path.join(demo, 'resume_vs_straight.png')}")
print(f"load reports: {demo}/*/load_report.json, {demo}/sweep/*/load_report.json")
sys.exit(0 if identical and same_weights else 1)
EOF
status=$?
echo "demo took $((SECONDS - started)) s (outputs in $demo)"
exit $status
