/* Unit tests of the webhook signature key (action-workers/sig.c): the
 * HMAC matches OpenSSL's one-shot HMAC for short and long keys, and the
 * key material on the stack is wiped with OPENSSL_cleanse, which the
 * compiler cannot drop as it may a memset of a buffer never read again
 * (issue 10, item 12).
 *
 * sig.c is compiled into this binary with OPENSSL_cleanse renamed to a
 * counting wrapper, so the test sees every wipe it asks for. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

static size_t cleansed;   /* bytes wiped by OPENSSL_cleanse since the last reset */
static int cleanse_calls;
void counting_cleanse(void *p, size_t n);

#define OPENSSL_cleanse counting_cleanse
#include "../../action-workers/sig.c"
#undef OPENSSL_cleanse

void counting_cleanse(void *p, size_t n)
{
    cleanse_calls++;
    cleansed += n;
    OPENSSL_cleanse(p, n);
}

static void expect_hmac(const char *key, size_t klen, const char *msg)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    char want[65], got[65];
    sig_key *k;

    assert_non_null(HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)msg, strlen(msg), mac, &ml));
    assert_int_equal(ml, 32);
    for (unsigned int i = 0; i < ml; i++)
        snprintf(want + 2 * i, 3, "%02x", mac[i]);
    cleansed = 0;
    cleanse_calls = 0;
    k = sig_key_new(key, klen);
    assert_non_null(k);
    /* The raw key block and the padded block, at least. */
    assert_true(cleanse_calls >= 2);
    assert_true(cleansed >= 2 * BLOCK);
    assert_int_equal(sig_hex(k, msg, strlen(msg), got), 0);
    assert_string_equal(got, want);
    sig_key_free(k);
}

static void hmac_matches_and_key_is_cleansed(void **state)
{
    char longkey[200];

    (void)state;
    expect_hmac("s3cret", 6, "{\"agent\":42}");
    expect_hmac("", 0, "");
    memset(longkey, 'k', sizeof(longkey));
    expect_hmac(longkey, sizeof(longkey), "a body longer than nothing");
    expect_hmac(longkey, 64, "exactly one block of key");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(hmac_matches_and_key_is_cleansed),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
