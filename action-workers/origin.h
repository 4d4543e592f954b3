/* origin: the origin (scheme, host, port) of a URL in one normalized text
 * form, so that an MCP token bound to an agent's server can be compared
 * with the server a trigger's action names.
 *
 * The form is "scheme://host:port": scheme and host in lowercase, the port
 * always explicit (80 for http, 443 for https when the URL has none), IPv6
 * hosts in brackets. The URL is parsed by libcurl's URL API, the parser of
 * the transfer itself, so the origin compared is the one the request goes
 * to (a user part such as "https://good@evil/" names evil). */
#ifndef AW_ORIGIN_H
#define AW_ORIGIN_H

#include <stddef.h>

/* Writes the origin of the http(s) URL `url` to `out` (`len` bytes; 300
 * are always enough for a host of up to 255). With `origin_only`, `url`
 * must be an origin (nothing after the authority but an optional "/", and
 * no user part), as agent_mcp_tokens.server_origin holds. Returns 0, or -1
 * when `url` is malformed, not http(s), has a host with '%' or does not
 * fit. */
int origin_normalize(const char *url, int origin_only, char *out, size_t len);

/* Nonzero when the URL `url` is on the origin `bound` (both normalized
 * with origin_normalize; `bound` must be an origin). Zero when they differ
 * or either is malformed, so that a token is never sent on doubt. */
int origin_same(const char *url, const char *bound);

#endif
