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

#define TICK_US 100000u

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
    if (s->real_us - s->lag_window_start_us >= (uint64_t)LAG_WINDOW_TICKS * TICK_US) {
        s->lag_prev_window_max = s->lag_window_max;
        s->lag_window_max = 0;
        s->lag_window_start_us = s->real_us;
    }
    if (lag > s->lag_window_max) s->lag_window_max = lag;
    uint64_t recent =
        s->lag_window_max > s->lag_prev_window_max ? s->lag_window_max : s->lag_prev_window_max;
    s->stats->loop_lag_us = recent;
    if (lag > s->stats->loop_lag_max_us) s->stats->loop_lag_max_us = lag;
}

static uint32_t ms_to_ticks(uint32_t ms) { return (ms + 99) / 100; }

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

/* message_overdue: a message (or frame) begun is still incomplete after mt ticks. Seen by
 * the once-a-second sweep, so the deadline holds to about a second. */
static int message_overdue(lmw_server *s, lmw_slot *sl, uint32_t mt) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!mt || !(x->in || x->msg)) {
        x->partial_since = 0;
        return 0;
    }
    if (!x->partial_since) x->partial_since = s->now ? s->now : 1;
    return s->now - x->partial_since >= mt;
}

/* input_first: a deadline of fd has passed, but the kernel holds input for it. It is read
 * now when this poll can take its events, and the connection is judged again by the next
 * sweep: a deadline is judged on what arrived, not on what the loop had time to read.
 * Returns 0 when nothing waits (judge now). */
static int input_first(lmw_server *s, int fd, lmw_slot *sl) {
    if (!lmw__bytes_waiting(fd)) return 0;
    if (s->nwork < s->maxwork && !(sl->flags & (F_PAUSED | F_BACKLOG)))
        lmw__on_readable(s, fd, sl, EPOLLIN);
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

static void sweep(lmw_server *s) {
    uint32_t hs = ms_to_ticks(s->cfg.handshake_timeout_ms);
    uint32_t pi = ms_to_ticks(s->cfg.ping_interval_ms);
    uint32_t pt = ms_to_ticks(s->cfg.ping_timeout_ms);
    uint32_t ct = ms_to_ticks(s->cfg.close_timeout_ms);
    uint32_t mt = ms_to_ticks(s->cfg.message_timeout_ms);
    for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++) {
        lmw_slot *sl = &s->slots[fd];
        uint32_t idle = s->now - sl->tick;
        switch (sl->state) {
        case ST_HEAD:
        case ST_HTTP_BODY:
            if (idle >= hs && !input_first(s, (int)fd, sl)) {
                s->stats->handshake_timeouts_total++;
                lmw__conn_reject(s, (int)fd, sl, 408);
            }
            break;
        case ST_OPEN:
            if (sl->ext && message_overdue(s, sl, mt) && !input_first(s, (int)fd, sl)) {
                lmw__conn_fail(s, (int)fd, 1008); /* a message trickled past its deadline */
                break;
            }
            if (!s->cfg.ping_interval_ms || (sl->flags & F_PAUSED)) break;
            if (sl->flags & F_PING_OUT) {
                if (idle >= pt && !input_first(s, (int)fd, sl)) {
                    s->stats->ping_timeouts_total++;
                    lmw__conn_free(s, (int)fd, 1006);
                }
            } else if (idle >= pi / 2 && idle >= ping_wait((int)fd, sl, pi)) {
                send_ping(s, (int)fd, sl);
            }
            break;
        case ST_UPGRADE_PARKED:
        case ST_HTTP_PARKED: /* the hook took too long: its late answer finds a stale handle */
            if (idle >= hs) {
                s->stats->handshake_timeouts_total++;
                lmw__conn_reject(s, (int)fd, sl, 408);
            }
            break;
        case ST_CLOSING:
            if (idle >= ct && !input_first(s, (int)fd, sl)) lmw__conn_free(s, (int)fd, 0);
            break;
        case ST_LINGER:
            if (idle >= ct) lmw__conn_free(s, (int)fd, 0);
            break;
        default:
            break;
        }
    }
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
    pthread_mutex_unlock(&s->lock);
    uint64_t waiting_since = monotonic_us();
    int n = epoll_wait(s->epfd, evs, MAX_EPOLL_EVENTS, timeout_ms);
    uint64_t woke = monotonic_us();
    pthread_mutex_lock(&s->lock);
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
            lmw__on_readable(s, fd, sl, what);
    }
    return n;
}

/* wait_ms is how long the next epoll_wait may last: until `until` (real time, UINT64_MAX:
 * no limit) and no later than the paced sends' next step. */
static int wait_ms(const lmw_server *s, uint64_t until) {
    int wait = -1;
    if (until != UINT64_MAX) {
        uint64_t left = until > s->real_us ? until - s->real_us : 0;
        wait = left > (uint64_t)INT32_MAX * 1000u ? INT32_MAX : (int)((left + 999) / 1000);
    }
    int pace_ms = lmw__paced_wait_ms(s);
    if (pace_ms >= 0 && (wait < 0 || wait > pace_ms)) wait = pace_ms;
    return wait;
}

/* quiet_pacing_step: the wait ended with nothing for the caller (no I/O, no event, no
 * wake-up) before the caller's timeout, and a paced send is in flight: its step is taken
 * here and lmw_poll waits again, so pacing costs no turn of the caller (Python) and no
 * sweep of its own: the sweep keeps the rate of the caller's polls, as when idle. */
static int quiet_pacing_step(const lmw_server *s, int n, uint64_t until) {
    return n == 0 && s->paced && !s->nev && !s->nclosed && !s->wake_pending && s->real_us < until;
}

/* step_before: a paced send's next step is due before `until`. */
static int step_before(const lmw_server *s, uint64_t until) {
    int pace_ms = lmw__paced_wait_ms(s);
    return pace_ms >= 0 && s->real_us + (uint64_t)pace_ms * 1000u < until;
}

int lmw_poll(lmw_server *s, int timeout_ms, lmw_event **out, int max) {
    pthread_mutex_lock(&s->lock);
    uint64_t entered = monotonic_us();
    /* away: since epoll_wait last returned, the loop worked (here and in Python) */
    uint64_t away = s->polled ? entered - s->real_us : 0;
    clock_to(s, entered, past_grace(away));
    release_batch(s);
    if (ensure_batch(s, max) < 0) {
        pthread_mutex_unlock(&s->lock);
        return LMW_ERROR;
    }
    lmw__conn_run_deferred(s);
    drain_closed(s);
    lmw__run_backlog(s);
    lmw__resume_budget_paused(s);
    listeners_poll(s, accepting_allowed(s));
    if (s->nev || s->nbacklog || s->wake_pending) timeout_ms = 0;
    uint64_t until = timeout_ms >= 0 ? s->real_us + (uint64_t)timeout_ms * 1000u : UINT64_MAX;
    while (quiet_pacing_step(s, wait_for_io(s, wait_ms(s, until), away), until)) {
        uint64_t step = s->real_us;
        lmw__paced_advance(s);
        uint64_t stepped = monotonic_us();
        away = stepped - step;
        clock_to(s, stepped, past_grace(away));
        if (s->nev || s->nclosed || !step_before(s, until))
            break; /* the caller's turn now, on this wake-up: its events, or its timeout */
    }
    if (s->wake_pending) {
        s->wake_pending = 0;
        lmw_event *e = lmw__push_event(s);
        if (e) e->type = LMW_EV_WAKE;
    }
    if (s->now != s->last_sweep) { /* at most once a tick: pings spread, deadlines kept */
        s->last_sweep = s->now;
        sweep(s);
    }
    lmw__paced_advance(s);
    drain_closed(s);
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
    s->now = s->last_sweep = (uint32_t)(s->clock_us / TICK_US);
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
