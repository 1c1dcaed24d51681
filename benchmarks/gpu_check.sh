#!/usr/bin/env bash
# The GPU check lives in benchmarks/gpu/ with its driver and the wheel downloader; this entry
# point keeps the documented command `benchmarks/gpu_check.sh` working.
exec "$(dirname "${BASH_SOURCE[0]}")/gpu/gpu_check.sh" "$@"
