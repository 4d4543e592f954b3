/* messaging: the /ws WebSocket of SPEC 5a (topics, direct messages, rooms,
 * presence), scaled out through Redis (see docs/realtime.md). */
#ifndef RT_MESSAGING_H
#define RT_MESSAGING_H

#include "module.h"

extern const rt_module messaging_module;

#endif
