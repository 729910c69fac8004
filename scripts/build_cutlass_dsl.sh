#!/usr/bin/env bash
# Stage nvidia-cutlass-dsl 4.8.1 (CuTe DSL, CUDA 13 flavour) for the offline sm90 GPU machine
# (CPython 3.12, torch 2.11+cu130, cuda-python present, no cutlass): download the four wheels
# (nvidia-cutlass-dsl, -libs-core: the Python package, -libs-base: MLIR bindings, -libs-cu13: the
# 193 MB compiler library + the 44 MB runtime), unpack them into a site-dir layout, trim what the
# sm90 JIT path never loads, and write one solid tar.xz split into parts small enough to ride
# along with other carried files (a device call carries at most 64 MiB, repo included).
#
# usage: build_cutlass_dsl.sh [OUTDIR]     (default .cutlass_dsl; downloads cached in OUTDIR/cache)
# env:   PYTHON     interpreter running pip (default python3)
#        PYVER      target CPython (default 3.12, the GPU machine's); 3.11 builds a tree this
#                   2-core machine can import, to check the trim (VERIFY=1)
#        PART_MIB   largest part (default 20)
#        G0_MIB     parts up to this many MiB go to OUTDIR/g0, the rest to OUTDIR/g1 (default 20:
#                   g0 rides with the 38 MiB wheelhouse in one call, g1 (~41 MiB) in the next)
#        VERIFY=1   after trimming, import cutlass from the trimmed tree with $PYTHON and compile
#                   a tiny kernel for sm_90a (no GPU needed); needs PYVER = $PYTHON's version
#        VERIFY_ONLY=1 stops after the check (no archive)
#        KEEP_STAGE=1 keeps the staging dir
#
# OUTDIR gets g0/ and g1/, each with some of
#   cutlass_dsl.tar.xz.partNN   the archive, split (cat them in order); members are paths under
#                               the site dir: nvidia_cutlass_dsl/..., *.dist-info/...
#   and both with cutlass_dsl.manifest: one line per part: sha256, size, name (the installer,
#   scripts/install_cutlass_dsl.sh, checks each part and unpacks once all are there).
# Carry one group per device call (OUTDIR must be git-ignored: .gitignore has /.cutlass_dsl/).
#
# Trimmed (each one checked by VERIFY=1 on the 3.11 tree, 2026-12-06; the cp312 tree has the
# same files under other tags): cu13/lib/stubs (aarch64 Linux / QNX link-time stubs for AOT
# cross-compiling), cu13/lib/libcuda_dialect_runtime_static.a and cu13/include (AOT linking into
# C programs), *.pyi stubs, __pycache__. Kept: cutlass/jax (cutlass/__init__ imports it), the 193 MB
# _cutlass_ir .so as shipped (stripped already),
# libcute_dsl_runtime.so (the JIT's host launches go through it), iket (imported by
# cutlass.cute.experimental, which cutlass.cute imports).
set -euo pipefail
OUT=${1:-.cutlass_dsl}
mkdir -p "$OUT"; OUT=$(readlink -f "$OUT")
HERE=$(dirname "$(readlink -f "$0")")
CACHE=$OUT/cache; mkdir -p "$CACHE"
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
PART_MIB=${PART_MIB:-20}
VER=4.8.1
T0=$(date +%s)
phase() { echo "== $1  (+$(( $(date +%s) - T0 )) s)"; }

STAGE=$(mktemp -d "$OUT/stage.XXXXXX"); chmod 755 "$STAGE"
LOG=$(mktemp)
cleanup() { rm -f "$LOG"; [ "${KEEP_STAGE:-0}" = 1 ] && echo "(staging dir kept: $STAGE)" || rm -rf "$STAGE"; }
trap cleanup EXIT

phase "1. download $VER for CPython $PYVER -> $CACHE"
if ! "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
     -d "$CACHE" "nvidia-cutlass-dsl==$VER" "nvidia-cutlass-dsl-libs-core==$VER" \
     "nvidia-cutlass-dsl-libs-base==$VER" "nvidia-cutlass-dsl-libs-cu13==$VER" >"$LOG" 2>&1; then
  cat "$LOG" >&2; echo "ERROR: pip download failed" >&2; exit 1
fi
pick() { local f; f=$(ls "$CACHE"/$1 2>/dev/null | head -1); [ -n "$f" ] || { echo "ERROR: no $1 in $CACHE" >&2; exit 1; }; echo "$f"; }
WHEELS=(
  "$(pick "nvidia_cutlass_dsl-$VER-py3-none-any.whl")"
  "$(pick "nvidia_cutlass_dsl_libs_core-$VER-py3-none-any.whl")"
  "$(pick "nvidia_cutlass_dsl_libs_base-$VER-$TAG-$TAG-manylinux*_x86_64.whl")"
  "$(pick "nvidia_cutlass_dsl_libs_cu13-$VER-$TAG-$TAG-manylinux*_x86_64.whl")"
)
for w in "${WHEELS[@]}"; do printf '   %6.1f MiB  %s\n' "$(echo "$(stat -c %s "$w") / 1048576" | bc -l)" "$(basename "$w")"; done

phase "2. unpack -> $STAGE"
for w in "${WHEELS[@]}"; do unzip -qo "$w" -d "$STAGE"; done
RAW0=$(du -sb "$STAGE" | cut -f1)

phase "3. trim"
P=$STAGE/nvidia_cutlass_dsl
rm -rf "$P/cu13/lib/stubs" "$P/cu13/lib/libcuda_dialect_runtime_static.a" "$P/cu13/include"

find "$STAGE" -name '*.pyi' -delete
find "$STAGE" -depth -type d -name __pycache__ -exec rm -rf {} +
RAW=$(du -sb "$STAGE" | cut -f1)
awk -v a="$RAW0" -v b="$RAW" 'BEGIN{printf "   unpacked %.1f MiB -> %.1f MiB\n", a/1048576, b/1048576}'

if [ "${VERIFY:-0}" = 1 ]; then
  phase "3b. verify: import + compile a tiny kernel for sm_90a from the trimmed tree ($PY)"
  CUTE_DSL_ARCH=sm_90a CUTE_SITE=$STAGE "$PY" "$HERE/cute_smoke.py"
  [ "${VERIFY_ONLY:-0}" = 1 ] && { phase "VERIFY_ONLY: no archive written"; exit 0; }
fi

phase "4. tar | xz -9e -T2, split into ${PART_MIB} MiB parts"
rm -rf "$OUT/g0" "$OUT/g1" "$OUT"/cutlass_dsl.tar.xz.part* "$OUT/cutlass_dsl.manifest"
tar -C "$STAGE" --sort=name --owner=0 --group=0 --numeric-owner -cf - . \
  | nice xz -9e -T2 | split -b "${PART_MIB}M" -d -a 2 - "$OUT/cutlass_dsl.tar.xz.part"
( cd "$OUT" && for f in cutlass_dsl.tar.xz.part*; do echo "$(sha256sum "$f" | cut -d' ' -f1) $(stat -c %s "$f") $f"; done ) > "$OUT/cutlass_dsl.manifest"
TOTAL=$(awk '{s+=$2} END{print s}' "$OUT/cutlass_dsl.manifest")
awk -v s="$TOTAL" -v r="$RAW" 'BEGIN{printf "   total %.2f MiB (%d bytes) for %.1f MiB unpacked\n", s/1048576, s, r/1048576}'

phase "5. groups: g0 <= ${G0_MIB:-20} MiB, g1 the rest"
mkdir -p "$OUT/g0" "$OUT/g1"
acc=0
while read -r _ size name; do
  acc=$((acc + size))
  if [ "$acc" -le $(( ${G0_MIB:-20} * 1048576 )) ]; then g=g0; else g=g1; fi
  mv "$OUT/$name" "$OUT/$g/"
  printf '   %s/%-26s %6.2f MiB\n' "$g" "$name" "$(echo "$size / 1048576" | bc -l)"
done < "$OUT/cutlass_dsl.manifest"
cp "$OUT/cutlass_dsl.manifest" "$OUT/g0/"; mv "$OUT/cutlass_dsl.manifest" "$OUT/g1/"
du -sb "$OUT/g0" "$OUT/g1" | awk '{printf "   %-40s %6.2f MiB\n", $2, $1/1048576}'
phase "done: $OUT/g0, $OUT/g1 (carry one per call; scripts/install_cutlass_dsl.sh DIR takes them)"
