#!/usr/bin/env bash
# Packs what the lent GPU machine lacks (benchmarks/gpu_carry.txt: DALI, its CUDA libraries, omegaconf)
# into as few parts as one device call each can carry; benchmarks/gpu_install.py unpacks them there.
# Run here, from anywhere in the checkout:
#
#   bash benchmarks/gpu_carry.sh                    # -> .device-carry/part-NN, SHA256SUMS, MANIFEST
#   bash benchmarks/gpu_carry.sh --wheels DIR       # pack wheels already in DIR (no download)
#   bash benchmarks/gpu_carry.sh --python 3.11      # for a rehearsal of the install on this machine
#
# Why not ../shared/gpu/pack-dali.sh (5 parts of the wheels as they are): the wheels hold DALI's
# extension modules for 8 Pythons (76 MB of the 610 MB unpacked) and are deflate-compressed; unpacked,
# with only the target Python's modules, and xz-compressed they are 174 MB instead of 257 MB: 3 calls
# instead of 5, each machine-warm gap one fewer (measured 2026-11-29 here, DALI 2.4.0). It also
# carries omegaconf, which the GPU image lacks (pack-dali.sh did not: nothing of fast_ressl imports
# without it). The unpacked tree is what pip would install (no .data scripts), so it is extracted
# straight into the machine's site-packages.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/.device-carry" pyver=3.12 wheels="" level=9
# a call carries at most 64 MiB with the working tree (~1-2 MB): parts of at most 60 MiB
part_max=$((60 * 1024 * 1024))
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --python) pyver="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --level) level="$2"; shift 2 ;;
    --part-mib) part_max=$(($2 * 1024 * 1024)); shift 2 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_carry: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
case "$pyver" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "gpu_carry: --python wants X.Y, got '$pyver'" >&2; exit 2 ;; esac
for tool in xz sha256sum unzip split; do
  command -v "$tool" >/dev/null || { echo "gpu_carry: '$tool' is needed here and missing" >&2; exit 2; }
done
py="${PYTHON:-python3}"
tag="cpython-${pyver/./}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/site"

if [ -z "$wheels" ]; then
  wheels="$stage/wheels"
  echo "gpu_carry: downloading $(grep -cv '^\s*\(#\|$\)' "$here/benchmarks/gpu_carry.txt") wheels for Python $pyver ..."
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" \
    -r "$here/benchmarks/gpu_carry.txt" 2>&1 | { grep -v "is ignored" || true; }
fi
shopt -s nullglob
whls=("$wheels"/*.whl)
[ ${#whls[@]} -gt 0 ] || { echo "gpu_carry: no wheels in $wheels" >&2; exit 2; }
for w in "${whls[@]}"; do unzip -q -o "$w" -d "$stage/site"; done
# Extension modules built for other Pythons never load there; .data holds scripts pip would put in bin/.
dropped=$(find "$stage/site" -type f -name '*.cpython-3*' ! -name "*.${tag}-*" -printf '%s\n' | awk '{s+=$1} END {print s+0}')
find "$stage/site" -type f -name '*.cpython-3*' ! -name "*.${tag}-*" -delete
find "$stage/site" -maxdepth 1 -type d -name '*.data' -exec rm -rf {} +
unpacked=$(du -sb "$stage/site" | cut -f1)

rm -rf "$out" && mkdir -p "$out"
echo "gpu_carry: compressing $((unpacked / 1000000)) MB (xz -$level; a few minutes on 2 cores) ..."
tar -C "$stage/site" --sort=name --owner=0 --group=0 -cf - . | xz -"$level" -T0 > "$stage/carry.tar.xz"
size=$(stat -c %s "$stage/carry.tar.xz")
n=$(( (size + part_max - 1) / part_max ))
split -n "$n" -d -a 2 "$stage/carry.tar.xz" "$out/part-"
( cd "$out" && sha256sum part-* > SHA256SUMS )
{
  echo "python $pyver ($tag); $(( size / 1000000 )) MB xz in $n parts; unpacked $((unpacked / 1000000)) MB;" \
       "dropped $((dropped / 1000000)) MB of other Pythons' extension modules"
  for w in "${whls[@]}"; do basename "$w"; done
} > "$out/MANIFEST"
echo "gpu_carry: $(head -1 "$out/MANIFEST")"
ls -l "$out"/part-* | awk '{printf "  %s  %.1f MiB\n", $NF, $5 / 1048576}'
rel="${out#"$here"/}"
echo "Carry them one per call, back to back (the machine goes back 30 s after a call):"
last=$(ls "$out"/part-* | tail -1)
for p in "$out"/part-*; do
  rp="${p#"$here"/}"
  if [ "$p" != "$last" ]; then
    echo "  run(carry=[\"$rp\"], timeout_s=120, command=\"mkdir -p /tmp/dali-parts && cp $rp /tmp/dali-parts/\")"
  else
    echo "  run(carry=[\"$rp\", \"$rel/SHA256SUMS\"], timeout_s=590, command=\"bash benchmarks/gpu_check.sh\")"
  fi
done
echo "gpu_check.sh unpacks them first (benchmarks/gpu_install.py: the last part beside SHA256SUMS, the"
echo "others in /tmp/dali-parts); by hand: python3 benchmarks/gpu_install.py --sums $rel/SHA256SUMS"
