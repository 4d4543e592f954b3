#!/usr/bin/env bash
# run-unit.sh BIN...: runs each cmocka unit-test binary (`make unit`).
# cmocka prints its own per-test lines and summary; this script judges each
# binary by its exit code (non-zero: a failed test, a crash or a sanitizer
# report), names the binaries that failed, and exits non-zero when any did
# or when no binary was given. UNIT_WRAP is a command line put in front of
# each binary (make valgrind: valgrind's memcheck, whose error exit code
# makes any leak or memory error a failure).
set -euo pipefail

# A hung test must not hold `make unit` forever.
UNIT_TIMEOUT=${UNIT_TIMEOUT:-300}

main() {
    local bin rc passed=0
    local -a failed=()
    if [[ $# -eq 0 ]]; then
        echo "run-unit: no unit-test binaries given" >&2
        exit 1
    fi
    for bin in "$@"; do
        echo "== ${bin##*/}"
        rc=0
        # shellcheck disable=SC2086 # UNIT_WRAP is a command line: split it.
        timeout -k 10 "$UNIT_TIMEOUT" ${UNIT_WRAP:-} "$bin" || rc=$?
        if [[ $rc -eq 0 ]]; then
            passed=$((passed + 1))
        else
            failed+=("${bin##*/} (exit $rc)")
        fi
    done
    echo
    if ((${#failed[@]} > 0)); then
        echo "failed:"
        printf '  %s\n' "${failed[@]}"
    fi
    echo "unit: $passed binaries passed, ${#failed[@]} failed"
    ((${#failed[@]} == 0))
}

main "$@"
