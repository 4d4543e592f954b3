/* An MCP server's answer to the action workers (action-workers/deliver_mcp.c):
 * a JSON-RPC reply as JSON or as an SSE stream, from a server any trigger
 * may name. The first byte picks the Content-Type and the request id the
 * worker waits for; the rest is the body. deliver_mcp.c is compiled in (its
 * parsers are static): find_reply, http_error_reply, rpc_error_text,
 * content_text and body_snippet, as deliver_mcp_done runs them. What they
 * write for error_message must be a NUL-terminated line within its buffer
 * (body_snippet: no control bytes). */
#include "../../action-workers/deliver_mcp.c"

#include "fuzz.h"

static void line_ok(const char *s, size_t cap, int no_ctl)
{
    size_t n = strnlen(s, cap);

    if (n >= cap)
        abort();
    for (size_t i = 0; no_ctl && i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static job j; /* large: not on the stack */
    static const char *const ctypes[] = {"application/json", "text/event-stream", "application/json; charset=utf-8",
                                         "text/plain"};
    char said[400], text[400];
    cJSON *msg, *rpc;
    int id;

    if (size < 1)
        return 0;
    id = (data[0] >> 2) & 1 ? 2 : 1;
    snprintf(j.ctype, sizeof(j.ctype), "%s", ctypes[data[0] & 3]);
    buf_init(&j.resp, 1 << 20);
    buf_append(&j.resp, data + 1, size - 1);
    msg = find_reply(buf_str(&j.resp), j.ctype, id);
    if (msg) {
        const cJSON *err = cJSON_GetObjectItemCaseSensitive(msg, "error");

        if (err) {
            rpc_error_text(err, said, sizeof(said));
            line_ok(said, sizeof(said), 0);
        }
        content_text(cJSON_GetObjectItemCaseSensitive(msg, "result"), text, sizeof(text));
        line_ok(text, sizeof(text), 0);
        cJSON_Delete(msg);
    }
    rpc = http_error_reply(&j, id);
    if (rpc) {
        if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(rpc, "error")))
            abort();
        cJSON_Delete(rpc);
    }
    body_snippet(&j, said, sizeof(said));
    line_ok(said, sizeof(said), 1);
    buf_free(&j.resp);
    return 0;
}
