/* rtroutes: the runtime's route table and its matcher, independent of the
 * HTTP server (the server gives us a method and a path; we find the
 * handler and the {id}/{topic} segment). */
#ifndef RT_RTROUTES_H
#define RT_RTROUTES_H

#include "rt.h"

typedef void (*rt_handler)(rt *r, const rt_req *q, rt_resp *a);

typedef struct {
    const char *method;
    const char *pattern; /* segments; "{id}" or "{topic}" takes one */
    rt_handler fn;
} rt_route;

#define RT_PARAM_MAX 1024

/* The path segment a route captured (percent-decoded once, by libwebsockets), by name. */
typedef struct {
    const char *name;
    char value[RT_PARAM_MAX];
} rt_params;

/* Finds the route for method and path. Returns it with the captured
 * segment in *pp, or NULL with *status 404 (no such path) or 405 (other
 * methods only). GET routes answer HEAD too. */
const rt_route *rt_route_match(const char *method, const char *path, rt_params *pp, int *status);

/* The Khala WebSocket path: writes the topic of
 * /internal/v1/khala/topics/{topic}/ws into topic and returns 0, else -1. */
int rt_route_ws_topic(const char *path, char *topic, size_t topiclen);

#endif
