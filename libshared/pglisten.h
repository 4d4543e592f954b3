/* pglisten: a thread that holds one PostgreSQL connection in LISTEN on a
 * few channels and hands each notification to a callback.
 *
 * It connects on its own (not from a pool), reconnects with back-off when
 * the connection breaks, and tells the caller about every (re)connection,
 * since notifications sent while it was not listening are lost: a cache
 * kept fresh by notifications must be dropped then. A connection that has
 * been quiet for the ping interval (30 s) is sent SELECT 1; one that does
 * not answer within the interval either is dropped and reopened. */
#ifndef AE_PGLISTEN_H
#define AE_PGLISTEN_H

typedef struct pglisten pglisten;

/* Called on the listener's thread: for a notification with its channel and
 * payload, or with both NULL right after each (re)connection, once LISTEN
 * is in place and before pglisten_up() turns true. */
typedef void (*pglisten_fn)(void *ud, const char *channel, const char *payload);

/* Starts listening on `channels` (NULL-terminated, plain identifiers; at
 * most 8) of the database `conninfo` (copied). `name` is the connection's
 * application_name. Returns NULL on OOM or when the thread cannot start.
 * Free with pglisten_free. */
pglisten *pglisten_new(const char *conninfo, const char *name, const char *const *channels, pglisten_fn fn,
                       void *ud);

/* Sets the ping interval (ms > 0; 30,000 unless told), from any thread. */
void pglisten_set_ping(pglisten *l, long ms);

/* Nonzero while the connection is up and listening. Thread-safe. */
int pglisten_up(const pglisten *l);

/* Stops the thread (within about 250 ms), closes the connection, frees.
 * NULL is a no-op. */
void pglisten_free(pglisten *l);

#endif
