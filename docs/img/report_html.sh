#!/usr/bin/env bash
# docs/img/report_html.png: the report page of a real training run, as headless Chromium shows it.
# A 6-epoch ADR run (adr/short-schedule) of small_cnn on 1,024 CIFAR-10 training images (a few CPU minutes);
# needs Debian's `chromium` (apt-get install chromium). Run from the repository root:
#   ROBUSTKD_SHARED=../shared bash docs/img/report_html.sh
set -euo pipefail
shared="${ROBUSTKD_SHARED:-../shared}"
run="${1:-runs/report_screenshot}"
python recipes/cifar_adr.py --preset adr/short-schedule --data-dir "$shared/data/cifar10/plain_text" \
    --model small_cnn --epochs 6 --max-train-samples 1024 --max-eval-samples 256 \
    --final-attacks "pgd20;autoattack:version=custom,attacks=apgd-ce" --output-dir "$run" --overwrite --no-progress
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,2300 \
    --screenshot="$PWD/docs/img/report_html.png" "file://$(cd "$run" && pwd)/report.html"
