#include "jarena.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* Written once by jarena_init before other threads parse; read-only after. */
static char *region, *region_end;
static size_t nslots;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint32_t *free_stack; /* released slots, reused first (their pages are warm) */
static size_t nfree, fresh, in_use;

/* The parse in progress on this thread, if any. */
static _Thread_local char *bump, *bump_end;
static _Thread_local int bump_short;

static void *hook_malloc(size_t n)
{
    if (bump) {
        n = (n + 15) & ~(size_t)15;
        if ((size_t)(bump_end - bump) < n) {
            bump_short = 1; /* the parse fails and is redone with malloc */
            return NULL;
        }
        bump += n;
        return bump - n;
    }
    return malloc(n);
}

static void hook_free(void *p)
{
    if ((char *)p >= region && (char *)p < region_end)
        return; /* freed with its slot */
    free(p);
}

int jarena_init(size_t slots)
{
    cJSON_Hooks hooks = {hook_malloc, hook_free};
    void *m;

    if (region || !slots || slots > UINT32_MAX)
        return -1;
    free_stack = malloc(slots * sizeof(*free_stack));
    if (!free_stack)
        return -1;
    m = mmap(NULL, slots * JARENA_SLOT, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        free(free_stack);
        free_stack = NULL;
        return -1;
    }
    POISON(m, slots * JARENA_SLOT);
    region = m;
    region_end = region + slots * JARENA_SLOT;
    nslots = slots;
    cJSON_InitHooks(&hooks);
    return 0;
}

static char *acquire(void)
{
    char *s = NULL;

    if (!region)
        return NULL;
    pthread_mutex_lock(&mu);
    if (nfree)
        s = region + (size_t)free_stack[--nfree] * JARENA_SLOT;
    else if (fresh < nslots)
        s = region + fresh++ * JARENA_SLOT;
    in_use += s != NULL;
    pthread_mutex_unlock(&mu);
    if (s)
        UNPOISON(s, JARENA_SLOT);
    return s;
}

void jarena_release(void *slot)
{
    if (!slot)
        return;
    POISON(slot, JARENA_SLOT);
    pthread_mutex_lock(&mu);
    free_stack[nfree++] = (uint32_t)(((char *)slot - region) / JARENA_SLOT);
    in_use--;
    pthread_mutex_unlock(&mu);
}

void jarena_free(cJSON *doc, void *slot)
{
    if (slot)
        jarena_release(slot);
    else
        cJSON_Delete(doc);
}

cJSON *jarena_parse(const char *text, void **slot)
{
    char *s = acquire();
    cJSON *doc;

    *slot = NULL;
    if (s) {
        bump = s;
        bump_end = s + JARENA_SLOT;
        bump_short = 0;
        doc = cJSON_Parse(text);
        bump = bump_end = NULL;
        if (doc) {
            *slot = s;
            return doc;
        }
        jarena_release(s);
        if (!bump_short)
            return NULL; /* not JSON: no second try */
    }
    return cJSON_Parse(text);
}

size_t jarena_in_use(void)
{
    size_t n;

    pthread_mutex_lock(&mu);
    n = in_use;
    pthread_mutex_unlock(&mu);
    return n;
}
