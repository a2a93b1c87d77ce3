#!/usr/bin/env bash
# Starts the app under Xvfb on the demo model, runs the IOI sweep, and saves a screenshot.
#   scripts/screenshot.sh OUT.png [SECONDS_TO_WAIT] [extra patchbay gui args...]
#   PATCHBAY_SCREENSHOT_MODEL=path  another model than the demo one
# Needs: xvfb xauth imagemagick (apt). Uses the release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-docs/screenshot.png}"
wait="${2:-20}"
shift $(( $# > 2 ? 2 : $# )) || true
model="${PATCHBAY_SCREENSHOT_MODEL:-$(scripts/fetch-test-model.sh)}"
# Shown in the model field: relative to the repository, so the picture names no machine's folders.
model="${model#"$PWD"/}"
bin="${PATCHBAY_BIN:-./target/release/patchbay}"
[ -x "$bin" ] || cargo build --release --locked
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
display=":$(( 90 + RANDOM % 9 ))"
Xvfb "$display" -screen 0 1400x860x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true' EXIT
sleep 1
DISPLAY="$display" PATCHBAY_DEMO_MODEL="$model" "$bin" gui --model "$model" --run "$@" &
app=$!
sleep "$wait"
if [ -n "${PATCHBAY_CLICK:-}" ]; then
  # "X Y": click a heatmap cell so the inspector shows it, then move the pointer away.
  DISPLAY="$display" xdotool mousemove $PATCHBAY_CLICK click 1 sleep 0.5 mousemove 1390 850 sleep 1
fi
mkdir -p "$(dirname "$out")"
DISPLAY="$display" import -window root "$out"
echo "$out"
