#include "sig.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "fmt.h"

#define BLOCK 64

struct sig_key {
    EVP_MD *md;
    EVP_MD_CTX *inner, *outer; /* states after the ipad and opad blocks */
};

void sig_key_free(sig_key *k)
{
    if (!k)
        return;
    EVP_MD_CTX_free(k->inner);
    EVP_MD_CTX_free(k->outer);
    EVP_MD_free(k->md);
    free(k);
}

sig_key *sig_key_new(const char *secret, size_t len)
{
    sig_key *k = calloc(1, sizeof(*k));
    unsigned char key[BLOCK], pad[BLOCK];
    unsigned int dl = 0;

    if (!k)
        return NULL;
    memset(key, 0, sizeof(key));
    memset(pad, 0, sizeof(pad));
    k->md = EVP_MD_fetch(NULL, "SHA256", NULL);
    k->inner = EVP_MD_CTX_new();
    k->outer = EVP_MD_CTX_new();
    if (!k->md || !k->inner || !k->outer)
        goto fail;
    if (len > BLOCK) {
        /* Keys longer than a block are replaced by their digest. */
        if (!EVP_Digest(secret, len, key, &dl, k->md, NULL))
            goto fail;
    } else {
        memcpy(key, secret, len);
    }
    for (int i = 0; i < BLOCK; i++)
        pad[i] = key[i] ^ 0x36;
    if (!EVP_DigestInit_ex(k->inner, k->md, NULL) || !EVP_DigestUpdate(k->inner, pad, BLOCK))
        goto fail;
    for (int i = 0; i < BLOCK; i++)
        pad[i] = key[i] ^ 0x5c;
    if (!EVP_DigestInit_ex(k->outer, k->md, NULL) || !EVP_DigestUpdate(k->outer, pad, BLOCK))
        goto fail;
    /* The key and its padded forms are wiped with OPENSSL_cleanse: a
     * memset of a buffer that is not read again is a dead store the
     * compiler may drop. */
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_cleanse(pad, sizeof(pad));
    return k;
fail:
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_cleanse(pad, sizeof(pad));
    sig_key_free(k);
    return NULL;
}

int sig_hex(const sig_key *k, const char *data, size_t len, char hex[65])
{
    unsigned char ih[EVP_MAX_MD_SIZE], mac[EVP_MAX_MD_SIZE];
    unsigned int il = 0, ml = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    int rc = -1;

    hex[0] = '\0';
    if (!c)
        return -1;
    if (EVP_MD_CTX_copy_ex(c, k->inner) && EVP_DigestUpdate(c, data, len) && EVP_DigestFinal_ex(c, ih, &il) &&
        EVP_MD_CTX_copy_ex(c, k->outer) && EVP_DigestUpdate(c, ih, il) && EVP_DigestFinal_ex(c, mac, &ml) &&
        ml == 32) {
        fmt_hex(hex, mac, ml);
        rc = 0;
    }
    EVP_MD_CTX_free(c);
    return rc;
}
