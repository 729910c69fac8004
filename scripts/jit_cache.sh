# JIT caches carried from one lease to the next (the device machine is fresh each session: our
# server's Triton compiles took 199 s of a cold start against 60-73 s warm, native's DeepGEMM /
# TileLang JIT 368 s against ~90 s; 2026-12-07). Everything compiles under /tmp/jitcache:
# Triton (TRITON_CACHE_DIR, ours and native's Triton kernels), DeepGEMM, TileLang, TVM-FFI
# (../shared/device/install_native_extra.sh). Triton's cache records absolute paths, so the
# caches go back to the same place.
#
#   source scripts/jit_cache.sh; jit_cache_restore
#       (scripts/device_setup.sh does it): TRITON_CACHE_DIR set; the carried parts
#       .jitcache/NAME.tar.xz.partNN unpacked into /tmp/jitcache once per machine
#   bash scripts/jit_cache.sh save NAME [DIR ...]
#       its own short call at the end of a lease, on the warm machine: /tmp/jitcache/DIR ...
#       (default: every folder there) as $OUT/NAME.tar.xz.partNN, 15 MiB parts (a call brings
#       back at most 8 files of 16 MiB), compiler IR left out (only the binaries and their
#       metadata are loaded); then here: `mkdir -p .jitcache && cp <files_at>/NAME.tar.xz.part*
#       .jitcache/` (ignored by .git/info/exclude) and carry `.jitcache` in the next lease's
#       calls (counted in the 64 MiB a call carries).

JIT_DIR=/tmp/jitcache

jit_cache_restore() {
    export TRITON_CACHE_DIR="$JIT_DIR/triton"
    mkdir -p "$TRITON_CACHE_DIR"
    [ -f "$JIT_DIR/.restored" ] && return 0  # a warm machine: restored by an earlier call
    local name
    for name in $(find .jitcache -maxdepth 1 -name '*.tar.xz.part*' 2>/dev/null \
                  | sed 's|.*/||; s|\.tar\.xz\.part.*||' | sort -u); do
        if cat .jitcache/"$name".tar.xz.part* | xz -dc | tar -x -C "$JIT_DIR"; then
            echo "jit cache $name restored into $JIT_DIR ($(du -sh "$JIT_DIR" | cut -f1))"
        else
            echo "jit cache $name: unpacking failed (compiling from scratch)"
        fi
    done
    touch "$JIT_DIR/.restored"
}

jit_cache_save() {  # NAME [DIR ...]
    local name=$1 out=${OUT:-/tmp/jit_cache_save}
    shift
    mkdir -p "$out"
    [ -d "$JIT_DIR" ] || { echo "no $JIT_DIR on this machine"; return 1; }
    local dirs=("$@")
    [ ${#dirs[@]} -gt 0 ] || mapfile -t dirs < <(find "$JIT_DIR" -mindepth 1 -maxdepth 1 -type d -printf '%f\n')
    tar -C "$JIT_DIR" -cf - --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' \
        --exclude='*.ptx' --exclude='*.source' --exclude='*.amdgcn' "${dirs[@]}" \
        | xz -T0 -6 | split -b 15M -d - "$out/$name.tar.xz.part"
    local parts
    parts=$(find "$out" -maxdepth 1 -name "$name.tar.xz.part*" | wc -l)
    echo "jit cache $name: ${dirs[*]} ($(du -sh "$JIT_DIR" | cut -f1) unpacked) -> $parts part(s):"
    ls -l "$out"/"$name".tar.xz.part*
    if [ "$parts" -gt 4 ]; then
        echo "more than 4 parts (60 MiB): too large to carry beside a wheelhouse; removed"
        rm -f "$out"/"$name".tar.xz.part*
        return 1
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -uo pipefail
    cd "$(dirname "$0")/.." || exit 1
    case "${1:-}" in
        save) shift; jit_cache_save "$@" ;;
        *) echo "usage: bash scripts/jit_cache.sh save NAME [DIR ...]"; exit 2 ;;
    esac
fi
