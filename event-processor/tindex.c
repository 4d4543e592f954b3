#include "tindex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "jsonstr.h"
#include "log.h"

/* One hash bucket: a key ("chain|registry|*" or "chain|registry|agent")
 * and the triggers under it. */
typedef struct {
    char *key;
    tindex_trigger **items;
    int n, cap;
} slot;

struct tindex {
    tindex_trigger *trigs;
    int n;
    slot *slots; /* open addressing, power-of-two size */
    size_t nslots;
    /* id -> trigger, open addressing. */
    tindex_trigger **byid;
    size_t nbyid;
};

static void key_of(char *buf, size_t len, int64_t chain, const char *registry, int has_agent, int64_t agent)
{
    if (has_agent)
        snprintf(buf, len, "%lld|%s|%lld", (long long)chain, registry, (long long)agent);
    else
        snprintf(buf, len, "%lld|%s|*", (long long)chain, registry);
}

static slot *slot_find(const tindex *ix, const char *key, int create)
{
    size_t i = hash_fnv1a_str(key) & (ix->nslots - 1);

    for (;;) {
        slot *s = &ix->slots[i];

        if (!s->key) {
            if (!create || !(s->key = strdup(key)))
                return NULL;
            return s;
        }
        if (!strcmp(s->key, key))
            return s;
        i = (i + 1) & (ix->nslots - 1);
    }
}

static int slot_add(slot *s, tindex_trigger *t)
{
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 4;
        tindex_trigger **p = realloc(s->items, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        s->items = p;
        s->cap = cap;
    }
    s->items[s->n++] = t;
    return 0;
}

void tindex_free(tindex *ix)
{
    if (!ix)
        return;
    for (int i = 0; i < ix->n; i++) {
        tindex_trigger *t = &ix->trigs[i];

        free(t->id);
        free(t->user_id);
        free(t->name);
        free(t->id_esc);
        free(t->user_esc);
        free(t->name_esc);
        trigger_model_matcher_free(t->m);
        for (int a = 0; a < t->naction; a++)
            free(t->actions[a].config_json);
        free(t->actions);
        trigger_model_state_free(t->state);
    }
    for (size_t i = 0; i < ix->nslots; i++) {
        free(ix->slots[i].key);
        free(ix->slots[i].items);
    }
    free(ix->slots);
    free(ix->byid);
    free(ix->trigs);
    free(ix);
}

int tindex_count(const tindex *ix)
{
    return ix ? ix->n : 0;
}

static const char load_sql[] =
    "SELECT t.id, t.user_id, t.name, t.chain_id, t.registry, "
    "COALESCE((SELECT jsonb_agg(jsonb_build_object('condition_type', c.condition_type, 'field', c.field, "
    "'operator', c.operator, 'value', c.value, 'config', c.config) ORDER BY c.id) "
    "FROM trigger_conditions c WHERE c.trigger_id = t.id), '[]'::jsonb)::text, "
    "COALESCE((SELECT jsonb_agg(jsonb_build_object('id', a.id, 'action_type', a.action_type, "
    "'priority', a.priority, 'config', a.config) ORDER BY a.id) "
    "FROM trigger_actions a WHERE a.trigger_id = t.id), '[]'::jsonb)::text "
    "FROM triggers t WHERE t.enabled ORDER BY t.id";

/* Fills one trigger from row `r`. Returns 0, 1 (skip: never matches) or
 * -1 on OOM. */
static int load_one(tindex_trigger *t, PGresult *res, int r)
{
    cJSON *conds = cJSON_Parse(PQgetvalue(res, r, 5));
    cJSON *acts = cJSON_Parse(PQgetvalue(res, r, 6)), *a;
    int rc = -1, i = 0;

    t->id = strdup(PQgetvalue(res, r, 0));
    t->user_id = strdup(PQgetvalue(res, r, 1));
    t->name = strdup(PQgetvalue(res, r, 2));
    if (!conds || !acts || !t->id || !t->user_id || !t->name)
        goto out;
    t->id_esc = jsonstr_dup(t->id);
    t->user_esc = jsonstr_dup(t->user_id);
    t->name_esc = jsonstr_dup(t->name);
    t->m = trigger_model_matcher_new(conds, t->id);
    if (!t->id_esc || !t->user_esc || !t->name_esc || !t->m)
        goto out;
    t->naction = cJSON_GetArraySize(acts);
    if (t->naction && !(t->actions = calloc((size_t)t->naction, sizeof(*t->actions))))
        goto out;
    cJSON_ArrayForEach(a, acts)
    {
        tindex_action *x = &t->actions[i++];
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(a, "action_type");
        const cJSON *pr = cJSON_GetObjectItemCaseSensitive(a, "priority");

        x->id = cJSON_IsNumber(id) ? id->valueint : 0;
        snprintf(x->id_text, sizeof(x->id_text), "%d", x->id);
        x->type = trigger_model_action_type_name(
            trigger_model_action_type_parse(cJSON_IsString(ty) ? ty->valuestring : NULL));
        x->priority = cJSON_IsNumber(pr) ? pr->valueint : 1;
        if (!(x->config_json = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(a, "config"))))
            goto out;
    }
    rc = trigger_model_matcher_never(t->m) ? 1 : 0;
out:
    cJSON_Delete(conds);
    cJSON_Delete(acts);
    return rc;
}

static void clear_one(tindex_trigger *t)
{
    free(t->id);
    free(t->user_id);
    free(t->name);
    free(t->id_esc);
    free(t->user_esc);
    free(t->name_esc);
    trigger_model_matcher_free(t->m);
    for (int a = 0; a < t->naction; a++)
        free(t->actions[a].config_json);
    free(t->actions);
    memset(t, 0, sizeof(*t));
}

tindex *tindex_load(PGconn *conn, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, load_sql);
    tindex *ix = NULL;
    int rows;

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "loading triggers: %s", PQresultErrorMessage(res));
        PQclear(res);
        return NULL;
    }
    rows = PQntuples(res);
    if (!(ix = calloc(1, sizeof(*ix))))
        goto oom;
    ix->nslots = 16;
    while (ix->nslots < (size_t)rows * 2 + 16)
        ix->nslots *= 2;
    ix->nbyid = ix->nslots;
    if (!(ix->slots = calloc(ix->nslots, sizeof(*ix->slots))) ||
        !(ix->byid = calloc(ix->nbyid, sizeof(*ix->byid))) ||
        (rows && !(ix->trigs = calloc((size_t)rows, sizeof(*ix->trigs)))))
        goto oom;
    for (int r = 0; r < rows; r++) {
        tindex_trigger *t = &ix->trigs[ix->n];
        int64_t chain, agent;
        int has_agent, rc;
        char key[160];
        slot *s;
        size_t h;

        rc = load_one(t, res, r);
        if (rc < 0) {
            clear_one(t);
            goto oom;
        }
        if (rc > 0) { /* never matches: logged by the matcher */
            clear_one(t);
            continue;
        }
        chain = strtoll(PQgetvalue(res, r, 3), NULL, 10);
        has_agent = trigger_model_matcher_agent_id(t->m, &agent);
        key_of(key, sizeof(key), chain, PQgetvalue(res, r, 4), has_agent, agent);
        if (!(s = slot_find(ix, key, 1)) || slot_add(s, t) < 0) {
            ix->n++;
            goto oom;
        }
        h = hash_fnv1a_str(t->id) & (ix->nbyid - 1);
        while (ix->byid[h])
            h = (h + 1) & (ix->nbyid - 1);
        ix->byid[h] = t;
        ix->n++;
    }
    PQclear(res);
    return ix;
oom:
    snprintf(err, errlen, "out of memory loading triggers");
    PQclear(res);
    tindex_free(ix);
    return NULL;
}

int tindex_candidates(const tindex *ix, int64_t chain_id, const char *registry, int has_agent, int64_t agent_id,
                      tindex_trigger *const **lists, int *lens)
{
    char key[160];
    const slot *s;
    int n = 0;

    if (!ix || !registry)
        return 0;
    key_of(key, sizeof(key), chain_id, registry, 0, 0);
    if ((s = slot_find(ix, key, 0)) && s->n) {
        lists[n] = s->items;
        lens[n++] = s->n;
    }
    if (has_agent) {
        key_of(key, sizeof(key), chain_id, registry, 1, agent_id);
        if ((s = slot_find(ix, key, 0)) && s->n) {
            lists[n] = s->items;
            lens[n++] = s->n;
        }
    }
    return n;
}

tindex_trigger *tindex_find(const tindex *ix, const char *id)
{
    size_t h;

    if (!ix || !ix->nbyid)
        return NULL;
    h = hash_fnv1a_str(id) & (ix->nbyid - 1);
    while (ix->byid[h]) {
        if (!strcmp(ix->byid[h]->id, id))
            return ix->byid[h];
        h = (h + 1) & (ix->nbyid - 1);
    }
    return NULL;
}
