/* _input.c - reading: borrowed read space, request heads, frames, messages.
 *
 * A readable socket gets space from the bump arena over the pooled read blocks; what
 * does not complete a head or frame is kept in an exact-size spill. Complete messages
 * become events that point into the arena (or into a lent spill) until the next poll.
 * A close caused by what was read right after a message waits (DEFERRED) until Python
 * has answered that message, so replies are never overtaken by the close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "_runtime.h"

/* ---------------------------------------------------------------- read space */

static int take_read_space(lmw_server *s, size_t need, uint8_t **buf, size_t *cap) {
    size_t bs = s->cfg.read_buffer_size;
    if (need > bs) return -1;
    for (;;) {
        if (s->pool_next > 0) {
            size_t left = bs - s->pool_off;
            if (left >= need && left >= MIN_READ_SPACE) {
                *buf = s->pool[s->pool_next - 1] + s->pool_off;
                *cap = left;
                return 0;
            }
        }
        if (s->pool_next >= s->cfg.read_buffers) return -1;
        if (!s->pool[s->pool_next]) {
            s->pool[s->pool_next] = malloc(bs);
            if (!s->pool[s->pool_next]) return -1;
        }
        s->pool_next++;
        s->pool_off = 0;
        s->stats->buffer_pool_in_use = s->pool_next;
    }
}

static void commit_read_space(lmw_server *s, size_t used) { s->pool_off += (uint32_t)used; }

/* spill keeps n pending bytes in the connection's ext, in an allocation of cap >= n. */
static int spill(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *p, size_t n, size_t cap) {
    lmw_ext *x = lmw__ext_get(s, sl);
    if (!x) return -1;
    if (x->in == p) { /* already there (reading straight into a large frame) */
        x->in_len = (uint32_t)n;
        return 0;
    }
    if (cap < n) cap = n;
    if (s->stats->spill_bytes + cap > s->cfg.spill_budget) return -1;
    uint8_t *m = malloc(cap ? cap : 1);
    if (!m) return -1;
    memcpy(m, p, n);
    lmw__in_free(s, x);
    x->in = m;
    x->in_len = (uint32_t)n;
    x->in_cap = (uint32_t)cap;
    s->stats->spill_bytes += cap;
    return 0;
}

void lmw__backlog_add(lmw_server *s, int fd, lmw_slot *sl) {
    if (sl->flags & F_BACKLOG) return;
    if (lmw__grow((void **)&s->backlog, &s->cap_backlog, s->nbacklog + 1, sizeof(int)) < 0) return;
    s->backlog[s->nbacklog++] = fd;
    sl->flags |= F_BACKLOG;
}

/* ---------------------------------------------------------------- handshake */

void lmw__reject(lmw_server *s, int fd, lmw_slot *sl, int status) {
    size_t len = 0;
    const uint8_t *resp = lmw_reject_response(status, &len);
    if (!resp) resp = lmw_reject_response(500, &len);
    if (lmw__is_handshake_state(sl->state)) s->stats->handshakes--;
    s->stats->rejects_total++;
    sl->state = ST_LINGER; /* before writing: a dead socket frees as a non-handshake */
    if (resp && lmw__write_raw(s, fd, sl, resp, len, NULL, 0, 0, 0) < 0) return;
    lmw__start_linger(s, fd, sl);
}

int lmw__open_connection(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key, size_t key_len,
                         const uint8_t *proto, size_t proto_len, uint64_t user_tag) {
    uint8_t resp[512];
    int n = lmw_build_101(key, key_len, proto, proto_len, resp, sizeof resp);
    if (n < 0) {
        lmw__reject(s, fd, sl, 500);
        return -1;
    }
    s->stats->handshakes--;
    s->stats->handshakes_total++;
    s->stats->connections++;
    sl->state = ST_OPEN;
    sl->close_code = 1006; /* until a close frame says otherwise */
    sl->tick = s->now;
    sl->user_tag = user_tag;
    if (user_tag) lmw__hub_user_add(s, fd);
    if (lmw__write_raw(s, fd, sl, resp, (size_t)n, NULL, 0, 0, 0) < 0) return -1;
    return 0;
}

/* request_event hands a complete head (and body) to Python with its request view; both
 * stay valid until the next lmw_poll. */
static void request_event(lmw_server *s, int fd, lmw_slot *sl, uint8_t type, const uint8_t *buf,
                          size_t len, const lmw_request *req) {
    lmw_event *e = lmw__push_event(s);
    if (!e) return lmw__reject(s, fd, sl, 500);
    s->reqs[s->nwork] = *req;
    e->type = type;
    e->fd = fd;
    e->gen = sl->gen;
    e->data = buf;
    e->len = len;
    e->request = &s->reqs[s->nwork++];
}

void lmw__process_head(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len) {
    lmw_ext *x = lmw__ext_of(s, sl);
    lmw_request req;
    memset(&req, 0, sizeof req);
    if (x) req.scanned = x->head_scanned;
    int r = lmw_parse_request(buf, len, s->cfg.max_head, &req);
    if (r == LMW_INCOMPLETE) {
        if (spill(s, fd, sl, buf, len, len) < 0) return lmw__reject(s, fd, sl, 503);
        lmw__ext_of(s, sl)->head_scanned = req.scanned ? req.scanned : 1;
        return;
    }
    if (x) x->head_scanned = 0;
    if (r < 0) return lmw__reject(s, fd, sl, req.status ? req.status : 400);
    size_t head_len = (size_t)r;
    if (req.kind == LMW_KIND_HTTP) {
        if (req.content_length > s->cfg.max_http_body) return lmw__reject(s, fd, sl, 413);
        size_t total = head_len + (size_t)req.content_length;
        if (len < total) {
            sl->state = ST_HTTP_BODY;
            if (spill(s, fd, sl, buf, len, total) < 0) return lmw__reject(s, fd, sl, 503);
            return;
        }
        if (s->nwork >= s->maxwork) { /* answer on the next poll */
            if (spill(s, fd, sl, buf, len, len) < 0) return lmw__reject(s, fd, sl, 503);
            lmw__ext_of(s, sl)->head_scanned = 0;
            sl->state = ST_HTTP_BODY;
            lmw__backlog_add(s, fd, sl);
            return;
        }
        s->stats->http_requests_total++;
        sl->state = ST_HTTP_WAIT;
        return request_event(s, fd, sl, LMW_EV_HTTP, buf, total, &req);
    }
    const uint8_t *key = buf + req.headers[LMW_H_SEC_WEBSOCKET_KEY].off;
    size_t key_len = req.headers[LMW_H_SEC_WEBSOCKET_KEY].len;
    if (s->cfg.auto_upgrade) {
        if (lmw__open_connection(s, fd, sl, key, key_len, NULL, 0, 0) < 0) return;
        if (len > head_len) lmw__process_frames(s, fd, sl, buf + head_len, len - head_len, 0);
        return;
    }
    if (s->nwork >= s->maxwork) {
        if (spill(s, fd, sl, buf, len, len) < 0) return lmw__reject(s, fd, sl, 503);
        lmw__backlog_add(s, fd, sl);
        return;
    }
    if (len > head_len) { /* a client that did not wait for the 101: keep its frames */
        if (spill(s, fd, sl, buf + head_len, len - head_len, len - head_len) < 0)
            return lmw__reject(s, fd, sl, 503);
    }
    sl->state = ST_UPGRADE_WAIT;
    lmw_upgrade_pending *u = &s->ups[s->nups++];
    u->fd = fd;
    u->gen = sl->gen;
    u->key = key;
    u->key_len = (uint32_t)key_len;
    request_event(s, fd, sl, LMW_EV_UPGRADE, buf, head_len, &req);
}

/* ---------------------------------------------------------------- frames */

static void deliver(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p, uint64_t n) {
    lmw_event *e = lmw__push_event(s);
    if (!e) return;
    e->type = LMW_EV_MESSAGE;
    e->opcode = (uint8_t)opcode;
    e->fd = fd;
    e->gen = sl->gen;
    e->user_tag = sl->user_tag;
    e->data = p;
    e->len = n;
    s->nwork++;
    s->stats->messages_received_total++;
}

/* answer_close echoes the peer's close code (RFC 6455 section 5.5.1) and lingers. */
static void answer_close(lmw_server *s, int fd, lmw_slot *sl, uint16_t code) {
    sl->close_code = code;
    sl->flags |= F_CLOSE_SENT;
    uint8_t echo[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    if (lmw__send_control(s, fd, sl, LMW_OP_CLOSE, echo, code == 1005 ? 0 : 2) < 0) return;
    lmw__start_linger(s, fd, sl);
}

/* message_waiting reports whether this batch holds a message of fd for Python. */
static int message_waiting(lmw_server *s, int fd, uint32_t gen) {
    for (int i = s->nev - 1; i >= 0; i--)
        if (s->ev[i].type == LMW_EV_MESSAGE && s->ev[i].fd == fd && s->ev[i].gen == gen) return 1;
    return 0;
}

/* end_after_batch ends the connection (fail with code, or answer the peer's close) once
 * Python has handled the messages read before the close, so that its replies to them
 * reach the peer first; with no such message it ends it now. */
static void end_after_batch(lmw_server *s, int fd, lmw_slot *sl, uint8_t what, int code) {
    if (sl->state == ST_OPEN && message_waiting(s, fd, sl->gen) &&
        lmw__grow((void **)&s->deferred, &s->cap_deferred, s->ndeferred + 1,
                  sizeof(lmw_deferred)) == 0) {
        s->deferred[s->ndeferred++] =
            (lmw_deferred){.fd = fd, .gen = sl->gen, .code = (uint16_t)code, .what = what};
        sl->state = ST_DEFERRED;
        return;
    }
    if (what == DEFER_FAIL)
        lmw__fail(s, fd, code);
    else
        answer_close(s, fd, sl, (uint16_t)code);
}

void lmw__run_deferred(lmw_server *s) {
    for (uint32_t i = 0; i < s->ndeferred; i++) {
        lmw_deferred *d = &s->deferred[i];
        lmw_slot *sl = lmw__slot(s, d->fd, d->gen);
        if (!sl || sl->state != ST_DEFERRED) continue;
        sl->state = ST_OPEN;
        if (d->what == DEFER_FAIL)
            lmw__fail(s, d->fd, d->code);
        else
            answer_close(s, d->fd, sl, d->code);
    }
    s->ndeferred = 0;
}

/* on_control handles ping, pong and close. Returns 1 when input processing must stop. */
static int on_control(lmw_server *s, int fd, lmw_slot *sl, const lmw_frame *f, uint8_t *p) {
    size_t n = (size_t)f->payload_len;
    if (f->opcode == LMW_OP_PING) {
        if (sl->state == ST_OPEN) return lmw__send_control(s, fd, sl, LMW_OP_PONG, p, n) < 0;
        return 0;
    }
    if (f->opcode == LMW_OP_PONG) return 0;
    uint16_t code = 0;
    int err = lmw_parse_close(p, n, &code);
    if (err) {
        end_after_batch(s, fd, sl, DEFER_FAIL, err);
        return 1;
    }
    if (sl->flags & F_CLOSE_SENT) { /* the answer to our close: done */
        lmw__conn_free(s, fd, 0);
        return 1;
    }
    end_after_batch(s, fd, sl, DEFER_CLOSE_REPLY, code);
    return 1;
}

/* on_data handles the unmasked payload of a complete data frame. */
static int on_data(lmw_server *s, int fd, lmw_slot *sl, int opcode, const lmw_frame *f, uint8_t *p,
                   int fragmented) {
    uint64_t n = f->payload_len;
    if (!fragmented && f->fin) {
        deliver(s, fd, sl, opcode, p, n);
        return 0;
    }
    lmw_ext *x = lmw__ext_get(s, sl);
    if (!x) {
        lmw__fail(s, fd, 1011);
        return 1;
    }
    if (x->msg_len + n > x->msg_cap) {
        uint64_t cap = x->msg_cap ? x->msg_cap * 2 : 1024;
        while (cap < x->msg_len + n) cap *= 2;
        if (cap > s->cfg.max_message) cap = s->cfg.max_message;
        if (cap < x->msg_len + n) cap = x->msg_len + n;
        if (s->stats->spill_bytes + (cap - x->msg_cap) > s->cfg.spill_budget) {
            lmw__fail(s, fd, 1013);
            return 1;
        }
        uint8_t *m = realloc(x->msg, cap ? cap : 1);
        if (!m) {
            lmw__fail(s, fd, 1011);
            return 1;
        }
        s->stats->spill_bytes += cap - x->msg_cap;
        x->msg = m;
        x->msg_cap = cap;
    }
    if (n) memcpy(x->msg + x->msg_len, p, n);
    x->msg_len += n;
    if (f->fin) {
        static const uint8_t empty[1];
        deliver(s, fd, sl, opcode, x->msg ? x->msg : empty, x->msg_len); /* never NULL */
        s->stats->spill_bytes -= x->msg_cap;
        lmw__lend(s, x->msg, 0);
        x->msg = NULL;
        x->msg_len = x->msg_cap = 0;
    }
    return 0;
}

/* process_frames parses every complete frame in buf[0, len). progress describes a
 * frame already partly handled on an earlier read: 0 = nothing, else 1 + the payload
 * bytes already unmasked and checked (its header was checked then too). */
void lmw__process_frames(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len,
                         uint32_t progress) {
    lmw_ext *x = lmw__ext_of(s, sl);
    lmw_message_state local = {0};
    lmw_message_state *ms = x ? &x->ms : &local;
    size_t off = 0;
    while (off < len) {
        if (sl->state != ST_OPEN && sl->state != ST_CLOSING) return;
        if (s->nwork >= s->maxwork && !progress) {
            /* the event array is full: keep the rest for the next poll */
            if (spill(s, fd, sl, buf + off, len - off, len - off) < 0)
                return lmw__fail(s, fd, 1013);
            x = lmw__ext_of(s, sl);
            x->in_checked = 0;
            if (ms == &local) x->ms = local;
            lmw__backlog_add(s, fd, sl);
            return;
        }
        lmw_frame f;
        int r = lmw_parse_frame(buf + off, len - off, 0, 1, &f);
        if (r == LMW_ERROR)
            return end_after_batch(s, fd, sl, DEFER_FAIL, f.close_code ? f.close_code : 1002);
        if (r == LMW_INCOMPLETE) {
            if (spill(s, fd, sl, buf + off, len - off, len - off) < 0)
                return lmw__fail(s, fd, 1013);
            x = lmw__ext_of(s, sl);
            x->in_checked = 0;
            if (ms == &local) x->ms = local;
            return;
        }
        int control = f.opcode >= 8;
        int fragmented = ms->opcode != 0;
        if (!progress) {
            int code = control ? 0 : lmw_message_frame(ms, &f, s->cfg.max_message);
            if (code) return end_after_batch(s, fd, sl, DEFER_FAIL, code);
        }
        size_t avail = len - off - f.header_len;
        if (avail > f.payload_len) avail = (size_t)f.payload_len;
        uint8_t *p = buf + off + f.header_len;
        size_t done = progress ? progress - 1 : 0;
        if (avail > done) {
            lmw_unmask(p + done, avail - done, f.mask, done);
            if (!control && sl->state == ST_OPEN) {
                int code = lmw_message_payload(ms, p + done, avail - done);
                if (code) return end_after_batch(s, fd, sl, DEFER_FAIL, code);
            }
        }
        progress = 0;
        if (avail < f.payload_len) { /* the payload is still arriving */
            uint64_t total = f.header_len + f.payload_len;
            size_t cap = total > s->cfg.read_buffer_size / 2 ? (size_t)total : len - off;
            if (spill(s, fd, sl, buf + off, len - off, cap) < 0) return lmw__fail(s, fd, 1013);
            x = lmw__ext_of(s, sl);
            x->in_checked = (uint32_t)(1 + avail);
            if (ms == &local) x->ms = local;
            return;
        }
        off += f.header_len + (size_t)f.payload_len;
        if (control) {
            if (on_control(s, fd, sl, &f, p)) return;
            continue;
        }
        if (sl->state == ST_OPEN) {
            if (!fragmented && !f.fin && ms == &local) { /* a message begins: keep its state */
                x = lmw__ext_get(s, sl);
                if (!x) return lmw__fail(s, fd, 1011);
                x->ms = local;
                ms = &x->ms;
            }
            /* the message's end is checked (UTF-8 complete, section 8.1) before it is
             * delivered: an invalid message never reaches the application */
            int opcode = ms->opcode ? ms->opcode : f.opcode;
            int code = lmw_message_frame_end(ms, f.fin);
            if (code) return end_after_batch(s, fd, sl, DEFER_FAIL, code);
            if (on_data(s, fd, sl, opcode, &f, p, fragmented)) return;
        }
    }
    lmw__ext_trim(s, sl);
}

/* ---------------------------------------------------------------- reading */

/* recv_some reads what is there: bytes read (> 0), 0 when nothing is ready now, -1 when
 * the peer is gone (EOF or an error). */
static ssize_t recv_some(int fd, uint8_t *p, size_t n) {
    ssize_t r;
    do r = recv(fd, p, n, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    return r ? r : -1;
}

/* read_into_spill reads straight into a spill sized for a whole frame or HTTP request that
 * is larger than half a read block. A frame's payload is checked as it arrives (UTF-8 fails
 * fast); once complete, the spill is lent to Python with the event. */
static void read_into_spill(lmw_server *s, int fd, lmw_slot *sl, lmw_ext *x) {
    ssize_t n = recv_some(fd, x->in + x->in_len, x->in_cap - x->in_len);
    if (n == 0) return;
    if (n < 0) return lmw__conn_free(s, fd, 0);
    int handshake = lmw__is_handshake_state(sl->state);
    if (!handshake) { /* a handshake keeps its accept tick: a deadline */
        sl->tick = s->now;
        sl->flags &= ~F_PING_OUT;
    }
    uint8_t *buf = x->in;
    size_t len = x->in_len + (size_t)n;
    uint32_t progress = x->in_checked;
    if (len < x->in_cap) {
        if (!handshake) return lmw__process_frames(s, fd, sl, buf, len, progress);
        x->in_len = (uint32_t)len;
        return;
    }
    s->stats->spill_bytes -= x->in_cap;
    lmw__lend(s, buf, 0);
    x->in = NULL;
    x->in_len = x->in_cap = x->in_checked = 0;
    if (!handshake) return lmw__process_frames(s, fd, sl, buf, len, progress);
    x->head_scanned = 0;
    sl->state = ST_HEAD;
    lmw__process_head(s, fd, sl, buf, len);
}

void lmw__on_readable(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (sl->state == ST_LINGER) {
        uint8_t sink[4096];
        if (recv_some(fd, sink, sizeof sink) < 0) lmw__conn_free(s, fd, 0);
        return;
    }
    if (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT || sl->state == ST_DEFERRED)
        return;
    if (sl->flags & F_BACKLOG) return; /* its pending input is parsed first (next poll) */
    int holding = x && (x->in || x->msg);
    if (!holding && s->stats->spill_bytes >= s->cfg.spill_budget / 4 * 3) {
        /* the budget is short: this socket waits in the kernel until spills drain */
        if (lmw__grow((void **)&s->budget_paused, &s->cap_budget_paused, s->nbudget_paused + 1,
                      sizeof(int)) < 0)
            return;
        s->budget_paused[s->nbudget_paused++] = fd;
        sl->flags |= F_BUDGET;
        lmw__set_interest(s, fd, sl, 0);
        return;
    }
    if (x && x->in && x->in_cap > s->cfg.read_buffer_size / 2 && sl->state != ST_HEAD)
        return read_into_spill(s, fd, sl, x);
    size_t pending = x && x->in ? x->in_len : 0;
    size_t want = pending + MIN_READ_SPACE;
    if (sl->state == ST_HTTP_BODY && x && x->in_cap > want) want = x->in_cap;
    if (want > s->cfg.read_buffer_size) /* a head longer than a read block (max_head allows) */
        return lmw__reject(s, fd, sl, 431);
    uint8_t *buf;
    size_t cap;
    if (take_read_space(s, want, &buf, &cap) < 0) return; /* next poll: epoll reports again */
    size_t room = cap - pending;
    if (sl->state == ST_HEAD && room > s->cfg.max_head + 1 - pending &&
        s->cfg.max_head + 1 > pending)
        room = s->cfg.max_head + 1 - pending; /* never read more head than the cap */
    if (pending) memcpy(buf, x->in, pending);
    ssize_t n = recv_some(fd, buf + pending, room);
    if (n == 0) return;
    if (n < 0) return lmw__conn_free(s, fd, 0);
    commit_read_space(s, pending + (size_t)n);
    if (!lmw__is_handshake_state(sl->state)) { /* a handshake keeps its accept tick: a deadline */
        sl->tick = s->now;
        sl->flags &= ~F_PING_OUT;
    }
    uint32_t progress = 0;
    if (pending) {
        progress = x->in_checked;
        lmw__in_free(s, x);
    }
    size_t len = pending + (size_t)n;
    switch (sl->state) {
    case ST_HEAD:
        return lmw__process_head(s, fd, sl, buf, len);
    case ST_HTTP_BODY: {
        sl->state = ST_HEAD;
        if (x) x->head_scanned = 0;
        return lmw__process_head(s, fd, sl, buf, len);
    }
    default:
        return lmw__process_frames(s, fd, sl, buf, len, progress);
    }
}
