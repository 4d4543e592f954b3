#include "origin.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

static int lower_copy(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);

    if (n >= cap)
        return -1;
    for (size_t i = 0; i <= n; i++) {
        char c = src[i];

        dst[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    return 0;
}

int origin_normalize(const char *url, int origin_only, char *out, size_t len)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL, *user = NULL, *path = NULL, *query = NULL, *frag = NULL;
    char s[8], h[260];
    int rc = -1, n;

    if (!u || !url)
        goto out;
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK)
        goto out;
    if (strcasecmp(scheme, "http") && strcasecmp(scheme, "https"))
        goto out;
    /* A percent-encoded host could be decoded differently by whoever
     * connects; an origin is refused rather than guessed. */
    if (!host[0] || strchr(host, '%') || lower_copy(s, sizeof(s), scheme) < 0 || lower_copy(h, sizeof(h), host) < 0)
        goto out;
    if (origin_only) {
        if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK ||
            curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK ||
            curl_url_get(u, CURLUPART_FRAGMENT, &frag, 0) == CURLUE_OK)
            goto out;
        if (curl_url_get(u, CURLUPART_PATH, &path, 0) == CURLUE_OK && strcmp(path, "/") && path[0])
            goto out;
    }
    n = snprintf(out, len, "%s://%s:%s", s, h, port);
    if (n < 0 || (size_t)n >= len)
        goto out;
    rc = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(user);
    curl_free(path);
    curl_free(query);
    curl_free(frag);
    curl_url_cleanup(u);
    if (rc < 0 && out && len)
        out[0] = '\0';
    return rc;
}

int origin_same(const char *url, const char *bound)
{
    char a[300], b[300];

    if (origin_normalize(url, 0, a, sizeof(a)) < 0 || origin_normalize(bound, 1, b, sizeof(b)) < 0)
        return 0;
    return strcmp(a, b) == 0;
}
