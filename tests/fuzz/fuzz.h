/* fuzz.h: helpers shared by the libFuzzer targets (tests/fuzz/fuzz_*.c).
 * Each target is one parser of untrusted input fed the fuzzer's bytes; a
 * crash, a sanitizer report or a leak is a finding. */
#ifndef AE_FUZZ_H
#define AE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Errors only: the parsers log a warning for much of what they refuse, and
 * writing those lines took most of a target's time. */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_init("fuzz", "error", "text");
    return 0;
}

/* A NUL-terminated heap copy of data (NUL bytes inside stay: C-string
 * parsers see a prefix, as they would from a header or a variable). */
static inline char *fuzz_str(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);

    if (s) {
        memcpy(s, data, size);
        s[size] = '\0';
    }
    return s;
}

/* Splits data at the first "\n--\n": *b gets what follows (size 0 when the
 * separator is missing); returns the length of the first part. */
static inline size_t fuzz_split(const uint8_t *data, size_t size, const uint8_t **b, size_t *bn)
{
    for (size_t i = 0; i + 4 <= size; i++) {
        if (memcmp(data + i, "\n--\n", 4) == 0) {
            *b = data + i + 4;
            *bn = size - i - 4;
            return i;
        }
    }
    *b = data + size;
    *bn = 0;
    return size;
}

#endif
