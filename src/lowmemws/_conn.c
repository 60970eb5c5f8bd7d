/* _conn.c - the connection state machine: every change of a slot's state is made here.
 *
 * The other runtime files call these verbs; none assigns lmw_slot.state itself (h11's
 * rule: one place holds the rules). The verbs that write (a 101, an HTTP error, a close
 * frame) use _output.c, which never frees or changes a connection: it reports a dead
 * socket and the verb that owns the slot ends it.
 *
 * Slot state machine (RFC 6455 sections 4 and 7)
 * ----------------------------------------------
 *   FREE --lmw__conn_accept--> HEAD
 *   HEAD --head complete, plain HTTP, body pending: await_body--> HTTP_BODY
 *   HEAD/HTTP_BODY --head (and body) complete, plain HTTP: await_answer--> HTTP_WAIT
 *   HTTP_WAIT --lmw__conn_respond--> LINGER
 *   HEAD --valid upgrade, auto_upgrade: lmw__conn_upgrade--> OPEN
 *   HEAD --valid upgrade: await_answer--> UPGRADE_WAIT --lmw__conn_upgrade--> OPEN
 *                                                      --lmw__conn_reject--> LINGER
 *   UPGRADE_WAIT --lmw__conn_park (an off-loop hook decides)--> UPGRADE_PARKED
 *        --lmw__conn_upgrade--> OPEN; --lmw__conn_reject (the hook's answer, 408 by the
 *        sweep, 503 at shutdown)--> LINGER; --the client hangs up--> FREE
 *   HTTP_WAIT --lmw__conn_park--> HTTP_PARKED --lmw__conn_respond, lmw__conn_reject--> LINGER
 *   HEAD/HTTP_BODY --bad head, cap, deadline: lmw__conn_reject--> LINGER (HTTP error)
 *   OPEN --peer's close: lmw__conn_end(ANSWER)--> LINGER (its close echoed)
 *   OPEN --lmw_close, shutdown: lmw__conn_close--> CLOSING --peer's close, deadline--> FREE
 *   OPEN/CLOSING --protocol error, limits: lmw__conn_fail--> LINGER (close frame, code)
 *   OPEN --protocol error or peer's close right after a message in the same read:
 *        lmw__conn_end--> DEFERRED --lmw__conn_run_deferred (next poll, once Python has
 *        answered that message)--> LINGER
 *   LINGER: output drains, then shutdown(SHUT_WR); input is discarded until EOF or the
 *           close deadline, so the peer reads our last bytes instead of a reset.
 *   any but FREE --TLS failure, the peer's close_notify: lmw__conn_abandon--> LINGER
 *   any --EOF, socket error, deadline: lmw__conn_free--> FREE (gen + 1: every handle to
 *        the fd goes stale)
 *
 * What each state may do (one predicate per question, in _runtime.h, used everywhere):
 *   state          counted as   may receive data   frames parsed   may subscribe
 *   HEAD..PARKED   handshake    no                 no              UPGRADE_WAIT/PARKED
 *   OPEN           connection   yes                yes             yes
 *   DEFERRED       connection   yes                no (stopped)    yes
 *   CLOSING        connection   no                 yes             no
 *   LINGER         connection if it was open       no              no
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "_runtime.h"

static const int CLOSE_CODES[LMW_CLOSE_CODES - 1] = {1000, 1001, 1002, 1003, 1005, 1006,
                                                     1007, 1008, 1009, 1011, 1013};

int lmw_close_code_index(int code) {
    for (int i = 0; i < LMW_CLOSE_CODES - 1; i++)
        if (CLOSE_CODES[i] == code) return i;
    return LMW_CLOSE_CODES - 1;
}

/* was_upgraded: the slot completed an upgrade (close_code is set to 1006 then, and to the
 * real code once a close frame is sent or received); it is counted as a connection and
 * gets a CLOSED event when freed. */
static int was_upgraded(const lmw_slot *sl) { return sl->close_code != 0; }

/* wake_sleeper wakes the loop when it sleeps (another thread is changing what it should
 * do: a deadline, a CLOSED event for on_close, accepting again after EMFILE); on the loop
 * thread it does nothing, since lmw_poll looks at all of these before it waits again. */
static void wake_sleeper(lmw_server *s) {
    if (!s->asleep) return;
    uint64_t one = 1;
    ssize_t w = write(s->wakefd, &one, sizeof one); /* full: a wake-up is pending anyway */
    (void)w;
}

/* ---------------------------------------------------------------- free */

/* unpark: the slot leaves a parked state (answered, or gone). */
static void unpark(lmw_server *s, lmw_slot *sl) {
    if (!lmw__is_parked_state(sl->state)) return;
    s->stats->handshakes_parked--;
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x) x->parked_key_len = 0;
}

/* lmw__conn_free closes the fd and forgets everything about the connection. */
void lmw__conn_free(lmw_server *s, int fd, uint16_t code) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state == ST_FREE) return;
    unpark(s, sl);
    if (lmw__is_handshake_state(sl->state)) s->stats->handshakes--;
    if (was_upgraded(sl)) {
        uint16_t c = code ? code : sl->close_code;
        s->stats->connections--;
        s->stats->closes[lmw_close_code_index(c)]++;
        if (lmw__grow((void **)&s->closed, &s->cap_closed, s->nclosed + 1, sizeof(lmw_event)) ==
            0) {
            lmw_event *e = &s->closed[s->nclosed++];
            memset(e, 0, sizeof(*e));
            e->type = LMW_EV_CLOSED;
            e->fd = fd;
            e->gen = sl->gen;
            e->code = c;
            e->user_tag = sl->user_tag;
            e->len = (uint64_t)lmw__user_name_hold(s, sl->user_tag); /* for on_close (lmw.h) */
        } else {
            s->stats->errors[LMW_ERR_NOMEM]++; /* on_close will not run for this one */
        }
    }
    lmw__hub_forget(s, fd);
    lmw__user_name_left(s, sl->user_tag); /* its name goes with its last connection */
    if (s->tls) lmw__tls_forget(s, fd);
    lmw__ext_drop(s, sl);
    lmw__peer_remove(s, fd);
    sl->gen++;
    sl->state = ST_FREE;
    sl->flags = 0;
    sl->deflate = 0;
    sl->close_code = 0;
    sl->envelope = 0;
    sl->user_tag = 0;
    s->live--;
    close(fd);
    s->emfile = 0;
    wake_sleeper(s); /* a send on another thread found it dead: on_close, maybe accepting */
}

/* written ends a connection whose socket died under a write (the write path reports it,
 * the owner of the slot ends it). Returns r unchanged. */
static int written(lmw_server *s, int fd, int r) {
    if (r < 0) lmw__conn_free(s, fd, 1006);
    return r;
}

/* ---------------------------------------------------------------- deadlines */

/* lmw__sweep_by: a deadline of some connection falls at tick `at` (a handshake, a close, a
 * heartbeat, a message), so the sweep that judges it must run by then. The loop sleeps
 * until the earliest such tick and no longer (lmw_poll): an idle server with nothing due
 * sleeps until an event. Each verb below that starts a deadline says so here; the sweep
 * itself plans the next one from what it finds. A call from another thread while the
 * loop sleeps (an off-loop hook's answer) wakes it, so it can wait less. */
void lmw__sweep_by(lmw_server *s, uint32_t at) {
    if (at >= s->sweep_at) return;
    s->sweep_at = at;
    wake_sleeper(s);
}

/* ---------------------------------------------------------------- handshake */

/* lmw__conn_accept starts a connection on fd: state HEAD, in the epoll set. */
int lmw__conn_accept(lmw_server *s, int fd) {
    if (fd < 0 || (uint32_t)fd >= s->nslots || s->slots[fd].state != ST_FREE) return LMW_ERROR;
    lmw_slot *sl = &s->slots[fd];
    if (s->tls && lmw__tls_start(s, fd) < 0) return LMW_ERROR;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        s->stats->errors[LMW_ERR_EPOLL]++;
        if (s->tls) lmw__tls_forget(s, fd);
        return LMW_ERROR;
    }
    sl->state = ST_HEAD;
    sl->flags = F_EPOLL_IN;
    sl->tick = s->now;
    sl->close_code = 0;
    if ((uint32_t)fd > s->max_fd_seen) s->max_fd_seen = (uint32_t)fd;
    s->live++;
    s->stats->handshakes++;
    lmw__sweep_by(s, s->now + lmw__ticks(s->cfg.handshake_timeout_ms));
    return 0;
}

/* lmw__conn_await_body: a plain HTTP head is complete and its body still arriving. */
void lmw__conn_await_body(lmw_slot *sl) { sl->state = ST_HTTP_BODY; }

/* lmw__conn_await_answer: the head (and body) went to Python as an UPGRADE or HTTP event. */
void lmw__conn_await_answer(lmw_slot *sl, int upgrade) {
    sl->state = upgrade ? ST_UPGRADE_WAIT : ST_HTTP_WAIT;
}

/* lmw__conn_park keeps a request handed to Python waiting past its batch, for a hook that
 * answers from another thread or coroutine: the upgrade's key is copied (its read buffer is
 * returned at the next poll), the socket is no longer read (input waits in the kernel), a
 * hang-up of the client frees the slot at once. The handshake deadline still runs. Returns
 * 0, or -1 when there is no memory for the key (the request is answered with 503). */
int lmw__conn_park(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key, size_t key_len,
                   int pmd) {
    if (sl->state == ST_UPGRADE_WAIT) {
        lmw_ext *x = key_len == WS_KEY_LEN ? lmw__ext_get(s, sl) : NULL;
        if (!x) {
            s->stats->errors[LMW_ERR_NOMEM] += key_len == WS_KEY_LEN;
            lmw__conn_reject(s, fd, sl, key_len == WS_KEY_LEN ? 503 : 500);
            return -1;
        }
        memcpy(x->parked_key, key, WS_KEY_LEN);
        x->parked_key_len = WS_KEY_LEN;
        x->parked_pmd = (uint8_t)pmd;
        sl->state = ST_UPGRADE_PARKED;
    } else {
        sl->state = ST_HTTP_PARKED;
    }
    s->stats->handshakes_parked++;
    lmw__sweep_by(s, sl->tick + lmw__ticks(s->cfg.handshake_timeout_ms)); /* still its deadline */
    lmw__set_interest(s, fd, sl, 1); /* always rewritten: EPOLLRDHUP even if input was off */
    return 0;
}

/* linger: we are done with the connection; it drains its output, then shuts down. */
static void linger(lmw_server *s, int fd, lmw_slot *sl) {
    if (s->tls) lmw__tls_send_alert(s, fd, sl, TLS_ALERT_CLOSE_NOTIFY); /* RFC 8446 6.1 */
    lmw_ext *x = lmw__ext_of(s, sl);
    sl->state = ST_LINGER;
    sl->tick = s->now;
    lmw__sweep_by(s, s->now + lmw__ticks(s->cfg.close_timeout_ms));
    if (x) {
        lmw__in_free(s, x);
        lmw__msg_free(s, x);
        x->ms.opcode = 0;
        x->head_scanned = 0;
    }
    if (x && x->out_head) {
        sl->flags |= F_SHUT_WR;
    } else {
        shutdown(fd, SHUT_WR);
        lmw__ext_trim(s, sl);
    }
    sl->flags &= ~(F_PAUSED | F_BUDGET);
    lmw__set_interest(s, fd, sl, 0);
}

/* lmw__conn_abandon ends a connection with nothing more from WebSocket or HTTP: its TLS layer
 * failed (the alert is written) or the peer's close_notify came. It lingers, so the peer reads
 * the last bytes instead of a reset; an open connection ends with 1006. */
void lmw__conn_abandon(lmw_server *s, int fd, lmw_slot *sl) {
    if (sl->state == ST_LINGER || sl->state == ST_FREE) return;
    unpark(s, sl);
    if (lmw__is_handshake_state(sl->state)) s->stats->handshakes--;
    linger(s, fd, sl);
}

/* answer_http writes a complete HTTP response and lingers (the connection ends with it). */
static void answer_http(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *resp, size_t len) {
    unpark(s, sl);
    if (lmw__is_handshake_state(sl->state)) s->stats->handshakes--;
    sl->state = ST_LINGER; /* before writing: a dead socket frees as a non-handshake */
    if (written(s, fd, lmw__write_raw(s, fd, sl, resp, len, NULL, 0, 0, 0)) < 0) return;
    linger(s, fd, sl);
}

/* lmw__conn_reject answers a head with an HTTP error response built at start-up. */
void lmw__conn_reject(lmw_server *s, int fd, lmw_slot *sl, int status) {
    size_t len = 0;
    const uint8_t *resp = lmw_reject_response(status, &len);
    if (!resp) resp = lmw_reject_response(500, &len);
    s->stats->rejects_total++;
    answer_http(s, fd, sl, resp, len);
}

/* lmw__conn_respond sends Python's answer to a plain HTTP request. */
void lmw__conn_respond(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *data, size_t len) {
    answer_http(s, fd, sl, data, len);
}

/* lmw__conn_upgrade completes the opening handshake (RFC 6455 section 4.2.2): the 101 is
 * written and the connection is open, with permessage-deflate when pmd (the result of
 * lmw_pmd_negotiate for its offers) accepted one. Returns 0, or -1 when it ended instead. */
int lmw__conn_upgrade(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key, size_t key_len,
                      const uint8_t *proto, size_t proto_len, uint64_t user_tag, int pmd) {
    uint8_t resp[640];
    int n = lmw_build_101(key, key_len, proto, proto_len, pmd, resp, sizeof resp);
    if (n < 0) {
        lmw__conn_reject(s, fd, sl, 500);
        return -1;
    }
    unpark(s, sl);
    s->stats->handshakes--;
    s->stats->handshakes_total++;
    s->stats->connections++;
    sl->state = ST_OPEN;
    lmw__set_interest(s, fd, sl, 0); /* a parked socket is read again */
    sl->close_code = 1006;           /* until a close frame says otherwise */
    sl->tick = s->now;
    sl->user_tag = user_tag;
    sl->deflate = lmw__deflate_class_of(pmd);
    sl->envelope = lmw__is_envelope_protocol(proto, proto_len);
    if (user_tag) lmw__hub_user_add(s, fd);
    if (s->cfg.ping_interval_ms) /* its first ping: no sooner than half the interval */
        lmw__sweep_by(s, s->now + lmw__ticks(s->cfg.ping_interval_ms) / 2);
    return written(s, fd, lmw__write_raw(s, fd, sl, resp, (size_t)n, NULL, 0, 0, 0)) < 0 ? -1 : 0;
}

/* ---------------------------------------------------------------- closing */

/* send_close queues our close frame (once); returns -1 when the connection died. */
static int send_close(lmw_server *s, int fd, lmw_slot *sl, int code, const uint8_t *reason,
                      size_t reason_len) {
    if (sl->flags & F_CLOSE_SENT) return 0;
    uint8_t payload[125];
    int n = 0; /* 1005 (the peer's close had no code): an empty close is echoed */
    if (code != 1005) {
        n = reason_len ? lmw_build_close_payload(payload, code, reason, reason_len) : -1;
        if (n < 0) { /* codes the server sends but may not accept (1013) are valid here */
            payload[0] = (uint8_t)(code >> 8);
            payload[1] = (uint8_t)code;
            n = 2;
        }
    }
    sl->flags |= F_CLOSE_SENT;
    return written(s, fd, lmw__send_control(s, fd, sl, LMW_OP_CLOSE, payload, (size_t)n));
}

/* lmw__conn_close starts the closing handshake (section 7.1.2): CLOSING until the peer
 * answers or close_timeout, counted from now whatever else arrives. */
void lmw__conn_close(lmw_server *s, int fd, lmw_slot *sl, int code, const uint8_t *reason,
                     size_t reason_len) {
    sl->close_code = (uint16_t)code;
    if (send_close(s, fd, sl, code, reason, reason_len) < 0) return;
    sl->state = ST_CLOSING;
    sl->tick = s->now;
    lmw__sweep_by(s, s->now + lmw__ticks(s->cfg.close_timeout_ms));
}

/* lmw__conn_fail fails the connection (section 7.1.7): a close frame with code, then the TCP
 * connection is closed once it drains. */
void lmw__conn_fail(lmw_server *s, int fd, int code) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state != ST_OPEN && sl->state != ST_CLOSING) return;
    if (sl->state == ST_OPEN) sl->close_code = (uint16_t)code;
    if (send_close(s, fd, sl, code, NULL, 0) < 0) return;
    linger(s, fd, sl);
}

/* answer_close echoes the peer's close code (section 5.5.1) and lingers. */
static void answer_close(lmw_server *s, int fd, lmw_slot *sl, uint16_t code) {
    sl->close_code = code;
    if (send_close(s, fd, sl, code, NULL, 0) < 0) return;
    linger(s, fd, sl);
}

/* message_waiting reports whether this batch holds a message of fd for Python. */
static int message_waiting(lmw_server *s, int fd, uint32_t gen) {
    for (int i = s->nev - 1; i >= 0; i--)
        if (s->ev[i].type == LMW_EV_MESSAGE && s->ev[i].fd == fd && s->ev[i].gen == gen) return 1;
    return 0;
}

static void end_now(lmw_server *s, int fd, lmw_slot *sl, uint8_t what, uint16_t code) {
    if (what == DEFER_FAIL)
        lmw__conn_fail(s, fd, code);
    else
        answer_close(s, fd, sl, code);
}

/* lmw__conn_end ends the connection (fail with code, or answer the peer's close) once
 * Python has handled the messages read before the close, so that its replies to them reach
 * the peer first (DEFERRED until the next poll); with no such message it ends it now. */
void lmw__conn_end(lmw_server *s, int fd, lmw_slot *sl, uint8_t what, int code) {
    if (sl->state == ST_OPEN && message_waiting(s, fd, sl->gen) &&
        lmw__grow((void **)&s->deferred, &s->cap_deferred, s->ndeferred + 1,
                  sizeof(lmw_deferred)) == 0) {
        s->deferred[s->ndeferred++] =
            (lmw_deferred){.fd = fd, .gen = sl->gen, .code = (uint16_t)code, .what = what};
        sl->state = ST_DEFERRED;
        return;
    }
    end_now(s, fd, sl, what, (uint16_t)code);
}

/* lmw__conn_run_deferred ends the DEFERRED connections of the previous batch. */
void lmw__conn_run_deferred(lmw_server *s) {
    for (uint32_t i = 0; i < s->ndeferred; i++) {
        lmw_deferred *d = &s->deferred[i];
        lmw_slot *sl = lmw__slot(s, d->fd, d->gen);
        if (!sl || sl->state != ST_DEFERRED) continue;
        sl->state = ST_OPEN;
        end_now(s, d->fd, sl, d->what, d->code);
    }
    s->ndeferred = 0;
}

/* ---------------------------------------------------------------- sending */

/* lmw__conn_send_control sends a control frame (ping, pong) ahead of queued data. */
int lmw__conn_send_control(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p,
                           size_t n) {
    return written(s, fd, lmw__send_control(s, fd, sl, opcode, p, n));
}

/* lmw__conn_send_data sends a complete data frame (header a + payload b) under the write
 * bounds; past them the policy applies: "close" fails the connection with 1008 (what it had
 * not begun to receive is dropped, so the close comes next), else the frame is dropped.
 * Returns 1 sent or queued, 0 dropped or closed, -1 gone. */
int lmw__conn_send_data(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                        const uint8_t *b, size_t blen, uint64_t topic, int policy) {
    if (!lmw__may_receive_data(sl->state)) return -1;
    int r = written(s, fd, lmw__write_data(s, fd, sl, a, alen, b, blen, topic, policy));
    if (r != 0) return r;
    if (policy != LMW_POLICY_CLOSE) {
        s->stats->dropped[LMW_DROP_WRITE_LIMIT]++;
        return 0;
    }
    s->stats->dropped[LMW_DROP_CLOSED]++;
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x) lmw__drop_unsent(s, x);
    lmw__conn_fail(s, fd, 1008);
    return 0;
}

/* lmw__conn_flush writes queued output once the socket is writable. */
void lmw__conn_flush(lmw_server *s, int fd, lmw_slot *sl) {
    written(s, fd, lmw__flush_out(s, fd, sl));
}
