/* deps: health checks for the platform's dependencies, in the shape
 * health_add() takes. Each runs on the health thread, which owns the
 * connection it is given (rconn and amqpc are not thread-safe; the pool
 * is). */
#ifndef AE_DEPS_H
#define AE_DEPS_H

/* `ud` is a dbpool *. */
int deps_check_pg(void *ud);
/* `ud` is an rconn * used only by the health thread. */
int deps_check_redis(void *ud);
/* `ud` is an amqpc * used only by the health thread; connects when needed. */
int deps_check_amqp(void *ud);

#endif
