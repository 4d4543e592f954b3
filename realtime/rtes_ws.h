/* rtes_ws: the routes of SPEC 5b on the realtime program's wsapp.
 *
 *   GET /rt?execution_id=&workflow_id=   WebSocket: history then live frames
 *   GET /executions/{execution_id}       the execution's document
 *
 * Access, decided before the upgrade: RTES_SKIP_AUTH=1 lets everybody in;
 * a Bearer JWT (HS256, JWT_SECRET or JWT_SECRET_KEY) names a user (its
 * user_id claim, else sub) who needs a live token for the execution (or a
 * workflow-wide one for its workflow), else 403; a bad JWT is 401; without
 * credentials the execution (or its workflow) must itself have a live
 * token, else 401. The token check is one Redis round trip made on the loop
 * (bounded by a 500 ms timeout); GET /executions makes it on a loader
 * thread, with the execution's real workflow. */
#ifndef RTES_WS_H
#define RTES_WS_H

#include "jwtauth.h"
#include "rconn.h"
#include "rtes_hub.h"
#include "wsapp.h"

typedef struct rtes_ws rtes_ws;

/* Creates the routes' state; `jwt` and `hub` stay the caller's. NULL on
 * OOM. */
rtes_ws *rtes_ws_new(rtes_hub *hub, jwtauth *jwt, const rconn_opts *redis, int skip_auth);

/* Registers the two routes on app (before wsapp_start). 0 or -1. */
int rtes_ws_mount(rtes_ws *w, wsapp *app);

/* Frees (after wsapp_stop). NULL is a no-op. */
void rtes_ws_free(rtes_ws *w);

#endif
