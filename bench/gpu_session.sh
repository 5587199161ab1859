#!/usr/bin/env bash
# One GPU session: install offline, run bench/gpu_throughput.py (every part), make the tables, then the
# transformers-5 check of the text tests if time is left. Run from the repository root:
#
#     OUT=/tmp/gpu-out bash bench/gpu_session.sh          # LIMIT_S=420 BUDGET_S=330 by default
#     DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_session.sh    # the same at toy size on a CPU
#
# It expects a git-ignored folder .gpu/ beside the code (or GPU_DIR=...) holding
#   whl/       wheels for what the machine lacks (pyautoattack, datasets and its missing dependencies,
#              setuptools and wheel for the offline build, pytest-timeout), installed with --no-deps into
#              /tmp/site (on PYTHONPATH); robustkd itself is built and installed there too, so the
#              robustkd.tasks entry points are registered;
#   ref/       checkouts of yuyuwu5/ADR, zhaoshiji123/MTARD and zhaoshiji123/MTARD-extension (run, never copied);
#   shared/    data/cifar10/plain_text (the CIFAR-10 parquet subset), data/sst2/data and
#              models/all-MiniLM-L6-v2 (config.json and tokenizer files; no weights).
# Everything it writes comes back under $OUT: log.txt, gpu.json (rewritten after each part), gpu.md
# (python bench/gpu_table.py gpu.json), pytest.txt, accuracy-logs.txt.
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
G=${GPU_DIR:-.gpu}
LIMIT_S=${LIMIT_S:-420}
BUDGET_S=${BUDGET_S:-330}
T0=$(date +%s)
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export ROBUSTKD_SHARED=$PWD/$G/shared TQDM_DISABLE=1
PY=${PYTHON:-python3}
left() { echo $(( LIMIT_S - ($(date +%s) - T0) )); }

for need in "$G/whl" "$G/ref/ADR/src" "$G/ref/MTARD/mtard" "$G/ref/MTARD-extension" "$G/shared/data/cifar10/plain_text"; do
  [ -e "$need" ] || { echo "error: $need is missing: prepare $G/ as bench/gpu_session.sh's header says"; exit 2; }
done
DRY=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  DRY=(--dry-run)
  echo "== dry run: toy sizes on the CPU, installs skipped (the current environment is used)"
else
  echo "== install ($(date +%T))"
  SITE=${SITE:-/tmp/site}
  $PY -m pip install -q --no-index --no-deps --target "$SITE" "$G"/whl/*.whl || { echo "error: wheel install failed"; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . || { echo "error: robustkd install failed"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true
fi
$PY - <<'EOF' || exit 1
import importlib.metadata as md, torch, transformers
import robustkd
from robustkd import create_task  # noqa: F401
eps = sorted(e.name for e in md.entry_points(group="robustkd.tasks"))
print(f"robustkd {robustkd.__version__} from {robustkd.__file__}; task entry points {eps}; torch {torch.__version__} "
      f"cuda {torch.cuda.is_available()}; transformers {transformers.__version__}")
assert eps, "the robustkd.tasks entry points are not registered"
EOF

echo "== bench/gpu_throughput.py ($(date +%T), $(left) s left)"
timeout $(( BUDGET_S + 30 )) $PY bench/gpu_throughput.py "${DRY[@]}" --budget-s "$BUDGET_S" \
  --refs "$G/ref" --data-dir "$G/shared/data/cifar10/plain_text" --minilm "$G/shared/models/all-MiniLM-L6-v2" \
  --output "$OUT/gpu.json" --work-dir /tmp/gpu-bench-work ${BENCH_ARGS:-} > "$OUT/gpu-stdout.json"
echo "gpu_throughput.py exit status $?"
for f in /tmp/gpu-bench-work/accuracy/*.log; do [ -e "$f" ] && { echo "--- $f"; tail -n 40 "$f"; }; done > "$OUT/accuracy-logs.txt"
grep -h -A8 '"run_config"' "$OUT/gpu.json" | head -n 60 || true
$PY bench/gpu_table.py "$OUT/gpu.json" -o "$OUT/gpu.md" || true

echo "== transformers $($PY -c 'import transformers; print(transformers.__version__)'): text tests ($(date +%T), $(left) s left)"
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 10 )) $PY -m pytest tests/test_speed.py::test_a_training_step_on_the_gpu_never_synchronises \
    tests/test_hf.py tests/test_text.py -q -m "not textattack" -p no:cacheprovider -o addopts="-ra" \
    --timeout 120 > "$OUT/pytest.txt" 2>&1
  echo "pytest exit status $? (124: stopped by the time limit)"; tail -n 15 "$OUT/pytest.txt"
else
  echo "skipped: $(left) s left" | tee "$OUT/pytest.txt"
fi
echo "== done in $(( $(date +%s) - T0 )) s"
