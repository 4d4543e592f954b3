/* deliver_mcp: one MCP tools/call over Streamable HTTP (JSON-RPC 2.0):
 * initialize, notifications/initialized, tools/call, then DELETE of the
 * session. Answers may be JSON or an SSE stream. config {server_url, tool,
 * arguments_template}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "aw.h"
#include "jget.h"
#include "log.h"
#include "origin.h"
#include "template.h"

#define MCP_PROTOCOL "2025-03-26"

static const char *server_url(const job *j)
{
    return jget_str(j->config, "server_url");
}

/* Looks up the bearer token of the event's agent and keeps it only when
 * the action's server_url is on the origin the token is bound to
 * (agent_mcp_tokens.server_origin): anyone may write a trigger whose MCP
 * action names any server, so the token goes to the agent's own server
 * and nowhere else; an unbound token (NULL origin) is sent nowhere.
 * Returns 0 (token or none) or -1 when the database is unavailable. */
static int load_token(aw *app, job *j)
{
    char *agent = template_value("agent_id", &(template_ctx){j->event, NULL, NULL, NULL});
    PGconn *c;
    int rc = 0;

    if (!agent)
        return 0;
    c = app->db ? dbpool_acquire(app->db, 1000) : NULL;
    if (!c) {
        free(agent);
        return -1;
    }
    {
        const char *p[1] = {agent};
        PGresult *r = dbpool_exec(c, "SELECT token, server_origin FROM agent_mcp_tokens WHERE agent_id::text = $1", 1,
                                  p, NULL, 0);

        if (!r) {
            rc = -1;
        } else if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0)) {
            const char *bound = PQgetisnull(r, 0, 1) ? NULL : PQgetvalue(r, 0, 1);
            char a[32], o[300];

            if (bound && origin_same(server_url(j), bound)) {
                j->token = strdup(PQgetvalue(r, 0, 0));
            } else {
                log_event(bound ? LOG_INFO : LOG_WARN, "MCP token not sent: server_url is not the agent's bound origin",
                          "\"job_id\":\"%s\",\"agent_id\":\"%s\",\"bound_origin\":\"%s\"",
                          log_escape(o, sizeof(o), j->id ? j->id : ""), log_escape(a, sizeof(a), agent),
                          bound ? "set" : "none");
            }
        }
        if (r)
            PQclear(r);
    }
    dbpool_release(app->db, c);
    free(agent);
    return rc;
}

static int common_headers(job *j)
{
    if (deliver_header(j, "Accept: application/json, text/event-stream") < 0 || deliver_header(j, "Expect:") < 0)
        return -1;
    if (j->token && !strpbrk(j->token, "\r\n") && deliver_header(j, "Authorization: Bearer %s", j->token) < 0)
        return -1;
    if (j->session[0] && deliver_header(j, "Mcp-Session-Id: %s", j->session) < 0)
        return -1;
    if (j->step > 0 && j->protocol[0] && deliver_header(j, "MCP-Protocol-Version: %s", j->protocol) < 0)
        return -1;
    return 0;
}

static int post_rpc(aw *app, job *j, cJSON *msg, const char *resolve)
{
    deliver_reset_request(j);
    j->body = cJSON_PrintUnformatted(msg);
    cJSON_Delete(msg);
    if (!j->body || common_headers(j) < 0 || deliver_header(j, "Content-Type: application/json") < 0)
        return -1;
    return deliver_setup(j, "POST", server_url(j), j->body, app->cfg.mcp_timeout_ms, resolve,
                         (size_t)app->cfg.response_max);
}

static int step_request(aw *app, job *j)
{
    cJSON *m = cJSON_CreateObject(), *params;
    char err[300];
    target_info ti;

    if (!m)
        return -1;
    /* The address is checked (and pinned) again for every request of the
     * exchange, so a rebinding answer between steps changes nothing. */
    if (target_check(app->targets, server_url(j), &ti, err, sizeof(err)) < 0) {
        cJSON_Delete(m);
        deliver_fail(j, OUT_FINAL, "refused: %s", err);
        return 1;
    }
    cJSON_AddStringToObject(m, "jsonrpc", "2.0");
    if (j->step == 0) {
        cJSON_AddNumberToObject(m, "id", 1);
        cJSON_AddStringToObject(m, "method", "initialize");
        params = cJSON_AddObjectToObject(m, "params");
        cJSON_AddStringToObject(params, "protocolVersion", MCP_PROTOCOL);
        cJSON_AddObjectToObject(params, "capabilities");
        {
            cJSON *ci = cJSON_AddObjectToObject(params, "clientInfo");

            cJSON_AddStringToObject(ci, "name", "erc8004-action-workers");
            cJSON_AddStringToObject(ci, "version", AW_VERSION);
        }
    } else if (j->step == 1) {
        cJSON_AddStringToObject(m, "method", "notifications/initialized");
    } else if (j->step == 2) {
        const cJSON *tool = cJSON_GetObjectItemCaseSensitive(j->config, "tool");
        const cJSON *at = cJSON_GetObjectItemCaseSensitive(j->config, "arguments_template");
        template_ctx ctx = {j->event, NULL, j->trigger_id, j->id};
        cJSON *args;

        ctx.trigger_name = deliver_trigger_name(app, j);
        if (cJSON_IsString(at)) {
            char *s = template_render(at->valuestring, &ctx, TEMPLATE_JSON, 0);

            args = s ? cJSON_Parse(s) : NULL;
            free(s);
            if (!args) {
                cJSON_Delete(m);
                deliver_fail(j, OUT_FINAL, "arguments_template does not render to JSON");
                return 1;
            }
        } else {
            args = template_render_json(at, &ctx);
        }
        cJSON_AddNumberToObject(m, "id", 2);
        cJSON_AddStringToObject(m, "method", "tools/call");
        params = cJSON_AddObjectToObject(m, "params");
        cJSON_AddStringToObject(params, "name", cJSON_IsString(tool) ? tool->valuestring : "");
        cJSON_AddItemToObject(params, "arguments", args ? args : cJSON_CreateObject());
    } else {
        cJSON_Delete(m);
        deliver_reset_request(j);
        if (common_headers(j) < 0)
            return -1;
        return deliver_setup(j, "DELETE", server_url(j), NULL, app->cfg.mcp_timeout_ms, ti.resolve,
                             (size_t)app->cfg.response_max);
    }
    return post_rpc(app, j, m, ti.resolve);
}

int deliver_mcp_begin(aw *app, job *j)
{
    const char *url = server_url(j);
    const cJSON *tool = cJSON_GetObjectItemCaseSensitive(j->config, "tool");
    char err[300];
    target_info ti;
    long wait;
    int rc;

    if (!url || !cJSON_IsString(tool) || !tool->valuestring[0]) {
        deliver_fail(j, OUT_FINAL, "config needs server_url and tool");
        return 1;
    }
    if (target_check(app->targets, url, &ti, err, sizeof(err)) < 0) {
        deliver_fail(j, OUT_FINAL, "refused: %s", err);
        return 1;
    }
    snprintf(j->host, sizeof(j->host), "%s:%d", ti.host, ti.port);
    wait = breaker_allow(app->br, j->host, j->t0);
    if (wait > 0) {
        deliver_fail(j, OUT_DEFER, "circuit open for %s", j->host);
        j->delay_ms = wait;
        return 1;
    }
    if (load_token(app, j) < 0) {
        deliver_fail(j, OUT_DEFER, "database unavailable");
        j->delay_ms = 2000;
        return 1;
    }
    j->step = 0;
    j->session[0] = '\0';
    snprintf(j->protocol, sizeof(j->protocol), "%s", MCP_PROTOCOL);
    rc = step_request(app, j);
    if (rc < 0) {
        deliver_fail(j, OUT_RETRY, "out of memory");
        return 1;
    }
    if (rc == 1)
        return 1;
    j->attempted = 1;
    return 0;
}

/* Finds the JSON-RPC message with `id` in a JSON body or an SSE stream
 * ("data:" lines, events separated by blank lines). Returns a tree the
 * caller deletes, or NULL. */
static cJSON *find_reply(const char *body, const char *ctype, int id)
{
    buf data;
    const char *p = body;
    cJSON *found = NULL;

    if (!strncasecmp(ctype, "application/json", 16)) {
        cJSON *v = cJSON_Parse(body);

        if (cJSON_IsArray(v)) {
            cJSON *e;

            cJSON_ArrayForEach(e, v) {
                const cJSON *i = cJSON_GetObjectItemCaseSensitive(e, "id");

                if (cJSON_IsNumber(i) && i->valueint == id) {
                    found = cJSON_DetachItemViaPointer(v, e);
                    break;
                }
            }
            cJSON_Delete(v);
            return found;
        }
        return v;
    }
    buf_init(&data, 4 * 1024 * 1024);
    for (;;) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);

        if (n && p[n - 1] == '\r')
            n--;
        if (n == 0) {
            if (data.len) {
                cJSON *v = cJSON_Parse(buf_str(&data));
                const cJSON *i = cJSON_GetObjectItemCaseSensitive(v, "id");

                if (cJSON_IsNumber(i) && i->valueint == id) {
                    found = v;
                    break;
                }
                cJSON_Delete(v);
                buf_reset(&data);
            }
        } else if (n >= 5 && !strncmp(p, "data:", 5)) {
            const char *d = p + 5;
            size_t dn = n - 5;

            if (dn && *d == ' ') {
                d++;
                dn--;
            }
            if (data.len)
                buf_append(&data, "\n", 1);
            buf_append(&data, d, dn);
        }
        if (!eol) {
            if (data.len) {
                /* The stream ended without a blank line: one last event. */
                {
                    cJSON *v = cJSON_Parse(buf_str(&data));
                    const cJSON *i = cJSON_GetObjectItemCaseSensitive(v, "id");

                    if (cJSON_IsNumber(i) && i->valueint == id)
                        found = v;
                    else
                        cJSON_Delete(v);
                }
            }
            break;
        }
        p = eol + 1;
    }
    buf_free(&data);
    return found;
}

/* What a JSON-RPC error object says, for error_message: "JSON-RPC error
 * CODE: MESSAGE", then ": DATA" when the server sent data (text as it is,
 * anything else as JSON): servers put the real reason there (the MCP SDK
 * answered "Parse error" with data "ReferenceError: crypto is not
 * defined"). */
static void rpc_error_text(const cJSON *err, char *out, size_t len)
{
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(err, "message");
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(err, "data");
    char *printed = NULL;
    const char *d = NULL;
    /* The server's number: a code out of range would be undefined behaviour
     * converted (JSON-RPC codes are small integers). */
    long long c = cJSON_IsNumber(code) && code->valuedouble >= -9e18 && code->valuedouble <= 9e18
                      ? (long long)code->valuedouble
                      : 0;

    if (cJSON_IsString(data))
        d = data->valuestring;
    else if (data && !cJSON_IsNull(data))
        d = printed = cJSON_PrintUnformatted(data);
    snprintf(out, len, "JSON-RPC error %lld: %s%s%.300s", c,
             cJSON_IsString(m) && m->valuestring[0] ? m->valuestring : "(no message)", d ? ": " : "", d ? d : "");
    free(printed);
}

/* The JSON-RPC error in a reply that failed at the HTTP level, if it holds
 * one: the answer to our request, or one with id null (a request the
 * server could not read). Returns a tree the caller deletes, or NULL. */
static cJSON *http_error_reply(const job *j, int id)
{
    cJSON *msg = find_reply(buf_str(&j->resp), j->ctype, id);

    if (!msg && j->resp.len && !j->resp.truncated)
        msg = cJSON_Parse(buf_str(&j->resp));
    if (msg && !cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(msg, "error"))) {
        cJSON_Delete(msg);
        msg = NULL;
    }
    return msg;
}

/* The start of a body that is not JSON-RPC, on one line, for
 * error_message. */
static void body_snippet(const job *j, char *out, size_t len)
{
    size_t o = 0;

    for (size_t i = 0; i < j->resp.len && o + 1 < len && o < 200; i++) {
        unsigned char c = (unsigned char)j->resp.p[i];

        out[o++] = c < 0x20 || c == 0x7f ? ' ' : (char)c;
    }
    out[o] = '\0';
}

/* The text of a tool result's content, for error messages. */
static void content_text(const cJSON *result, char *out, size_t len)
{
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(result, "content"), *c;

    out[0] = '\0';
    cJSON_ArrayForEach(c, content) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(c, "text");

        if (cJSON_IsString(t)) {
            snprintf(out, len, "%s", t->valuestring);
            return;
        }
    }
}

int deliver_mcp_done(aw *app, job *j, CURLcode rc)
{
    cJSON *msg;
    const cJSON *err, *result;
    int id = j->step == 0 ? 1 : 2;

    if (j->step == 3) {
        /* Closing the session is a courtesy; the outcome is already set. */
        return 1;
    }
    deliver_classify(j, rc, app->cfg.mcp_timeout_ms);
    if (j->out != OUT_SUCCESS) {
        char what[64], detail[sizeof(j->err)], said[400] = "";
        cJSON *rpc = rc == CURLE_OK ? http_error_reply(j, id) : NULL;

        /* j->err is both the detail and the destination: copied first
         * (vsnprintf from a buffer into itself left only the prefix). */
        memcpy(detail, j->err, sizeof(detail));
        snprintf(what, sizeof(what), "%s", j->step == 0 ? "initialize" : j->step == 1 ? "initialized" : "tools/call");
        /* Say what the server said, not only its status. */
        if (rpc)
            rpc_error_text(cJSON_GetObjectItemCaseSensitive(rpc, "error"), said, sizeof(said));
        else if (rc == CURLE_OK)
            body_snippet(j, said, sizeof(said));
        cJSON_Delete(rpc);
        deliver_fail(j, j->out, "%s: %.100s%s%s", what, detail[0] ? detail : "failed", said[0] ? ": " : "", said);
        cJSON_Delete(j->response);
        j->response = cJSON_CreateObject();
        if (j->response && j->status)
            cJSON_AddNumberToObject(j->response, "status", (double)j->status);
        if (j->response && j->resp.len)
            cJSON_AddItemToObject(j->response, "body", deliver_body_json(j, 2048));
        return 1;
    }
    if (j->step == 1) {
        j->step = 2;
        goto next;
    }
    j->out = OUT_NONE;
    msg = find_reply(buf_str(&j->resp), j->ctype, id);
    err = cJSON_GetObjectItemCaseSensitive(msg, "error");
    result = cJSON_GetObjectItemCaseSensitive(msg, "result");
    if (!msg || (!err && !result)) {
        deliver_fail(j, OUT_RETRY, "%s: no JSON-RPC answer in the response", j->step == 0 ? "initialize" : "tools/call");
        j->breaker_fail = 1;
    } else if (err) {
        char said[400];

        rpc_error_text(err, said, sizeof(said));
        deliver_fail(j, OUT_FINAL, "%s: %s", j->step == 0 ? "initialize" : "tools/call", said);
        cJSON_Delete(j->response);
        j->response = cJSON_CreateObject();
        if (j->response)
            cJSON_AddItemToObject(j->response, "error", cJSON_Duplicate(err, 1));
    } else if (j->step == 0) {
        const cJSON *pv = cJSON_GetObjectItemCaseSensitive(result, "protocolVersion");

        if (cJSON_IsString(pv) && strlen(pv->valuestring) < sizeof(j->protocol))
            snprintf(j->protocol, sizeof(j->protocol), "%s", pv->valuestring);
        cJSON_Delete(msg);
        j->step = 1;
        goto next;
    } else {
        char text[400];

        cJSON_Delete(j->response);
        j->response = cJSON_CreateObject();
        if (j->response) {
            char *s = cJSON_PrintUnformatted(result);

            if (s && strlen(s) <= 8192)
                cJSON_AddItemToObject(j->response, "result", cJSON_Duplicate(result, 1));
            free(s);
        }
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "isError"))) {
            content_text(result, text, sizeof(text));
            deliver_fail(j, OUT_FINAL, "tool error: %s", text);
        } else {
            j->out = OUT_SUCCESS;
            j->err[0] = '\0';
        }
    }
    cJSON_Delete(msg);
    if (j->session[0]) {
        /* Keep the outcome and close the session. */
        outcome keep = j->out;
        char kept[sizeof(j->err)];
        int r;

        memcpy(kept, j->err, sizeof(kept));
        j->step = 3;
        r = step_request(app, j);
        j->out = keep;
        memcpy(j->err, kept, sizeof(kept));
        return r == 0 ? 0 : 1;
    }
    return 1;
next:
    {
        int r = step_request(app, j);

        if (r < 0) {
            deliver_fail(j, OUT_RETRY, "out of memory");
            return 1;
        }
        if (r == 1)
            return 1;
        j->out = OUT_NONE;
        return 0;
    }
}
