#include "deps.h"

#include "amqpc.h"
#include "dbpool.h"
#include "rconn.h"

int deps_check_pg(void *ud)
{
    return dbpool_ping(ud, 2000);
}

int deps_check_redis(void *ud)
{
    return rconn_ping(ud);
}

int deps_check_amqp(void *ud)
{
    amqpc *a = ud;

    if (!amqpc_is_connected(a) && amqpc_connect(a) < 0)
        return -1;
    return amqpc_ping(a);
}
