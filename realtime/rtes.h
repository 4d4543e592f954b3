/* rtes: workflow executions in the realtime program (SPEC 5b), the part
 * that replaces the Rust execution service RTES, as an rt_module.
 *
 * It owns the AMQP consumer thread (rtes_consumer), the watcher hub with
 * its Redis subscriber and PostgreSQL loader threads (rtes_hub), and the
 * routes GET /rt (WebSocket) and GET /executions/{id} (rtes_ws). Its
 * variables: RABBITMQ_QUEUE_DURABLE, RABBITMQ_PREFETCH_COUNT,
 * RTES_SKIP_AUTH, JWT_SECRET (or JWT_SECRET_KEY), RTES_DB_CONNECTIONS. See
 * docs/realtime.md. */
#ifndef RTES_H
#define RTES_H

#include "module.h"

extern const rt_module rtes_module;

#endif
