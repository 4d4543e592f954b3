/* deliver_telegram: Bot API sendMessage, per-chat pacing, 429 handling and
 * the default messages. config {chat_id, message_template?, parse_mode}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aw.h"
#include "log.h"
#include "queue.h"
#include "template.h"

static int chat_id(aw *app, job *j)
{
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(j->config, "chat_id");
    PGconn *conn;

    if (cJSON_IsNumber(c)) {
        snprintf(j->chat, sizeof(j->chat), "%.0f", c->valuedouble);
        return 0;
    }
    if (cJSON_IsString(c) && c->valuestring[0] && strlen(c->valuestring) < sizeof(j->chat)) {
        snprintf(j->chat, sizeof(j->chat), "%s", c->valuestring);
        return 0;
    }
    /* Without a chat in the action, the trigger owner's own chat is used. */
    if (!j->trigger_id || !app->db)
        return -1;
    conn = dbpool_acquire(app->db, 1000);
    if (!conn)
        return -2;
    {
        const char *p[1] = {j->trigger_id};
        PGresult *r = dbpool_exec(conn,
                                  "SELECT u.telegram_chat_id FROM triggers t JOIN users u ON u.id = t.user_id "
                                  "WHERE t.id::text = $1",
                                  1, p, NULL, 0);

        if (r && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) && PQgetlength(r, 0, 0) > 0)
            snprintf(j->chat, sizeof(j->chat), "%s", PQgetvalue(r, 0, 0));
        if (r)
            PQclear(r);
    }
    dbpool_release(app->db, conn);
    return j->chat[0] ? 0 : -1;
}

/* Whether s is -?(0|[1-9][0-9]*) of at most 18 digits (every Telegram
 * chat id, and exact in an int64 and in a double's 53 bits for the ids
 * Telegram hands out). */
static int tg_chat_is_int(const char *s)
{
    size_t n;

    if (*s == '-')
        s++;
    n = strspn(s, "0123456789");
    return n >= 1 && n <= 18 && s[n] == '\0' && (s[0] != '0' || n == 1);
}

static const char *str_field(const cJSON *ev, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(ev, name);

    return cJSON_IsString(v) && v->valuestring[0] ? v->valuestring : NULL;
}

/* The markup of a default message in each parse mode. */
typedef struct {
    const char *b_open, *b_close; /* bold */
    const char *a_open, *a_close; /* the transaction link: a_open URL a_close */
} tg_markup;

static const tg_markup *markup(template_mode mode)
{
    static const tg_markup md = {"*", "*", "\n[View transaction](", ")"};
    static const tg_markup html = {"<b>", "</b>", "\n<a href=\"", "\">View transaction</a>"};
    static const tg_markup plain = {"", "", "\nTransaction: ", ""};

    return mode == TEMPLATE_HTML ? &html : mode == TEMPLATE_RAW ? &plain : &md;
}

/* Appends "\nlabel: value" when the field is set; the value written for
 * text outside markup in `mode`. */
static void line(buf *b, const template_ctx *ctx, template_mode mode, const char *label, const char *field)
{
    char *v = template_value(field, ctx);

    if (v && *v) {
        buf_puts(b, "\n");
        template_escape(b, label, mode, TEMPLATE_AT_TEXT);
        template_escape(b, ": ", mode, TEMPLATE_AT_TEXT);
        template_escape(b, v, mode, TEMPLATE_AT_TEXT);
    }
    free(v);
}

char *telegram_default_text(const cJSON *ev, const char *trigger_name, const char *explorer_tx_url,
                            template_mode mode)
{
    template_ctx ctx = {ev, trigger_name, NULL, NULL};
    const tg_markup *mk = markup(mode);
    const char *type = str_field(ev, "event_type"), *title, *rest;
    char *v, *tx;
    buf b;

    if (!type)
        type = "Event";
    rest = " for agent #";
    if (!strcmp(type, "AgentRegistered")) {
        title = "New agent registered";
        rest = ": agent #";
    } else if (!strcmp(type, "MetadataSet")) {
        title = "Metadata updated";
        rest = " on agent #";
    } else if (!strcmp(type, "NewFeedback"))
        title = "New feedback";
    else if (!strcmp(type, "FeedbackRevoked"))
        title = "Feedback revoked";
    else if (!strcmp(type, "ResponseAppended")) {
        title = "Response appended";
        rest = " to feedback for agent #";
    } else if (!strcmp(type, "ValidationRequest"))
        title = "Validation requested";
    else if (!strcmp(type, "ValidationResponse"))
        title = "Validation response";
    else {
        title = type; /* from the event: escaped like any value */
        rest = " on agent #";
    }
    buf_init(&b, 4096);
    if (trigger_name) {
        buf_puts(&b, "\xf0\x9f\x94\x94 "); /* a bell */
        template_escape(&b, trigger_name, mode, TEMPLATE_AT_TEXT);
        buf_puts(&b, "\n");
    }
    buf_puts(&b, mk->b_open);
    template_escape(&b, title, mode, TEMPLATE_AT_BOLD);
    buf_puts(&b, mk->b_close);
    template_escape(&b, rest, mode, TEMPLATE_AT_TEXT);
    v = template_value("agent_id", &ctx);
    template_escape(&b, v ? v : "?", mode, TEMPLATE_AT_TEXT);
    free(v);
    line(&b, &ctx, mode, "Score", "score");
    line(&b, &ctx, mode, "Tag 1", "tag1");
    line(&b, &ctx, mode, "Tag 2", "tag2");
    line(&b, &ctx, mode, "Client", "client_address");
    line(&b, &ctx, mode, "Feedback index", "feedback_index");
    line(&b, &ctx, mode, "Owner", "owner");
    line(&b, &ctx, mode, "Token URI", "token_uri");
    line(&b, &ctx, mode, "Key", "metadata_key");
    line(&b, &ctx, mode, "Value", "metadata_value");
    line(&b, &ctx, mode, "Validator", "validator_address");
    line(&b, &ctx, mode, "Request hash", "request_hash");
    line(&b, &ctx, mode, "Response", "response");
    line(&b, &ctx, mode, "Response URI", "response_uri");
    line(&b, &ctx, mode, "Tag", "tag");
    line(&b, &ctx, mode, "Chain", "chain_id");
    line(&b, &ctx, mode, "Block", "block_number");
    tx = template_value("transaction_hash", &ctx);
    if (tx && *tx && explorer_tx_url && *explorer_tx_url && strstr(explorer_tx_url, "{tx}")) {
        const char *at = strstr(explorer_tx_url, "{tx}");
        char *pre = strndup(explorer_tx_url, (size_t)(at - explorer_tx_url));

        buf_puts(&b, mk->a_open);
        template_escape(&b, pre ? pre : "", mode, TEMPLATE_AT_URL);
        template_escape(&b, tx, mode, TEMPLATE_AT_URL);
        template_escape(&b, at + 4, mode, TEMPLATE_AT_URL);
        buf_puts(&b, mk->a_close);
        free(pre);
    } else if (tx && *tx) {
        line(&b, &ctx, mode, "Tx", "transaction_hash");
    }
    free(tx);
    return buf_take(&b);
}

static int paced_already(job *j, long long now)
{
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(j->doc, "pace_slot");

    return cJSON_IsNumber(s) && now + 50 >= (long long)s->valuedouble;
}

int deliver_telegram_begin(aw *app, queue *q, job *j, long long now)
{
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(j->config, "message_template");
    const cJSON *pm = cJSON_GetObjectItemCaseSensitive(j->config, "parse_mode");
    const char *parse_mode = cJSON_IsString(pm) ? pm->valuestring : "Markdown";
    template_mode mode;
    char url[1024];
    char *text;
    cJSON *body;
    long wait = 0;
    int rc;

    /* Values are escaped for the message's parse mode (template.h): chain
     * data is anyone's to write, and must neither add markup nor make the
     * Bot API refuse the message ("can't parse entities", a final 400). */
    if (!strcmp(parse_mode, "Markdown"))
        mode = TEMPLATE_MARKDOWN;
    else if (!strcmp(parse_mode, "MarkdownV2"))
        mode = TEMPLATE_MARKDOWN_V2;
    else if (!strcmp(parse_mode, "HTML"))
        mode = TEMPLATE_HTML;
    else if (!parse_mode[0])
        mode = TEMPLATE_RAW; /* plain text: nothing to escape */
    else {
        deliver_fail(j, OUT_FINAL, "parse_mode must be Markdown, MarkdownV2, HTML or empty (plain text)");
        return 1;
    }
    if (!app->cfg.telegram_token[0]) {
        deliver_fail(j, OUT_FINAL, "TELEGRAM_BOT_TOKEN is not set");
        return 1;
    }
    rc = chat_id(app, j);
    if (rc == -2) {
        deliver_fail(j, OUT_DEFER, "database unavailable");
        j->delay_ms = 2000;
        return 1;
    }
    if (rc < 0) {
        deliver_fail(j, OUT_FINAL, "no chat_id in the action and none for the trigger's owner");
        return 1;
    }
    snprintf(j->host, sizeof(j->host), "telegram");
    wait = breaker_allow(app->br, j->host, now);
    if (wait > 0) {
        deliver_fail(j, OUT_DEFER, "circuit open for the Bot API");
        j->delay_ms = wait;
        return 1;
    }
    if (!j->start_at && !paced_already(j, now) && app->cfg.pace_ms > 0) {
        if (queue_pace(q, j->chat, app->cfg.pace_ms, now, &wait) < 0) {
            deliver_fail(j, OUT_DEFER, "redis: %s", queue_errstr(q));
            j->delay_ms = 1000;
            return 1;
        }
        if (wait > app->cfg.pace_hold_ms) {
            j->pace_slot = now + wait;
            deliver_fail(j, OUT_DEFER, "paced");
            j->delay_ms = wait;
            return 1;
        }
        if (wait > 0) {
            j->start_at = now + wait;
            return 2;
        }
    }
    {
        template_ctx ctx = {j->event, NULL, j->trigger_id, j->id};

        if (cJSON_IsString(tpl) && tpl->valuestring[0]) {
            if (strstr(tpl->valuestring, "trigger"))
                ctx.trigger_name = deliver_trigger_name(app, j);
            text = template_render(tpl->valuestring, &ctx, mode, 4096);
        } else {
            text = telegram_default_text(j->event, deliver_trigger_name(app, j), app->cfg.explorer_tx_url, mode);
        }
    }
    body = cJSON_CreateObject();
    if (!text || !body)
        goto oom;
    /* chat ids are numbers, or @channel names: a number goes out as one
     * only when it is a JSON integer ("-", "007" or a 300-digit id as raw
     * JSON would make the whole body unreadable); anything else as text. */
    if (tg_chat_is_int(j->chat))
        cJSON_AddRawToObject(body, "chat_id", j->chat);
    else
        cJSON_AddStringToObject(body, "chat_id", j->chat);
    cJSON_AddStringToObject(body, "text", text);
    if (parse_mode[0])
        cJSON_AddStringToObject(body, "parse_mode", parse_mode);
    free(text);
    text = NULL;
    deliver_reset_request(j);
    j->body = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    body = NULL;
    if (!j->body || deliver_header(j, "Content-Type: application/json") < 0 || deliver_header(j, "Expect:") < 0)
        goto oom;
    /* The URL holds the token: it is never logged, and errors name only
     * the method. */
    snprintf(url, sizeof(url), "%s/bot%s/sendMessage", app->cfg.telegram_base, app->cfg.telegram_token);
    if (deliver_setup(j, "POST", url, j->body, app->cfg.telegram_timeout_ms, NULL, (size_t)app->cfg.response_max) < 0)
        goto oom;
    j->attempted = 1;
    return 0;
oom:
    free(text);
    cJSON_Delete(body);
    deliver_fail(j, OUT_RETRY, "out of memory");
    return 1;
}

int deliver_telegram_done(aw *app, queue *q, job *j, CURLcode rc, long long now)
{
    cJSON *resp = NULL;
    const cJSON *desc, *res, *params, *ra;

    (void)app;
    deliver_classify(j, rc, app->cfg.telegram_timeout_ms);
    if (rc == CURLE_OK)
        resp = cJSON_Parse(buf_str(&j->resp));
    desc = cJSON_GetObjectItemCaseSensitive(resp, "description");
    if (j->out == OUT_SUCCESS && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "ok")))
        deliver_fail(j, OUT_RETRY, "Bot API answered without ok:true");
    if (j->out != OUT_SUCCESS && cJSON_IsString(desc))
        deliver_fail(j, j->out, "HTTP %ld: %.400s", j->status, desc->valuestring);
    if (j->status == 429) {
        params = cJSON_GetObjectItemCaseSensitive(resp, "parameters");
        ra = cJSON_GetObjectItemCaseSensitive(params, "retry_after");
        if (cJSON_IsNumber(ra) && ra->valuedouble >= 0 && ra->valuedouble < 86400)
            j->delay_ms = (long)(ra->valuedouble * 1000);
        else if (j->delay_ms <= 0)
            j->delay_ms = 1000;
        j->throttle = 1;
        /* Other messages for this chat wait as well. */
        queue_pace_block(q, j->chat, now + j->delay_ms);
    }
    cJSON_Delete(j->response);
    j->response = cJSON_CreateObject();
    if (j->response) {
        cJSON_AddNumberToObject(j->response, "status", (double)j->status);
        cJSON_AddStringToObject(j->response, "chat_id", j->chat);
        res = cJSON_GetObjectItemCaseSensitive(resp, "result");
        if (cJSON_IsObject(res) && cJSON_GetObjectItemCaseSensitive(res, "message_id"))
            cJSON_AddItemToObject(j->response, "message_id",
                                  cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(res, "message_id"), 1));
        if (cJSON_IsString(desc))
            cJSON_AddStringToObject(j->response, "description", desc->valuestring);
    }
    cJSON_Delete(resp);
    return 1;
}
