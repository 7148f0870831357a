#!/usr/bin/env bash
# Coverage-guided fuzzing of the C core and of the vhost-user parser (see fuzz/README.md).
#   scripts/fuzz.sh --list                   the targets
#   scripts/fuzz.sh TARGET SECONDS [ARGS]    build TARGET if needed, fuzz it for SECONDS from its
#                                            committed seeds (fuzz/corpus/TARGET) plus what earlier
#                                            runs found; extra ARGS go to libFuzzer (-jobs=1, ...)
#   scripts/fuzz.sh --build [TARGET...]      build only
#   scripts/fuzz.sh --coverage [TARGET...]    replay the C targets' working corpora and seeds
#                                            through source-coverage builds; llvm-cov's report of
#                                            virtio/_core/*.c over all of them (default: all)
# FUZZ_WORK=DIR: the working corpus (new inputs go there) instead of the cache's (the test suite
# starts from the seeds alone in a temporary one).
# C targets: clang -fsanitize=fuzzer,address,undefined over every virtio/_core/*.c. The parser
# target runs under atheris (libFuzzer for Python). Builds, the working corpus and crash
# artifacts go to ${VHOSTX_CACHE:-~/.cache/vhostx}/fuzz/, never into the repository.
# Exit status: 0 no crash, else libFuzzer's (a crash, a sanitizer report, a timeout or OOM);
# the crashing input is then in .../fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
C_TARGETS=(chain tx rx round iotlb drvpair)
PY_TARGETS=(vhost_user)
CACHE=${VHOSTX_CACHE:-$HOME/.cache/vhostx}/fuzz
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
CC=${FUZZ_CC:-clang}
CFLAGS=(-g -O1 -std=gnu11 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
        -fno-sanitize-recover=undefined -I virtio/_core -I fuzz)

is_c() { local t; for t in "${C_TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
is_py() { local t; for t in "${PY_TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

build() {  # build C target $1 into $CACHE/build/ when a source changed; prints the binary path
  local t=$1 bin=$CACHE/build/fuzz_$1 srcs
  srcs=(virtio/_core/*.c "fuzz/fuzz_$t.c")
  mkdir -p "$CACHE/build"
  if [ ! -x "$bin" ] || [ -n "$(find "${srcs[@]}" virtio/_core/*.h fuzz/*.h scripts/fuzz.sh -newer "$bin" 2>/dev/null | head -1)" ]; then
    command -v "$CC" >/dev/null || { echo "fuzz: $CC not found (scripts/install.sh installs clang)" >&2; exit 2; }
    "$CC" "${CFLAGS[@]}" "${srcs[@]}" -o "$bin.tmp" -lpthread
    mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

coverage() {  # replay the corpora of C targets "$@" through -fprofile-instr-generate builds
  local t dir llvm=/usr/lib/llvm-14/bin objs=() profs=()
  for t in "$@"; do
    dir=$CACHE/coverage/$t
    rm -rf "$dir"; mkdir -p "$dir" "$CACHE/corpus/$t"
    "$CC" -g -O1 -std=gnu11 -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
      -I virtio/_core -I fuzz virtio/_core/*.c "fuzz/fuzz_$t.c" -o "$dir/fuzz_$t" -lpthread
    LLVM_PROFILE_FILE="$dir/%p.profraw" "$dir/fuzz_$t" -runs=0 "$CACHE/corpus/$t" \
      "$ROOT/fuzz/corpus/$t" >"$dir/replay.log" 2>&1
    "$llvm/llvm-profdata" merge -sparse "$dir"/*.profraw -o "$dir/merged.profdata"
    objs+=(-object "$dir/fuzz_$t"); profs+=("$dir/merged.profdata")
  done
  "$llvm/llvm-profdata" merge -sparse "${profs[@]}" -o "$CACHE/coverage/all.profdata"
  "$llvm/llvm-cov" report "${objs[@]:1}" -instr-profile="$CACHE/coverage/all.profdata" \
    virtio/_core/*.c
}

case "${1:-}" in
  --coverage) shift; [ "${1:-all}" = all ] && set -- "${C_TARGETS[@]}"
              for t in "$@"; do is_c "$t" || { echo "fuzz: $t: not a C target" >&2; exit 2; }; done
              coverage "$@"; exit 0 ;;
  --list) printf '%s\n' "${C_TARGETS[@]}" "${PY_TARGETS[@]}"; exit 0 ;;
  --build) shift; for t in "${@:-${C_TARGETS[@]}}"; do build "$t" >/dev/null; done; exit 0 ;;
  ""|-h|--help) sed -n '2,17p' "$0"; exit 2 ;;
esac
target=$1 secs=${2:?usage: scripts/fuzz.sh TARGET SECONDS [libFuzzer args]}
shift 2
work=${FUZZ_WORK:-$CACHE/corpus/$target} art=$CACHE/artifacts/$target/
mkdir -p "$work" "$art"
seeds=$ROOT/fuzz/corpus/$target logs=$CACHE/logs/$target
[ -d "$seeds" ] || { echo "fuzz: no seed corpus fuzz/corpus/$target" >&2; exit 2; }
mkdir -p "$logs"
common=(-max_total_time="$secs" -artifact_prefix="$art" -print_final_stats=1 -timeout=20
        -rss_limit_mb=2048 "$@" "$work" "$seeds")
if is_c "$target"; then
  bin=$(build "$target")
  cd "$logs"  # -jobs=N writes fuzz-N.log into the current directory
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
  exec "$bin" -max_len=8192 "${common[@]}"
elif is_py "$target"; then
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  cd "$logs"
  args=()  # atheris fuzzes in this process: -jobs/-workers (which re-run argv[0]) do not apply
  for a in "${common[@]}"; do case "$a" in -jobs=*|-workers=*) ;; *) args+=("$a") ;; esac; done
  exec "$PY" "$ROOT/fuzz/fuzz_$target.py" -max_len=4096 "${args[@]}"
else
  echo "fuzz: unknown target '$target' (scripts/fuzz.sh --list)" >&2; exit 2
fi
