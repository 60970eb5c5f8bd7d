/* _server.c - the socket-facing runtime's loop: accept, poll, sweep, the public API.
 *
 * The runtime's other files, one concern each, are listed (with their layers) in
 * _runtime.h; this one is the top layer: what the loop thread and the public API do.
 *
 * Theory of operation
 * -------------------
 * One lmw_slot (32 bytes, calloc'd, indexed by fd) is all an idle connection owns. The
 * loop thread calls lmw_poll, which waits in epoll_wait without the lock, then does every
 * piece of WebSocket work it can in C and hands Python only what needs the application:
 * upgrades to authorise, HTTP requests, complete messages, closes.
 *
 * Reading borrows space from a bump arena over a fixed pool of read blocks; the space is
 * lent to Python with the events that point into it and returned all at once by the next
 * lmw_poll. Input that does not form a complete head or frame is copied into an exact-size
 * spill allocation in the connection's lmw_ext; a fragmented message is assembled there.
 * Output goes straight to the kernel; only what the kernel does not take is queued (and
 * EPOLLOUT armed) until it drains. Memory is bounded by configuration:
 *   read blocks      read_buffers x read_buffer_size; when used up, reading waits for the
 *                    next poll (epoll is level-triggered, the data waits in the kernel);
 *   input spill      spill_budget, charged for bytes received; past 3/4 of it no new
 *                    spill starts (whole messages are still served, see _input.c) and a
 *                    spill past it closes its connection with 1013;
 *   output           write_limit per connection and write_budget in all, by policy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include "_runtime.h"

#define MAX_EPOLL_EVENTS 256
#define MAX_SLOTS (1u << 22)

#define TICK_US ((uint64_t)TICK_MS * 1000u)

/* A heartbeat ping may go out up to this many ticks late, and a ping timeout may be
 * judged as late, but never later than 1/PING_SLACK_SHARE of the ping interval: pings that
 * fall due within the same second (of a 30 s interval) share one sweep instead of waking
 * the loop once each, and stay spread over the interval, never in synchronised rounds. */
#define PING_SLACK_TICKS 10u
#define PING_SLACK_SHARE 16u

static uint64_t monotonic_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* clock_to advances the loop's clock to real time `real`, less `stalled` microseconds
 * during which the loop did not run: deadlines (heartbeat, handshake, message, close) are
 * judged by this clock, so the server's own pauses never count against its clients. */
static void clock_to(lmw_server *s, uint64_t real, uint64_t stalled) {
    uint64_t elapsed = real > s->real_us ? real - s->real_us : 0;
    s->clock_us += elapsed > stalled ? elapsed - stalled : 0;
    s->real_us = real;
    s->now = (uint32_t)(s->clock_us / TICK_US);
}

static uint64_t past_grace(uint64_t lag) { return lag > LAG_GRACE_US ? lag - LAG_GRACE_US : 0; }

/* note_lag records one poll cycle's lag: how long the loop stayed away from epoll (its work
 * in C and in Python since epoll_wait last returned) plus how late epoll_wait returned (the
 * process stopped or starved).
 * The gauge is the longest lag of the current and the previous ~10 s window. */
static void note_lag(lmw_server *s, uint64_t lag) {
    s->lag_us = lag;
    uint64_t window_us = (uint64_t)LAG_WINDOW_TICKS * TICK_US;
    uint64_t since = s->real_us - s->lag_window_start_us;
    if (since >= window_us) { /* after a long sleep both windows are over: nothing recent */
        s->lag_prev_window_max = since < 2 * window_us ? s->lag_window_max : 0;
        s->lag_window_max = 0;
        s->lag_window_start_us = s->real_us;
    }
    if (lag > s->lag_window_max) s->lag_window_max = lag;
    uint64_t recent =
        s->lag_window_max > s->lag_prev_window_max ? s->lag_window_max : s->lag_prev_window_max;
    s->stats->loop_lag_us = recent;
    if (lag > s->stats->loop_lag_max_us) s->stats->loop_lag_max_us = lag;
}

/* ---------------------------------------------------------------- accept */

static int is_listener(lmw_server *s, int fd) {
    for (int i = 0; i < s->nlisteners; i++)
        if (s->listeners[i] == fd) return 1;
    return 0;
}

static void listeners_poll(lmw_server *s, int on) {
    if (on == s->listening) return;
    for (int i = 0; i < s->nlisteners; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = s->listeners[i]};
        if (epoll_ctl(s->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, s->listeners[i], &ev) < 0)
            s->stats->errors[LMW_ERR_EPOLL]++;
    }
    s->listening = on;
    s->stats->accept_paused = !on;
}

/* accepting_allowed: every slot in use counts against max_connections, lingering ones
 * (answered with an HTTP error, or closed and draining) included, so the fds kept for
 * Python and the listeners are never eaten. */
static int accepting_allowed(lmw_server *s) {
    return !s->stopped && !s->emfile && !s->accept_held && s->live < s->cfg.max_connections &&
           s->stats->handshakes < s->cfg.max_handshakes;
}

/* accept_batch accepts up to accept_batch connections; fewer while the loop lags, so that
 * a connect storm waits in the listen backlog (no deadline runs there) instead of being
 * accepted faster than its handshakes can be read. */
static void accept_batch(lmw_server *s, int lfd) {
    uint32_t batch = s->cfg.accept_batch;
    if (s->lag_us > LAG_SLOW_US) batch = batch / 4 ? batch / 4 : 1;
    for (uint32_t i = 0; i < batch && accepting_allowed(s); i++) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        int fd = accept4(lfd, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) s->emfile = 1;
            return;
        }
        if (lmw__conn_accept(s, fd) < 0) {
            close(fd);
            continue;
        }
        if (s->peers && lmw__peer_add(s, fd, &peer) > s->cfg.max_per_ip)
            lmw__conn_reject(s, fd, &s->slots[fd],
                             503); /* this address holds its share: 503, close */
    }
}

int lmw_adopt(lmw_server *s, int fd) {
    pthread_mutex_lock(&s->lock);
    int r = lmw__conn_accept(s, fd);
    pthread_mutex_unlock(&s->lock);
    if (r == 0) lmw_wake(s);
    return r;
}

/* ---------------------------------------------------------------- sweep */

/* The deadlines the sweep enforces, in ticks (0: off, for the ping and message ones). */
typedef struct {
    uint32_t hs, pi, pt, ct, mt;
    uint32_t slack; /* how late a ping (or its timeout) may be judged: see PING_SLACK_TICKS */
} deadlines;

static deadlines deadlines_of(const lmw_server *s) {
    deadlines d = {
        .hs = lmw__ticks(s->cfg.handshake_timeout_ms),
        .pi = lmw__ticks(s->cfg.ping_interval_ms),
        .pt = lmw__ticks(s->cfg.ping_timeout_ms),
        .ct = lmw__ticks(s->cfg.close_timeout_ms),
        .mt = lmw__ticks(s->cfg.message_timeout_ms),
    };
    d.slack =
        d.pi / PING_SLACK_SHARE < PING_SLACK_TICKS ? d.pi / PING_SLACK_SHARE : PING_SLACK_TICKS;
    return d;
}

/* plan keeps in *next the earliest tick a sweep must run at, never the current one (what
 * is due now was judged by this sweep). */
static void plan(const lmw_server *s, uint32_t *next, uint32_t at) {
    if (at <= s->now) at = s->now + 1;
    if (at < *next) *next = at;
}

/* note_partial follows fd's incomplete message (or frame) after a read: message_timeout
 * runs from the read that first left one incomplete, and the sweep is planned for it. */
static void note_partial(lmw_server *s, lmw_slot *sl) {
    if (sl->state != ST_OPEN || !sl->ext || !s->cfg.message_timeout_ms) return;
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!(x->in || x->msg)) {
        x->partial_since = 0;
        return;
    }
    if (x->partial_since) return;
    x->partial_since = s->now ? s->now : 1;
    lmw__sweep_by(s, x->partial_since + lmw__ticks(s->cfg.message_timeout_ms));
}

/* read_now reads fd's input in this poll, and follows a message it leaves incomplete. */
static void read_now(lmw_server *s, int fd, lmw_slot *sl, uint32_t what) {
    lmw__on_readable(s, fd, sl, what);
    note_partial(s, sl);
}

/* message_overdue: a message (or frame) begun is still incomplete after mt ticks; else the
 * tick it will be is planned. */
static int message_overdue(lmw_server *s, lmw_slot *sl, uint32_t mt, uint32_t *next) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!mt || !(x->in || x->msg)) {
        x->partial_since = 0;
        return 0;
    }
    if (!x->partial_since) x->partial_since = s->now ? s->now : 1;
    if (s->now - x->partial_since >= mt) return 1;
    plan(s, next, x->partial_since + mt);
    return 0;
}

/* input_first: a deadline of fd has passed, but the kernel holds input for it. It is read
 * now when this poll can take its events, and the connection is judged again by the next
 * sweep (planned for the next tick): a deadline is judged on what arrived, not on what the
 * loop had time to read. Returns 0 when nothing waits (judge now). */
static int input_first(lmw_server *s, int fd, lmw_slot *sl, uint32_t *next) {
    if (!lmw__bytes_waiting(fd)) return 0;
    if (s->nwork < s->maxwork && !(sl->flags & (F_PAUSED | F_BACKLOG)))
        read_now(s, fd, sl, EPOLLIN);
    plan(s, next, s->now + 1);
    return 1;
}

/* ping_wait is how long fd stays silent before its next ping: drawn from [pi/2, pi] by
 * hashing the connection and the start of its silence, so connections opened together
 * drift apart instead of being pinged in the same sweep for ever. */
static uint32_t ping_wait(int fd, const lmw_slot *sl, uint32_t pi) {
    uint64_t h = ((uint64_t)(uint32_t)fd << 32 | sl->tick) ^ ((uint64_t)sl->gen << 17);
    h *= 0x9e3779b97f4a7c15ull;
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    return pi - (uint32_t)(h % (pi / 2 + 1));
}

static void send_ping(lmw_server *s, int fd, lmw_slot *sl) {
    sl->flags |= F_PING_OUT;
    sl->tick = s->now;
    lmw__conn_send_control(s, fd, sl, LMW_OP_PING, NULL, 0);
}

/* sweep_open judges an open connection: a message past its deadline, a ping unanswered
 * past ping_timeout, a ping due. */
static void sweep_open(lmw_server *s, int fd, lmw_slot *sl, const deadlines *d, uint32_t *next) {
    if (sl->ext && message_overdue(s, sl, d->mt, next)) {
        if (!input_first(s, fd, sl, next))
            lmw__conn_fail(s, fd, 1008); /* a message trickled past its deadline */
        return;
    }
    if (!d->pi || (sl->flags & F_PAUSED)) return; /* resuming plans a sweep */
    uint32_t idle = s->now - sl->tick;
    if (sl->flags & F_PING_OUT) {
        if (idle < d->pt) {
            /* its pong may come first, and the next ping is due pi/2 or more after it:
             * judged again at the earlier of that and the timeout */
            uint32_t timeout_at = sl->tick + d->pt, pong_at = s->now + d->pi / 2;
            plan(s, next, (timeout_at < pong_at ? timeout_at : pong_at) + d->slack);
        } else if (!input_first(s, fd, sl, next)) {
            s->stats->ping_timeouts_total++;
            lmw__conn_free(s, fd, 1006);
        }
        return;
    }
    uint32_t wait = ping_wait(fd, sl, d->pi);
    if (idle < wait) {
        plan(s, next, sl->tick + wait + d->slack);
        return;
    }
    send_ping(s, fd, sl);
    plan(s, next, s->now + (d->pt < d->pi / 2 ? d->pt : d->pi / 2) + d->slack);
}

/* sweep judges every connection's deadlines and returns the tick of the earliest one still
 * ahead (NO_SWEEP: none). It walks the slot table up to the highest fd in use, so it runs
 * only when a deadline falls due (see lmw__sweep_by), and pings due within PING_SLACK_TICKS
 * of each other go out in one sweep. */
static uint32_t sweep(lmw_server *s) {
    deadlines d = deadlines_of(s);
    uint32_t next = NO_SWEEP;
    for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++) {
        lmw_slot *sl = &s->slots[fd];
        uint32_t idle = s->now - sl->tick;
        switch (sl->state) {
        case ST_HEAD:
        case ST_HTTP_BODY:
            if (idle < d.hs) {
                plan(s, &next, sl->tick + d.hs);
            } else if (!input_first(s, (int)fd, sl, &next)) {
                s->stats->handshake_timeouts_total++;
                lmw__conn_reject(s, (int)fd, sl, 408);
            }
            break;
        case ST_OPEN:
            sweep_open(s, (int)fd, sl, &d, &next);
            break;
        case ST_UPGRADE_PARKED:
        case ST_HTTP_PARKED: /* the hook took too long: its late answer finds a stale handle */
            if (idle < d.hs) {
                plan(s, &next, sl->tick + d.hs);
            } else {
                s->stats->handshake_timeouts_total++;
                lmw__conn_reject(s, (int)fd, sl, 408);
            }
            break;
        case ST_CLOSING:
            if (idle < d.ct)
                plan(s, &next, sl->tick + d.ct);
            else if (!input_first(s, (int)fd, sl, &next))
                lmw__conn_free(s, (int)fd, 0);
            break;
        case ST_LINGER:
            if (idle < d.ct)
                plan(s, &next, sl->tick + d.ct);
            else
                lmw__conn_free(s, (int)fd, 0);
            break;
        default:
            break;
        }
    }
    return next;
}

/* sweep_if_due runs the sweep once its planned tick has come, and plans the next one (the
 * verbs the sweep called may have planned one too: the earlier counts). */
static void sweep_if_due(lmw_server *s) {
    if (s->now < s->sweep_at) return;
    s->sweep_at = NO_SWEEP;
    uint32_t next = sweep(s);
    if (next < s->sweep_at) s->sweep_at = next;
}

/* ---------------------------------------------------------------- poll */

static void release_batch(lmw_server *s) {
    for (uint32_t i = 0; i < s->nlent; i++) free(s->lent[i]);
    s->nlent = 0;
    s->inflated_lent = 0;
    s->pool_next = 0;
    s->pool_off = 0;
    s->stats->buffer_pool_in_use = 0;
    for (int i = 0; i < s->nev; i++) {
        lmw_event *e = &s->ev[i];
        if (e->type != LMW_EV_UPGRADE && e->type != LMW_EV_HTTP) continue;
        lmw_slot *sl = lmw__slot(s, e->fd, e->gen);
        if (sl && (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT))
            lmw__conn_reject(s, e->fd, sl, 500);
    }
    s->nev = 0;
    s->nwork = 0;
    s->nups = 0;
}

static void drain_closed(lmw_server *s) {
    for (uint32_t i = 0; i < s->nclosed; i++) {
        lmw_event *e = lmw__push_event(s);
        if (e) *e = s->closed[i];
    }
    s->nclosed = 0;
}

static int ensure_batch(lmw_server *s, int max) {
    if (max < 1) max = 1;
    if (max > s->cap_reqs) {
        lmw_request *r = realloc(s->reqs, sizeof(lmw_request) * (size_t)max);
        if (!r) return -1;
        s->reqs = r;
        lmw_upgrade_pending *u = realloc(s->ups, sizeof(lmw_upgrade_pending) * (size_t)max);
        if (!u) return -1;
        s->ups = u;
        s->cap_reqs = max;
    }
    s->maxwork = max;
    return 0;
}

/* wait_for_io waits in epoll_wait (the lock dropped) at most timeout_ms, then handles what
 * arrived: flushes, reads, accepts, the wake-up. away: how long the loop worked since
 * epoll_wait last returned (for the lag gauge). Returns how many epoll events arrived. */
static int wait_for_io(lmw_server *s, int timeout_ms, uint64_t away) {
    struct epoll_event evs[MAX_EPOLL_EVENTS];
    s->asleep = timeout_ms != 0;
    pthread_mutex_unlock(&s->lock);
    uint64_t waiting_since = monotonic_us();
    int n = epoll_wait(s->epfd, evs, MAX_EPOLL_EVENTS, timeout_ms);
    uint64_t woke = monotonic_us();
    pthread_mutex_lock(&s->lock);
    s->asleep = 0;
    uint64_t waited = woke - waiting_since;
    uint64_t late = timeout_ms >= 0 && waited > (uint64_t)timeout_ms * 1000u
                        ? waited - (uint64_t)timeout_ms * 1000u
                        : 0;
    clock_to(s, woke, past_grace(late));
    note_lag(s, away + late);
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        uint32_t what = evs[i].events;
        if (fd == s->wakefd) {
            uint64_t v;
            ssize_t drained = read(s->wakefd, &v, sizeof v); /* EAGAIN: a racing read drained it */
            (void)drained;
            s->wake_pending = 1;
            continue;
        }
        if (is_listener(s, fd)) {
            accept_batch(s, fd);
            continue;
        }
        lmw_slot *sl = &s->slots[fd];
        if (sl->state == ST_FREE) continue;
        if (what & EPOLLOUT) lmw__conn_flush(s, fd, sl);
        if (sl->state == ST_FREE) continue;
        if ((what & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && s->nwork < s->maxwork)
            read_now(s, fd, sl, what);
    }
    return n;
}

/* earliest_ms is the shorter of two waits in ms (-1: none). */
static int earliest_ms(int a, int b) { return a < 0 || (b >= 0 && b < a) ? b : a; }

/* sweep_wait_ms is how long until the planned sweep, on the loop's clock (-1: none). */
static int sweep_wait_ms(const lmw_server *s) {
    if (s->sweep_at == NO_SWEEP) return -1;
    uint64_t due_us = (uint64_t)s->sweep_at * TICK_US;
    if (due_us <= s->clock_us) return 0;
    uint64_t ms = (due_us - s->clock_us + 999) / 1000;
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* wait_ms is how long the next epoll_wait may last: until `until` (real time, UINT64_MAX:
 * no limit), and no later than the paced sends' next step or the planned sweep. With none
 * of these the loop sleeps until an event: an idle server does not wake at all. */
static int wait_ms(const lmw_server *s, uint64_t until) {
    int wait = -1;
    if (until != UINT64_MAX) {
        uint64_t left = until > s->real_us ? until - s->real_us : 0;
        wait = left > (uint64_t)INT32_MAX * 1000u ? INT32_MAX : (int)((left + 999) / 1000);
    }
    return earliest_ms(earliest_ms(wait, lmw__paced_wait_ms(s)), sweep_wait_ms(s));
}

/* begin_turn is what a turn does before it waits: the previous batch's memory and
 * unanswered requests are released, deferred closes run, input held back is parsed. */
static void begin_turn(lmw_server *s) {
    release_batch(s);
    lmw__conn_run_deferred(s);
    drain_closed(s);
    lmw__run_backlog(s);
    lmw__resume_budget_paused(s);
    listeners_poll(s, accepting_allowed(s));
}

/* for_caller: the turn has something for lmw_poll's caller (events, a wake-up), or input
 * held back that it must parse at its next call (the backlog). Otherwise the turn was the
 * loop's own (a sweep, a pacing step, I/O handled in C such as pongs) and lmw_poll waits
 * again without a turn of the caller (Python). */
static int for_caller(const lmw_server *s, int n) {
    return n < 0 || s->nev || s->nclosed || s->wake_pending || s->nbacklog;
}

int lmw_poll(lmw_server *s, int timeout_ms, lmw_event **out, int max) {
    pthread_mutex_lock(&s->lock);
    uint64_t entered = monotonic_us();
    /* away: since epoll_wait last returned, the loop worked (here and in Python) */
    uint64_t away = s->polled ? entered - s->real_us : 0;
    clock_to(s, entered, past_grace(away));
    if (ensure_batch(s, max) < 0) {
        release_batch(s);
        pthread_mutex_unlock(&s->lock);
        return LMW_ERROR;
    }
    uint64_t until = timeout_ms >= 0 ? s->real_us + (uint64_t)timeout_ms * 1000u : UINT64_MAX;
    for (;;) {
        begin_turn(s);
        int busy = s->nev || s->nbacklog || s->wake_pending;
        int n = wait_for_io(s, busy ? 0 : wait_ms(s, until), away);
        uint64_t woke = s->real_us;
        sweep_if_due(s);
        lmw__paced_advance(s);
        drain_closed(s);
        if (for_caller(s, n) || s->real_us >= until) break;
        uint64_t worked = monotonic_us();
        away = worked - woke;
        clock_to(s, worked, past_grace(away));
    }
    if (s->wake_pending) {
        s->wake_pending = 0;
        lmw_event *e = lmw__push_event(s);
        if (e) e->type = LMW_EV_WAKE;
    }
    listeners_poll(s, accepting_allowed(s));
    *out = s->ev;
    int count = s->nev;
    s->polled = 1;
    pthread_mutex_unlock(&s->lock);
    return count;
}

int lmw_wake(lmw_server *s) {
    uint64_t one = 1;
    return write(s->wakefd, &one, sizeof one) == sizeof one ? 0 : LMW_ERROR;
}

/* ---------------------------------------------------------------- answers, sends */

/* batch_upgrade finds the upgrade of this batch that (fd, gen) is, or NULL. */
static lmw_upgrade_pending *batch_upgrade(lmw_server *s, int fd, uint32_t gen) {
    for (int i = 0; i < s->nups; i++)
        if (s->ups[i].fd == fd && s->ups[i].gen == gen) return &s->ups[i];
    return NULL;
}

int lmw_park(lmw_server *s, int fd, uint32_t gen) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && sl->state == ST_UPGRADE_WAIT) {
        lmw_upgrade_pending *u = batch_upgrade(s, fd, gen);
        if (u) {
            r = lmw__conn_park(s, fd, sl, u->key, u->key_len, u->pmd);
            u->fd = -1;
        }
    } else if (sl && sl->state == ST_HTTP_WAIT) {
        r = lmw__conn_park(s, fd, sl, NULL, 0, 0);
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_park_waiting(lmw_server *s) {
    int n = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < s->nev; i++) {
        lmw_event *e = &s->ev[i];
        if (e->type != LMW_EV_UPGRADE && e->type != LMW_EV_HTTP) continue;
        lmw_slot *sl = lmw__slot(s, e->fd, e->gen);
        if (!sl) continue;
        if (sl->state == ST_UPGRADE_WAIT) {
            lmw_upgrade_pending *u = batch_upgrade(s, e->fd, e->gen);
            if (!u) continue;
            n += lmw__conn_park(s, e->fd, sl, u->key, u->key_len, u->pmd) == 0;
            u->fd = -1;
        } else if (sl->state == ST_HTTP_WAIT) {
            n += lmw__conn_park(s, e->fd, sl, NULL, 0, 0) == 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

void lmw_accept_hold(lmw_server *s, int hold) {
    pthread_mutex_lock(&s->lock);
    s->accept_held = hold != 0;
    pthread_mutex_unlock(&s->lock);
    lmw_wake(s); /* the loop sets the listeners' interest at its next turn */
}

int lmw_upgrade_accept(lmw_server *s, int fd, uint32_t gen, const uint8_t *protocol,
                       size_t protocol_len, uint64_t user_tag) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    lmw_ext *x = sl ? lmw__ext_of(s, sl) : NULL;
    if (sl && sl->state == ST_UPGRADE_WAIT) {
        lmw_upgrade_pending *u = batch_upgrade(s, fd, gen);
        if (u) {
            r = lmw__conn_upgrade(s, fd, sl, u->key, u->key_len, protocol, protocol_len, user_tag,
                                  u->pmd);
            u->fd = -1;
        }
    } else if (sl && sl->state == ST_UPGRADE_PARKED && x) {
        r = lmw__conn_upgrade(s, fd, sl, x->parked_key, x->parked_key_len, protocol, protocol_len,
                              user_tag, x->parked_pmd);
    }
    if (r == 0) {
        /* the loop is woken only when it has something to do: frames that came before the
         * 101, or listeners to poll again now that a handshake left the cap (a wake per
         * upgrade would cost a loop turn each) */
        int wake = !s->listening && accepting_allowed(s);
        x = lmw__ext_of(s, sl);
        if (x && x->in) {
            lmw__backlog_add(s, fd, sl); /* frames sent before the 101 */
            wake = 1;
        } else {
            lmw__ext_trim(s, sl); /* a parked key was all it held: idle holds no ext */
        }
        if (wake) lmw_wake(s);
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_reject(lmw_server *s, int fd, uint32_t gen, int status) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && (lmw__awaits_upgrade_answer(sl->state) || lmw__awaits_http_answer(sl->state));
    if (ok) lmw__conn_reject(s, fd, sl, status);
    pthread_mutex_unlock(&s->lock);
    return ok ? 0 : LMW_ERROR;
}

int lmw_respond(lmw_server *s, int fd, uint32_t gen, const uint8_t *data, size_t len) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && lmw__awaits_http_answer(sl->state);
    if (ok) lmw__conn_respond(s, fd, sl, data, len);
    pthread_mutex_unlock(&s->lock);
    return ok ? 0 : LMW_ERROR;
}

int lmw_send(lmw_server *s, int fd, uint32_t gen, int opcode, const uint8_t *data, size_t len) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && lmw__may_receive_data(sl->state)) {
        uint8_t stack[DEFLATE_STACK], hdr[10];
        size_t zlen = 0;
        int cls = lmw__deflate_class(s, sl, len);
        uint8_t *z = cls ? lmw__deflate_frame(s, cls, opcode, data, len, stack, &zlen) : NULL;
        if (z) {
            r = lmw__conn_send_data(s, fd, sl, z, zlen, NULL, 0, 0, s->cfg.write_policy);
            lmw__deflate_frame_free(stack, z);
        } else {
            int hl = lmw_build_header(hdr, 1, opcode, len);
            r = lmw__conn_send_data(s, fd, sl, hdr, (size_t)hl, data, len, 0, s->cfg.write_policy);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_close(lmw_server *s, int fd, uint32_t gen, int code, const uint8_t *reason,
              size_t reason_len) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && lmw__may_receive_data(sl->state) && lmw_close_code_valid(code);
    /* DEFERRED: its own close goes out at the next poll, after Python's replies */
    if (ok && sl->state == ST_OPEN) lmw__conn_close(s, fd, sl, code, reason, reason_len);
    pthread_mutex_unlock(&s->lock);
    if (ok) lmw_wake(s);
    return ok ? 0 : LMW_ERROR;
}

int lmw_close_all(lmw_server *s, int code) {
    int n = 0;
    pthread_mutex_lock(&s->lock);
    lmw__paced_drop_all(s); /* shutdown: a paced remainder is dropped (counted), never sent */
    for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++) {
        lmw_slot *sl = &s->slots[fd];
        if (sl->state == ST_OPEN) {
            lmw__conn_close(s, (int)fd, sl, code, NULL, 0);
            n++;
        } else if (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY ||
                   lmw__is_parked_state(sl->state)) {
            lmw__conn_reject(s, (int)fd, sl, 503);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

int lmw_pause_reading(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && !(sl->flags & F_PAUSED)) {
        sl->flags |= F_PAUSED;
        lmw__set_interest(s, fd, sl, 0);
    }
    pthread_mutex_unlock(&s->lock);
    return sl ? 0 : LMW_ERROR;
}

int lmw_resume_reading(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && (sl->flags & F_PAUSED)) {
        sl->flags &= ~F_PAUSED;
        lmw__set_interest(s, fd, sl, 0);
        if (s->cfg.ping_interval_ms) /* its heartbeat, skipped while paused, may be due */
            lmw__sweep_by(s, s->now + deadlines_of(s).slack);
    }
    pthread_mutex_unlock(&s->lock);
    if (sl) lmw_wake(s);
    return sl ? 0 : LMW_ERROR;
}

int lmw_is_open(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int r = sl && lmw__may_receive_data(sl->state);
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_is_envelope(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int r = sl && lmw__may_receive_data(sl->state) && sl->envelope;
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_set_user(lmw_server *s, int fd, uint32_t gen, uint64_t user_tag) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int r = sl && lmw__is_open_state(sl->state) ? 0 : LMW_ERROR;
    if (r == 0 && sl->user_tag != user_tag) {
        uint64_t old = sl->user_tag;
        if (sl->user_tag) lmw__hub_user_remove(s, fd);
        sl->user_tag = user_tag;
        if (user_tag) lmw__hub_user_add(s, fd);
        lmw__user_name_left(s, old);
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

uint32_t lmw_connection_count(lmw_server *s) { return (uint32_t)s->stats->connections; }

lmw_stats *lmw_server_stats(lmw_server *s) { return s->stats; }

/* ---------------------------------------------------------------- lifecycle */

lmw_server *lmw_server_new(const lmw_config *cfg, lmw_stats *stats) {
    lmw_server *s = calloc(1, sizeof(lmw_server));
    if (!s) return NULL;
    pthread_mutex_init(&s->lock, NULL); /* first: lmw_server_free destroys it */
    s->epfd = s->wakefd = -1;
    s->cfg = *cfg;
    if (!s->cfg.read_buffers) s->cfg.read_buffers = 1;
    if (s->cfg.read_buffer_size < 2 * MIN_READ_SPACE) s->cfg.read_buffer_size = 2 * MIN_READ_SPACE;
    if (!s->cfg.accept_batch) s->cfg.accept_batch = 64;
    s->stats = stats ? stats : &s->own_stats;
    struct rlimit rl;
    uint64_t n = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) n = rl.rlim_cur;
    if (n > MAX_SLOTS) n = MAX_SLOTS;
    s->nslots = (uint32_t)n;
    s->slots = calloc(s->nslots, sizeof(lmw_slot)); /* untouched pages cost nothing */
    s->pool = calloc(s->cfg.read_buffers, sizeof(uint8_t *));
    if (s->cfg.max_per_ip) {
        uint32_t size = 64;
        while (size < 2 * s->nslots) size <<= 1;
        s->peer_mask = size - 1;
        s->peers = calloc(size, sizeof(lmw_peer)); /* untouched pages cost nothing */
        s->peer_of_fd = calloc(2 * (size_t)s->nslots, sizeof(uint64_t));
        s->peer_counted = calloc(s->nslots, 1);
    }
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = s->wakefd};
    int ok = s->slots && s->pool && s->epfd >= 0 && s->wakefd >= 0 &&
             epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->wakefd, &ev) == 0 && lmw__hub_init(s) == 0 &&
             (!s->cfg.max_per_ip || (s->peers && s->peer_of_fd && s->peer_counted));
    if (!ok) { /* every failure is the caller's OSError: no cap silently missing */
        lmw_server_free(s);
        return NULL;
    }
    s->real_us = s->lag_window_start_us = monotonic_us();
    s->clock_us = s->real_us;
    s->now = (uint32_t)(s->clock_us / TICK_US);
    s->sweep_at = NO_SWEEP;
    return s;
}

void lmw_server_free(lmw_server *s) {
    if (!s) return;
    for (uint32_t fd = 0; s->slots && fd <= s->max_fd_seen && fd < s->nslots; fd++)
        if (s->slots[fd].state != ST_FREE) lmw__conn_free(s, (int)fd, 1001);
    for (uint32_t i = 0; i < s->nlent; i++) free(s->lent[i]);
    for (uint32_t i = 0; s->pool && i < s->cfg.read_buffers; i++) free(s->pool[i]);
    lmw__paced_drop_all(s);
    lmw__user_names_free(s);
    lmw__hub_free(s);
    lmw__deflate_free(s);
    lmw__tls_server_free(s);
    if (s->epfd >= 0) close(s->epfd);
    if (s->wakefd >= 0) close(s->wakefd);
    free(s->pool);
    free(s->slots);
    free(s->exts);
    free(s->free_exts);
    free(s->lent);
    free(s->ev);
    free(s->reqs);
    free(s->ups);
    free(s->closed);
    free(s->backlog);
    free(s->budget_paused);
    free(s->deferred);
    free(s->peers);
    free(s->peer_of_fd);
    free(s->peer_counted);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

int lmw_listen_add(lmw_server *s, int fd) {
    pthread_mutex_lock(&s->lock);
    int ok = s->nlisteners < LMW_MAX_LISTENERS;
    if (ok && s->listening) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        ok = epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) == 0;
    }
    if (ok) s->listeners[s->nlisteners++] = fd;
    pthread_mutex_unlock(&s->lock);
    if (ok) lmw_wake(s);
    return ok ? 0 : LMW_ERROR;
}

void lmw_listen_stop(lmw_server *s) {
    pthread_mutex_lock(&s->lock);
    s->stopped = 1;
    listeners_poll(s, 0);
    pthread_mutex_unlock(&s->lock);
    lmw_wake(s);
}
