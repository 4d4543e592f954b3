# Top-level build. `make` builds libshared/libshared.a and every program into
# bin/. Objects live out of tree under $(O); V=1 shows full command lines;
# SANITIZE=address,undefined builds an instrumented copy in its own tree so
# that it never mixes with the normal objects.
#
# CFLAGS, CPPFLAGS, LDFLAGS and LDLIBS are the user's: they only add to what
# the build needs (make CFLAGS=-O0 still gets -Werror, -MMD and -pthread),
# which lives in the ALL_* variables (git's pattern). CFLAGS defaults to
# -O2 -g.

CC       ?= cc
SANITIZE ?=
ifeq ($(SANITIZE),)
O        ?= build
BINDIR   ?= bin
else
O        ?= build-san
BINDIR   ?= build-san/bin
endif

CFLAGS   ?= -O2 -g
PKGS      := libmicrohttpd libpq hiredis librabbitmq libcjson libcurl libjwt openssl
PKGS_ALL  := $(PKGS) libwebsockets

# Goals that build nothing here (deps installs the packages; test, bench, up
# and run install them first, then build in a sub-make).
NOBUILD_GOALS := deps clean down test bench up run lint docker-test fuzz valgrind faults
ifneq ($(filter-out $(NOBUILD_GOALS),$(or $(MAKECMDGOALS),all)),)
PKG_MISSING := $(strip $(foreach p,$(PKGS_ALL),$(if $(shell pkg-config --exists $(p) 2>/dev/null && echo y),,$(p))))
ifneq ($(PKG_MISSING),)
$(error pkg-config does not know: $(PKG_MISSING) (scripts/deps.sh, or make deps, installs them))
endif
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS_ALL))
PKG_LIBS   := $(shell pkg-config --libs $(PKGS))
LWS_LIBS   := $(shell pkg-config --libs libwebsockets) -lev
endif

WARN      := -std=c11 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
             -Wmissing-prototypes -Wwrite-strings -Wvla -fno-common
ALL_CPPFLAGS = -D_GNU_SOURCE -Ilibshared $(PKG_CFLAGS) $(CPPFLAGS)
ALL_CFLAGS   = $(WARN) -pthread -MMD -MP $(SAN_CFLAGS) $(CFLAGS)
ALL_LDFLAGS  = -pthread $(SAN_LDFLAGS) $(LDFLAGS)
ALL_LDLIBS   = $(PKG_LIBS) -lcrypt -lpthread -lm $(LDLIBS)
ifneq ($(SANITIZE),)
SAN_CFLAGS  := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
# gcc's sanitizer link spec turns --no-as-needed on for the libraries that
# follow it, so a sanitized program would carry every library of PKGS;
# --as-needed restores the set the plain build links (test_docker compares it
# with the images' packages).
SAN_LDFLAGS := -fsanitize=$(SANITIZE) -Wl,--as-needed
endif
# The libFuzzer tree (make fuzz): every object gets coverage hooks.
ifneq ($(FUZZ),)
SAN_CFLAGS  += -fsanitize=fuzzer-no-link
endif

ifeq ($(V),1)
Q :=
msg = @true
else
Q := @
msg = @printf '  %-6s %s\n' $(1) $(2)
endif

LIB       := $(O)/libshared/libshared.a
LIB_SRCS  := $(wildcard libshared/*.c)
LIB_OBJS  := $(LIB_SRCS:%.c=$(O)/%.o)

# Each program: its sources. A service directory's *_main.c files are the
# entry points of extra programs; every other .c in it belongs to all of them.
svc_common = $(filter-out $(1)/%main.c,$(wildcard $(1)/*.c))
api-gateway_SRCS      := $(call svc_common,api-gateway) api-gateway/main.c
event-processor_SRCS  := $(call svc_common,event-processor) event-processor/main.c
action-workers_SRCS   := $(call svc_common,action-workers) action-workers/main.c
realtime_SRCS         := $(call svc_common,realtime) realtime/main.c
runtime_SRCS          := $(call svc_common,runtime) runtime/main.c
runtime-migrate_SRCS  := runtime/migrate_main.c
runtime-smoke_SRCS    := runtime/smoke_main.c
migrate_SRCS          := database/migrate_main.c
# libwebsockets (libshared/wsapp) only where a program serves WebSocket.
realtime_LIBS          = $(LWS_LIBS)
runtime_LIBS           = $(LWS_LIBS)

PROGRAMS  := api-gateway event-processor action-workers realtime runtime \
             runtime-migrate runtime-smoke migrate
BINS      := $(PROGRAMS:%=$(BINDIR)/%)

UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(O)/tests/%)
# Small programs that integration tests drive (tests/integration/drivers).
DRV_SRCS  := $(wildcard tests/integration/drivers/*.c)
DRV_BINS  := $(DRV_SRCS:tests/integration/drivers/%.c=$(O)/tests/drivers/%)
# action-workers with fault injection, for tests only: worker.c built again
# with -DAE_FAULTS (see worker.c), every other object shared with bin/.
FAULT_BIN := $(O)/tests/action-workers-faults

# libFuzzer targets (tests/fuzz/fuzz_*.c), built by clang in build-fuzz/;
# a target of a service's parser links that service's objects (not main.c).
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS := $(FUZZ_SRCS:tests/fuzz/%.c=$(O)/fuzz/%)
FUZZ_DIR  := build-fuzz
FUZZ_SECONDS ?= 10
fuzz_template_SVC    := action-workers
fuzz_h1_SVC          := action-workers
fuzz_sse_publish_SVC := api-gateway
fuzz_rtes_msg_SVC    := realtime
fuzz_proxy_headers_SVC := api-gateway
fuzz_runtime_requests_SVC := runtime
fuzz_gateway_bodies_SVC := api-gateway
fuzz_mcp_reply_SVC   := action-workers
# fuzz_ws_messages compiles realtime/messaging.c in itself (its hooks are static).

ALL_OBJS  := $(LIB_OBJS) $(sort $(foreach p,$(PROGRAMS),$($(p)_SRCS:%.c=$(O)/%.o))) \
             $(UNIT_SRCS:%.c=$(O)/%.o) $(DRV_SRCS:%.c=$(O)/%.o) $(O)/faults/action-workers/worker.o \
             $(if $(FUZZ),$(FUZZ_SRCS:%.c=$(O)/%.o))

.PHONY: all test unit bench run up down clean deps lint lint-run tests docker-test fuzz fuzz-build fuzz-bins valgrind faults
all: $(LIB) $(BINS) libshared/libshared.a

tests: $(UNIT_BINS) $(DRV_BINS) $(FAULT_BIN)

# The SPEC names libshared/libshared.a; the real archive stays out of tree.
libshared/libshared.a: $(LIB)
	$(Q)ln -sf ../$(LIB) $@ 2>/dev/null || cp $(LIB) $@

$(LIB): $(LIB_OBJS)
	$(call msg,AR,$@)
	$(Q)rm -f $@ && ar rcs $@ $^

$(O)/%.o: %.c
	@mkdir -p $(@D)
	$(call msg,CC,$<)
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) -c -o $@ $<

define program_rule
$(BINDIR)/$(1): $$($(1)_SRCS:%.c=$(O)/%.o) $(LIB)
	@mkdir -p $$(@D)
	$$(call msg,LINK,$$@)
	$(Q)$$(CC) $$(ALL_LDFLAGS) -o $$@ $$^ $$($(1)_LIBS) $$(ALL_LDLIBS)
endef
$(foreach p,$(PROGRAMS),$(eval $(call program_rule,$(p))))

$(O)/tests/%: $(O)/tests/unit/%.o $(LIB)
	@mkdir -p $(@D)
	$(call msg,LINK,$@)
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(ALL_LDLIBS) $(LWS_LIBS) -lcmocka

$(O)/faults/%.o: %.c
	@mkdir -p $(@D)
	$(call msg,CC,$<+faults)
	$(Q)$(CC) $(ALL_CPPFLAGS) -DAE_FAULTS $(ALL_CFLAGS) -c -o $@ $<

$(FAULT_BIN): $(filter-out $(O)/action-workers/worker.o,$(action-workers_SRCS:%.c=$(O)/%.o)) \
              $(O)/faults/action-workers/worker.o $(LIB)
	@mkdir -p $(@D)
	$(call msg,LINK,$@)
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(ALL_LDLIBS)

# rtbus_hold drives realtime's Redis bus itself.
$(O)/tests/integration/drivers/rtbus_hold.o: ALL_CPPFLAGS += -Irealtime
$(O)/tests/drivers/rtbus_hold: $(O)/realtime/rtbus.o

$(O)/tests/drivers/%: $(O)/tests/integration/drivers/%.o $(LIB)
	@mkdir -p $(@D)
	$(call msg,LINK,$@)
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(ALL_LDLIBS) $(LWS_LIBS)

define fuzz_rule
$(O)/tests/fuzz/$(1).o: ALL_CPPFLAGS += $(if $($(1)_SVC),-I$($(1)_SVC))
$(O)/fuzz/$(1): $(O)/tests/fuzz/$(1).o $(if $($(1)_SVC),$(O)/fuzz/lib$($(1)_SVC).a) $(LIB)
	@mkdir -p $$(@D)
	$$(call msg,LINK,$$@)
	$(Q)$$(CC) $$(ALL_LDFLAGS) -fsanitize=fuzzer -o $$@ $$(filter %.o %.a,$$^) $$(ALL_LDLIBS) $(LWS_LIBS)
endef
$(foreach f,$(FUZZ_SRCS:tests/fuzz/%.c=%),$(eval $(call fuzz_rule,$(f))))
# A service's objects as an archive: a target pulls in only what it calls.
define fuzz_svc_rule
$(O)/fuzz/lib$(1).a: $(patsubst %.c,$(O)/%.o,$(call svc_common,$(1)))
	@mkdir -p $$(@D)
	$(Q)rm -f $$@ && ar rcs $$@ $$^
endef
$(foreach s,$(sort $(foreach f,$(FUZZ_SRCS:tests/fuzz/%.c=%),$($(f)_SVC))),$(eval $(call fuzz_svc_rule,$(s))))
fuzz-bins: $(FUZZ_BINS)

# `make fuzz [FUZZ_SECONDS=600]`: every target for FUZZ_SECONDS each.
fuzz-build:
	$(Q)$(MAKE) --no-print-directory CC=clang SANITIZE=address,undefined FUZZ=1 O=$(FUZZ_DIR) \
		BINDIR=$(FUZZ_DIR)/bin CFLAGS='-O1 -g' fuzz-bins
fuzz: deps
	$(Q)$(MAKE) --no-print-directory fuzz-build
	$(Q)FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run.sh $(FUZZ_SRCS:tests/fuzz/%.c=$(FUZZ_DIR)/fuzz/%)

unit: $(UNIT_BINS)
	$(Q)O=$(O) tests/run-unit.sh $(UNIT_BINS)

# `make valgrind`: the unit tests under memcheck; any leak (definite or
# indirect) or memory error fails the binary. cmocka forks no children,
# so one process per binary is all memcheck has to watch. Then
# scripts/valgrind.sh: one short integration run of each service under
# memcheck (also the last stage of a plain `make test`).
VALGRIND := valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect \
            --errors-for-leak-kinds=definite,indirect --track-origins=yes
valgrind: deps
	$(Q)$(MAKE) --no-print-directory all $(UNIT_BINS)
	$(Q)O=$(O) UNIT_TIMEOUT=900 UNIT_WRAP="$(VALGRIND)" tests/run-unit.sh $(UNIT_BINS)
	$(Q)BINDIR=$(BINDIR) scripts/valgrind.sh

# `make test`: install what is missing, start the local servers, then every
# unit, integration and end-to-end test against them.
# test, bench, up and run build in a sub-make, after deps: on a fresh
# machine the packages pkg-config reads are there only then.
test: deps
	$(Q)$(MAKE) --no-print-directory all $(UNIT_BINS) $(DRV_BINS) $(FAULT_BIN)
	$(if $(SANITIZE),,$(Q)$(MAKE) --no-print-directory fuzz-build)
	$(Q)O=$(O) BINDIR=$(BINDIR) FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_BINDIR=$(if $(SANITIZE),,$(FUZZ_DIR)/fuzz) \
		VALGRIND_RUN=$(if $(SANITIZE),,1) tests/run.sh

bench: deps
	$(Q)$(MAKE) --no-print-directory all $(DRV_BINS)
	$(Q)O=$(O) BINDIR=$(BINDIR) scripts/bench.sh

deps:
	$(Q)scripts/deps.sh

# `make faults [FAULTS_ARGS='--faults kill9:runtime,restart:pg']`: fault
# injection under load against a stack of its own (docs/reliability.md);
# long, so not part of `make test` (which runs one short fault of it).
faults: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)BINDIR=$(BINDIR) scripts/faults.sh $(FAULTS_ARGS)

up: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)BINDIR=$(BINDIR) scripts/stack.sh up

down:
	$(Q)scripts/stack.sh down

run: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)BINDIR=$(BINDIR) scripts/stack.sh run

# `make docker-test`: every image of docker/ built with podman (on a base
# image debootstrap makes once), each service started from its image against
# the local servers and its health route checked, each image's size printed.
# Needs root; installs podman and debootstrap (scripts/deps.sh docker).
docker-test: deps
	$(Q)scripts/docker-test.sh

# `make lint`: cppcheck and clang-tidy (its static analyzer) over every
# source; any warning fails. Left out: clang-analyzer's valist.Uninitialized,
# which reports each va_start/vsnprintf pair as uninitialized with glibc's
# va_list, and insecureAPI.DeprecatedOrUnsafeBufferHandling, which asks for
# C11 Annex K (memcpy_s), which glibc does not have. scripts/lint/
# cjson-analyzer.h tells the analyzer that cJSON's predicates are false for
# NULL; the other false reports carry a NOLINTNEXTLINE naming the check and
# why.
LINT_SRCS   = $(sort $(LIB_SRCS) $(foreach p,$(PROGRAMS),$($(p)_SRCS)))
TIDY_CHECKS := -*,clang-analyzer-*,-clang-analyzer-valist.Uninitialized,$\
               -clang-analyzer-security.insecureAPI.DeprecatedOrUnsafeBufferHandling
lint:
	$(Q)scripts/deps.sh lint
	$(Q)$(MAKE) --no-print-directory lint-run

lint-run:
	$(call msg,CPPCHECK,sources)
	$(Q)cppcheck -q --std=c11 --enable=warning,performance,portability --error-exitcode=1 --inline-suppr \
	    -D_GNU_SOURCE -Ilibshared -j2 $(LINT_SRCS)
	$(call msg,TIDY,sources)
	$(Q)printf '%s\n' $(LINT_SRCS) | xargs -P2 -n8 sh -c 'clang-tidy --quiet --warnings-as-errors="*" \
	    -checks="$(TIDY_CHECKS)" "$$@" -- $(ALL_CPPFLAGS) -include scripts/lint/cjson-analyzer.h -std=c11 \
	    2>/dev/null' _

clean:
	rm -rf build build-san build-fuzz bin libshared/libshared.a

# Keep test objects: make would delete them as intermediates.
.SECONDARY: $(ALL_OBJS)

-include $(ALL_OBJS:.o=.d)
