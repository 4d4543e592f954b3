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
    tindex_trigger **trigs; /* each malloc'd; t->ix_pos_ is its index here */
    int n, cap;
    slot *slots; /* open addressing, power-of-two size, at most half full */
    size_t nslots, nkeys;
    /* id -> trigger, open addressing (linear probing, deletion by
     * backward shift), at most half full. */
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

/* Doubles the key table before it is half full (slot_find needs a free
 * slot to stop at). Returns 0 or -1 on OOM. */
static int slots_reserve(tindex *ix)
{
    size_t nn;
    slot *ns;

    if ((ix->nkeys + 1) * 2 <= ix->nslots)
        return 0;
    nn = ix->nslots * 2;
    if (!(ns = calloc(nn, sizeof(*ns))))
        return -1;
    for (size_t i = 0; i < ix->nslots; i++) {
        size_t j;

        if (!ix->slots[i].key)
            continue;
        j = hash_fnv1a_str(ix->slots[i].key) & (nn - 1);
        while (ns[j].key)
            j = (j + 1) & (nn - 1);
        ns[j] = ix->slots[i];
    }
    free(ix->slots);
    ix->slots = ns;
    ix->nslots = nn;
    return 0;
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

static void slot_del(slot *s, const tindex_trigger *t)
{
    for (int i = 0; i < s->n; i++)
        if (s->items[i] == t) {
            memmove(s->items + i, s->items + i + 1, (size_t)(s->n - i - 1) * sizeof(*s->items));
            s->n--;
            return;
        }
}

static void byid_put(tindex_trigger **tab, size_t n, tindex_trigger *t)
{
    size_t h = hash_fnv1a_str(t->id) & (n - 1);

    while (tab[h])
        h = (h + 1) & (n - 1);
    tab[h] = t;
}

static int byid_reserve(tindex *ix)
{
    size_t nn;
    tindex_trigger **nt;

    if (((size_t)ix->n + 1) * 2 <= ix->nbyid)
        return 0;
    nn = ix->nbyid * 2;
    if (!(nt = calloc(nn, sizeof(*nt))))
        return -1;
    for (size_t i = 0; i < ix->nbyid; i++)
        if (ix->byid[i])
            byid_put(nt, nn, ix->byid[i]);
    free(ix->byid);
    ix->byid = nt;
    ix->nbyid = nn;
    return 0;
}

/* Removes `t` from the id table by linear probing's backward-shift
 * deletion (later entries of the run move up into the hole when their home
 * allows), so a lookup never stops early at a hole inside a run. */
static void byid_del(tindex *ix, const tindex_trigger *t)
{
    size_t mask = ix->nbyid - 1, i = hash_fnv1a_str(t->id) & mask, j;

    while (ix->byid[i] != t) {
        if (!ix->byid[i])
            return;
        i = (i + 1) & mask;
    }
    for (j = i;;) {
        size_t k;

        j = (j + 1) & mask;
        if (!ix->byid[j])
            break;
        k = hash_fnv1a_str(ix->byid[j]->id) & mask;
        /* It stays when its home lies cyclically in (i, j]. */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue;
        ix->byid[i] = ix->byid[j];
        i = j;
    }
    ix->byid[i] = NULL;
}

static void trigger_free(tindex_trigger *t)
{
    if (!t)
        return;
    free(t->id);
    free(t->user_id);
    free(t->name);
    free(t->id_esc);
    free(t->user_esc);
    free(t->name_esc);
    free(t->ix_key_);
    trigger_model_matcher_free(t->m);
    for (int a = 0; a < t->naction; a++)
        free(t->actions[a].config_json);
    free(t->actions);
    trigger_model_state_free(t->state);
    free(t);
}

void tindex_free(tindex *ix)
{
    if (!ix)
        return;
    for (int i = 0; i < ix->n; i++)
        trigger_free(ix->trigs[i]);
    for (size_t i = 0; ix->slots && i < ix->nslots; i++) {
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

/* Every enabled trigger with its conditions and actions (JSON text). */
#define LOAD_SQL                                                                                              \
    "SELECT t.id, t.user_id, t.name, t.chain_id, t.registry, "                                                \
    "COALESCE((SELECT jsonb_agg(jsonb_build_object('condition_type', c.condition_type, 'field', c.field, "   \
    "'operator', c.operator, 'value', c.value, 'config', c.config) ORDER BY c.id) "                          \
    "FROM trigger_conditions c WHERE c.trigger_id = t.id), '[]'::jsonb)::text, "                              \
    "COALESCE((SELECT jsonb_agg(jsonb_build_object('id', a.id, 'action_type', a.action_type, "                \
    "'priority', a.priority, 'config', a.config) ORDER BY a.id) "                                             \
    "FROM trigger_actions a WHERE a.trigger_id = t.id), '[]'::jsonb)::text "                                  \
    "FROM triggers t WHERE t.enabled"

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

        /* NOLINTNEXTLINE(clang-analyzer-core.NullDereference): actions has naction (the array's size) entries. */
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

/* A trigger from row `r` of a load: NULL when it never matches (logged by
 * the matcher; *oom 0) or on OOM (*oom 1). */
static tindex_trigger *trigger_of(PGresult *res, int r, int *oom)
{
    tindex_trigger *t = calloc(1, sizeof(*t));
    char key[160];
    int64_t agent = 0;
    int rc, has_agent;

    *oom = 1;
    if (!t)
        return NULL;
    rc = load_one(t, res, r);
    if (rc == 0) {
        has_agent = trigger_model_matcher_agent_id(t->m, &agent);
        key_of(key, sizeof(key), strtoll(PQgetvalue(res, r, 3), NULL, 10), PQgetvalue(res, r, 4), has_agent, agent);
        if ((t->ix_key_ = strdup(key))) {
            *oom = 0;
            return t;
        }
    } else if (rc > 0) {
        *oom = 0;
    }
    trigger_free(t);
    return NULL;
}

static tindex *index_new(size_t expect)
{
    tindex *ix = calloc(1, sizeof(*ix));

    if (!ix)
        return NULL;
    ix->nslots = 16;
    while (ix->nslots < expect * 2 + 16)
        ix->nslots *= 2;
    ix->nbyid = ix->nslots;
    if (!(ix->slots = calloc(ix->nslots, sizeof(*ix->slots))) || !(ix->byid = calloc(ix->nbyid, sizeof(*ix->byid)))) {
        tindex_free(ix);
        return NULL;
    }
    return ix;
}

static int index_add(tindex *ix, tindex_trigger *t)
{
    slot *s;

    if (slots_reserve(ix) < 0 || byid_reserve(ix) < 0)
        return -1;
    if (ix->n == ix->cap) {
        int cap = ix->cap ? ix->cap * 2 : 64;
        tindex_trigger **p = realloc(ix->trigs, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        ix->trigs = p;
        ix->cap = cap;
    }
    if (!(s = slot_find(ix, t->ix_key_, 0))) {
        if (!(s = slot_find(ix, t->ix_key_, 1)))
            return -1;
        ix->nkeys++;
    }
    if (slot_add(s, t) < 0)
        return -1;
    byid_put(ix->byid, ix->nbyid, t);
    t->ix_pos_ = ix->n;
    ix->trigs[ix->n++] = t;
    return 0;
}

/* Takes `t` out of the index (the caller frees it). An emptied key stays,
 * with no triggers under it. */
static void index_del(tindex *ix, tindex_trigger *t)
{
    slot *s = slot_find(ix, t->ix_key_, 0);

    if (s)
        slot_del(s, t);
    byid_del(ix, t);
    ix->trigs[t->ix_pos_] = ix->trigs[--ix->n];
    ix->trigs[t->ix_pos_]->ix_pos_ = t->ix_pos_;
}

tindex *tindex_load(PGconn *conn, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, LOAD_SQL " ORDER BY t.id");
    tindex *ix = NULL;
    int rows, oom;

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "loading triggers: %s", PQresultErrorMessage(res));
        PQclear(res);
        return NULL;
    }
    rows = PQntuples(res);
    if (!(ix = index_new((size_t)rows)))
        goto oom;
    for (int r = 0; r < rows; r++) {
        tindex_trigger *t = trigger_of(res, r, &oom);

        if (!t) {
            if (oom)
                goto oom;
            continue;
        }
        if (index_add(ix, t) < 0) {
            trigger_free(t);
            goto oom;
        }
    }
    PQclear(res);
    return ix;
oom:
    snprintf(err, errlen, "out of memory loading triggers");
    PQclear(res);
    tindex_free(ix);
    return NULL;
}

int tindex_update(tindex *ix, PGconn *conn, const char *const *ids, int n, void (*drop)(void *, tindex_trigger *),
                  void *ud, char *err, size_t errlen)
{
    cJSON *arr = cJSON_CreateStringArray(ids, n);
    char *text = arr ? cJSON_PrintUnformatted(arr) : NULL;
    const char *p[1] = {text};
    PGresult *res = NULL;
    tindex_trigger **fresh = NULL;
    int rows = 0, oom, rc = -1;

    if (!text) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    res = PQexecParams(conn, LOAD_SQL " AND t.id IN (SELECT jsonb_array_elements_text($1::jsonb))", 1, NULL, p,
                       NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "loading triggers: %s", PQresultErrorMessage(res));
        goto out;
    }
    /* Everything is built before the index is touched, so that a failure
     * up to here leaves it as it was. */
    rows = PQntuples(res);
    if (rows && !(fresh = calloc((size_t)rows, sizeof(*fresh))))
        goto oom;
    for (int r = 0; r < rows; r++)
        if (!(fresh[r] = trigger_of(res, r, &oom)) && oom)
            goto oom;
    for (int i = 0; i < n; i++) {
        tindex_trigger *old = tindex_find(ix, ids[i]);

        if (old) {
            if (drop)
                drop(ud, old);
            index_del(ix, old);
            trigger_free(old);
        }
    }
    rc = 0;
    for (int r = 0; r < rows; r++) {
        if (fresh[r] && index_add(ix, fresh[r]) < 0) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            continue;
        }
        fresh[r] = NULL;
    }
    goto out;
oom:
    snprintf(err, errlen, "out of memory loading triggers");
out:
    for (int r = 0; fresh && r < rows; r++)
        trigger_free(fresh[r]);
    free(fresh);
    PQclear(res);
    cJSON_free(text);
    cJSON_Delete(arr);
    return rc;
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
