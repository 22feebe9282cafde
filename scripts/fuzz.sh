#!/usr/bin/env bash
# Runs Rudder's fuzz targets (fuzz/fuzz_targets/*.rs) for a bounded time each, with cargo-fuzz
# on the nightly toolchain (.ci/install-deps installs both). A crash stops the run with the
# input saved under fuzz/artifacts/<target>/; turn it into a regression test, then fix it.
#
#   scripts/fuzz.sh              every target, FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh layer 600    one target, ten minutes
#
# Seeds: fuzz/seeds/<target>/ (checked in) plus the repo's own examples (manifests, compose
# fixtures, Dockerfiles); the corpus grows in fuzz/corpus/<target>/ (not checked in).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export CARGO_INCREMENTAL=0
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/../target/fuzz}"
# The tools, once: the nightly toolchain (sanitizer flags) and cargo-fuzz.
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=(manifest compose dockerfile layer registry raft_message)
secs="${FUZZ_SECONDS:-60}"
if [ $# -ge 1 ]; then targets=("$1"); fi
if [ $# -ge 2 ]; then secs="$2"; fi

seed() {
  local t=$1 dir=corpus/$1
  mkdir -p "$dir"
  [ -d "seeds/$t" ] && cp -n seeds/"$t"/* "$dir"/ 2>/dev/null || true
  case $t in
    manifest) cp -n ../manifests/*.yaml "$dir"/ 2>/dev/null || true ;;
    compose) find ../tests/fixtures/compose -name '*.y*ml' -type f |
      while read -r f; do cp -n "$f" "$dir/$(echo "$f" | tr '/' '_')"; done ;;
    dockerfile) find .. -path ../target -prune -o -name 'Dockerfile*' -type f -print 2>/dev/null |
      while read -r f; do cp -n "$f" "$dir/$(echo "$f" | tr '/' '_')"; done ;;
  esac
}

if [ ${#targets[@]} -eq 1 ]; then cargo +nightly fuzz build -O "${targets[0]}"; else cargo +nightly fuzz build -O; fi
failed=()
for t in "${targets[@]}"; do
  seed "$t"
  echo "== fuzz $t for ${secs}s"
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
      -max_len=65536 -print_final_stats=1 2>"/tmp/rudder-fuzz-$t.log"; then
    failed+=("$t")
    tail -30 "/tmp/rudder-fuzz-$t.log"
  else
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "/tmp/rudder-fuzz-$t.log" | tr '\n' ' '
    echo
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crashes"
