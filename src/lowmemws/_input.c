/* _input.c - reading: request heads, frames, messages.
 *
 * A readable socket is read into borrowed read space; what does not complete a head or
 * frame is kept in a spill (both are _spill.c's). Complete messages become events that
 * point into the read space (or into a lent spill) until the next poll. While the spill
 * budget is short, sockets are still read for whole messages (peeked first, taken only if
 * complete), and only incomplete input waits in the kernel.
 * A close caused by what was read right after a message waits (DEFERRED) until Python
 * has answered that message, so replies are never overtaken by the close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "_runtime.h"

void lmw__backlog_add(lmw_server *s, int fd, lmw_slot *sl) {
    if (sl->flags & F_BACKLOG) return;
    if (lmw__grow((void **)&s->backlog, &s->cap_backlog, s->nbacklog + 1, sizeof(int)) < 0) return;
    s->backlog[s->nbacklog++] = fd;
    sl->flags |= F_BACKLOG;
}

/* keep_for_later spills the unparsed rest of a read when this poll's event array is full;
 * the fd is parsed again, first thing, by the next lmw_poll (lmw__run_backlog). */
static int keep_for_later(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *p, size_t n) {
    if (lmw__spill(s, fd, sl, p, n, 0) < 0) return -1;
    lmw__backlog_add(s, fd, sl);
    return 0;
}

/* ---------------------------------------------------------------- handshake */

/* request_event hands a complete head (and body) to Python with its request view; both
 * stay valid until the next lmw_poll. */
static void request_event(lmw_server *s, int fd, lmw_slot *sl, uint8_t type, const uint8_t *buf,
                          size_t len, const lmw_request *req) {
    lmw_event *e = lmw__push_event(s);
    if (!e) return lmw__conn_reject(s, fd, sl, 500);
    s->reqs[s->nwork] = *req;
    e->type = type;
    e->fd = fd;
    e->gen = sl->gen;
    e->data = buf;
    e->len = len;
    e->request = &s->reqs[s->nwork++];
}

/* negotiate_deflate answers the permessage-deflate offers of an upgrade (every
 * Sec-WebSocket-Extensions field, in order: RFC 7230 3.2.2): the lmw_pmd_negotiate result of
 * the first offer accepted, or 0. */
static int negotiate_deflate(lmw_server *s, const uint8_t *buf, size_t head_len,
                             const lmw_request *req) {
    if (!s->cfg.deflate || !((req->present >> LMW_H_SEC_WEBSOCKET_EXTENSIONS) & 1)) return 0;
    static const char field[] = "sec-websocket-extensions";
    uint32_t pos = 0;
    lmw_span name, value;
    while (lmw_header_next(buf, head_len, &pos, &name, &value)) {
        if (name.len != sizeof field - 1 ||
            strncasecmp((const char *)buf + name.off, field, name.len))
            continue;
        int pmd = lmw_pmd_negotiate(buf + value.off, value.len);
        if (pmd) return pmd;
    }
    return 0;
}

void lmw__process_head(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len) {
    lmw_ext *x = lmw__ext_of(s, sl);
    lmw_request req;
    memset(&req, 0, sizeof req);
    if (x) req.scanned = x->head_scanned;
    int r = lmw_parse_request(buf, len, s->cfg.max_head, &req);
    if (r == LMW_INCOMPLETE) {
        if (lmw__spill(s, fd, sl, buf, len, 0) < 0) return lmw__conn_reject(s, fd, sl, 503);
        lmw__ext_of(s, sl)->head_scanned = req.scanned; /* the next parse resumes there */
        return;
    }
    if (x) x->head_scanned = 0;
    if (r < 0) return lmw__conn_reject(s, fd, sl, req.status ? req.status : 400);
    size_t head_len = (size_t)r;
    if (req.kind == LMW_KIND_HTTP) {
        if (req.content_length > s->cfg.max_http_body) return lmw__conn_reject(s, fd, sl, 413);
        size_t total = head_len + (size_t)req.content_length;
        if (len < total) { /* the body is still arriving: the head is parsed again then */
            lmw__conn_await_body(sl);
            if (lmw__spill(s, fd, sl, buf, len, total) < 0) return lmw__conn_reject(s, fd, sl, 503);
            return;
        }
        if (s->nwork >= s->maxwork) { /* answer on the next poll */
            lmw__conn_await_body(sl);
            if (keep_for_later(s, fd, sl, buf, len) < 0) return lmw__conn_reject(s, fd, sl, 503);
            return;
        }
        s->stats->http_requests_total++;
        lmw__conn_await_answer(sl, 0);
        return request_event(s, fd, sl, LMW_EV_HTTP, buf, total, &req);
    }
    const uint8_t *key = buf + req.headers[LMW_H_SEC_WEBSOCKET_KEY].off;
    size_t key_len = req.headers[LMW_H_SEC_WEBSOCKET_KEY].len;
    int pmd = negotiate_deflate(s, buf, head_len, &req);
    if (s->cfg.auto_upgrade) {
        if (lmw__conn_upgrade(s, fd, sl, key, key_len, NULL, 0, 0, pmd) < 0) return;
        if (len > head_len)
            lmw__process_frames(s, fd, sl, buf + head_len, len - head_len, (lmw_progress){0});
        return;
    }
    if (s->nwork >= s->maxwork) {
        if (keep_for_later(s, fd, sl, buf, len) < 0) return lmw__conn_reject(s, fd, sl, 503);
        return;
    }
    if (len > head_len) { /* a client that did not wait for the 101: keep its frames */
        if (lmw__spill(s, fd, sl, buf + head_len, len - head_len, 0) < 0)
            return lmw__conn_reject(s, fd, sl, 503);
    }
    lmw__conn_await_answer(sl, 1);
    lmw_upgrade_pending *u = &s->ups[s->nups++];
    u->fd = fd;
    u->gen = sl->gen;
    u->key = key;
    u->key_len = (uint32_t)key_len;
    u->pmd = pmd;
    request_event(s, fd, sl, LMW_EV_UPGRADE, buf, head_len, &req);
}

/* ---------------------------------------------------------------- frames */

/* rsv_allowed: RSV1 only on a connection that negotiated permessage-deflate (RFC 7692
 * section 6); elsewhere any reserved bit is 1002 (RFC 6455 section 5.2). */
static uint8_t rsv_allowed(const lmw_slot *sl) { return sl->deflate ? 4 : 0; }

static void deliver(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p, uint64_t n) {
    lmw_event *e = lmw__push_event(s);
    if (!e) { /* out of memory: the message cannot reach Python, the client is told */
        s->stats->errors[LMW_ERR_NOMEM]++;
        return lmw__conn_fail(s, fd, 1011);
    }
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

/* on_control handles ping, pong and close. Returns 1 when input processing must stop. */
static int on_control(lmw_server *s, int fd, lmw_slot *sl, const lmw_frame *f, uint8_t *p) {
    size_t n = (size_t)f->payload_len;
    if (f->opcode == LMW_OP_PING) {
        if (sl->state == ST_OPEN) return lmw__conn_send_control(s, fd, sl, LMW_OP_PONG, p, n) < 0;
        return 0;
    }
    if (f->opcode == LMW_OP_PONG) return 0;
    uint16_t code = 0;
    int err = lmw_parse_close(p, n, &code);
    if (err) {
        lmw__conn_end(s, fd, sl, DEFER_FAIL, err);
        return 1;
    }
    if (sl->flags & F_CLOSE_SENT) { /* the answer to our close: done */
        lmw__conn_free(s, fd, 0);
        return 1;
    }
    lmw__conn_end(s, fd, sl, DEFER_CLOSE_REPLY, code);
    return 1;
}

/* deliver_compressed decompresses a whole compressed message (RFC 7692 section 7.2.2) and
 * delivers it; a bomb (1009), bad data or text (1007) or a spent budget (1013) ends the
 * connection instead. Returns 1 when input processing must stop. */
static int deliver_compressed(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p,
                              uint64_t n) {
    const uint8_t *out = NULL;
    uint64_t out_len = 0;
    int code = lmw__inflate_message(s, p, (size_t)n, opcode == LMW_OP_TEXT, &out, &out_len);
    if (code) {
        lmw__conn_end(s, fd, sl, DEFER_FAIL, code);
        return 1;
    }
    deliver(s, fd, sl, opcode, out, out_len);
    return 0;
}

/* on_data handles the unmasked payload of a complete data frame; a compressed message is
 * assembled as it came (compressed) and decompressed once whole. */
static int on_data(lmw_server *s, int fd, lmw_slot *sl, int opcode, const lmw_frame *f, uint8_t *p,
                   int fragmented, int compressed) {
    uint64_t n = f->payload_len;
    if (!fragmented && f->fin) {
        if (compressed) return deliver_compressed(s, fd, sl, opcode, p, n);
        deliver(s, fd, sl, opcode, p, n);
        return 0;
    }
    lmw_ext *x = lmw__ext_get(s, sl);
    if (!x) {
        lmw__conn_fail(s, fd, 1011);
        return 1;
    }
    if (x->msg_len + n > x->msg_cap) {
        uint64_t cap = x->msg_cap ? x->msg_cap * 2 : 1024;
        while (cap < x->msg_len + n) cap *= 2;
        if (cap > s->cfg.max_message) cap = s->cfg.max_message;
        if (cap < x->msg_len + n) cap = x->msg_len + n;
        if (s->stats->spill_bytes + (cap - x->msg_cap) > s->cfg.spill_budget) {
            lmw__conn_fail(s, fd, 1013);
            return 1;
        }
        uint8_t *m = realloc(x->msg, cap ? cap : 1);
        if (!m) {
            lmw__conn_fail(s, fd, 1011);
            return 1;
        }
        s->stats->spill_bytes += cap - x->msg_cap;
        x->msg = m;
        x->msg_cap = cap;
    }
    if (n) memcpy(x->msg + x->msg_len, p, n);
    x->msg_len += n;
    if (f->fin && compressed) {
        int stop = deliver_compressed(s, fd, sl, opcode, x->msg, x->msg_len);
        x = lmw__ext_of(s, sl); /* still there: a failed connection lingers, not freed */
        if (x) lmw__msg_free(s, x);
        return stop;
    }
    if (f->fin) {
        static const uint8_t empty[1];
        deliver(s, fd, sl, opcode, x->msg ? x->msg : empty, x->msg_len); /* never NULL */
        s->stats->spill_bytes -= x->msg_cap;
        lmw__lend(s, x->msg);
        x->msg = NULL;
        x->msg_len = x->msg_cap = 0;
    }
    return 0;
}

/* keep_partial spills an incomplete frame (header or payload) at p; want is the whole
 * frame once its header is known, done what of its payload was checked already. */
static int keep_partial(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *p, size_t n,
                        uint64_t want, lmw_progress done, const lmw_message_state *local) {
    if (lmw__spill(s, fd, sl, p, n, want) < 0) return -1;
    lmw_ext *x = lmw__ext_of(s, sl);
    x->in_checked = done.checked;
    x->in_frame_begun = done.begun;
    if (local) x->ms = *local;
    return 0;
}

/* process_frames parses every complete frame in buf[0, len). done describes a frame at buf
 * already partly handled on an earlier read (its header checked, done.checked payload
 * bytes unmasked and checked). */
void lmw__process_frames(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len,
                         lmw_progress done) {
    lmw_ext *x = lmw__ext_of(s, sl);
    lmw_message_state local = {0};
    lmw_message_state *ms = x ? &x->ms : &local;
    const lmw_message_state *keep_ms = x ? NULL : &local; /* state to keep with a spill */
    size_t off = 0;
    while (off < len) {
        if (sl->state != ST_OPEN && sl->state != ST_CLOSING) return;
        if (s->nwork >= s->maxwork && !done.begun) { /* the event array is full */
            if (keep_partial(s, fd, sl, buf + off, len - off, 0, done, keep_ms) < 0)
                return lmw__conn_fail(s, fd, 1013);
            return lmw__backlog_add(s, fd, sl);
        }
        lmw_frame f;
        int r = lmw_parse_frame(buf + off, len - off, rsv_allowed(sl), 1, &f);
        if (r == LMW_ERROR)
            return lmw__conn_end(s, fd, sl, DEFER_FAIL, f.close_code ? f.close_code : 1002);
        if (r == LMW_INCOMPLETE) {
            if (keep_partial(s, fd, sl, buf + off, len - off, 0, done, keep_ms) < 0)
                return lmw__conn_fail(s, fd, 1013);
            return;
        }
        int control = f.opcode >= 8;
        int fragmented = ms->opcode != 0;
        if (control && f.rsv) /* RSV1 marks data messages only (RFC 7692 section 6.1) */
            return lmw__conn_end(s, fd, sl, DEFER_FAIL, 1002);
        if (!done.begun) {
            int code = control ? 0 : lmw_message_frame(ms, &f, s->cfg.max_message);
            if (code) return lmw__conn_end(s, fd, sl, DEFER_FAIL, code);
        }
        uint64_t avail = len - off - f.header_len;
        if (avail > f.payload_len) avail = f.payload_len;
        uint8_t *p = buf + off + f.header_len;
        if (avail > done.checked) {
            lmw_unmask(p + done.checked, avail - done.checked, f.mask, done.checked);
            if (!control && sl->state == ST_OPEN) {
                int code = lmw_message_payload(ms, p + done.checked, avail - done.checked);
                if (code) return lmw__conn_end(s, fd, sl, DEFER_FAIL, code);
            }
        }
        if (avail < f.payload_len) { /* the payload is still arriving */
            lmw_progress now = {.checked = avail, .begun = 1};
            if (keep_partial(s, fd, sl, buf + off, len - off, f.header_len + f.payload_len, now,
                             keep_ms) < 0)
                return lmw__conn_fail(s, fd, 1013);
            return;
        }
        done = (lmw_progress){0};
        off += f.header_len + (size_t)f.payload_len;
        if (control) {
            if (on_control(s, fd, sl, &f, p)) return;
            continue;
        }
        if (sl->state == ST_OPEN) {
            if (!fragmented && !f.fin && ms == &local) { /* a message begins: keep its state */
                x = lmw__ext_get(s, sl);
                if (!x) return lmw__conn_fail(s, fd, 1011);
                x->ms = local;
                ms = &x->ms;
                keep_ms = NULL;
            }
            /* the message's end is checked (UTF-8 complete, section 8.1) before it is
             * delivered: an invalid message never reaches the application */
            int opcode = ms->opcode ? ms->opcode : f.opcode;
            int compressed = ms->compressed;
            int code = lmw_message_frame_end(ms, f.fin);
            if (code) return lmw__conn_end(s, fd, sl, DEFER_FAIL, code);
            if (on_data(s, fd, sl, opcode, &f, p, fragmented, compressed)) return;
        }
    }
    lmw__ext_trim(s, sl);
}

/* ---------------------------------------------------------------- reading */

/* recv_some reads what is there: bytes read (> 0), 0 when nothing is ready now, -1 when
 * the peer is gone (EOF or an error). */
static ssize_t recv_some(int fd, uint8_t *p, size_t n, int flags) {
    ssize_t r;
    do r = recv(fd, p, n, flags);
    while (r < 0 && errno == EINTR);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    return r ? r : -1;
}

/* peer_gone reports, without consuming anything, that fd is at EOF or in error. */
static int peer_gone(int fd) {
    uint8_t b;
    return recv_some(fd, &b, 1, MSG_PEEK) < 0;
}

static void input_seen(lmw_server *s, lmw_slot *sl) {
    if (sl->state != ST_OPEN) return; /* handshake and close deadlines count from their start */
    sl->tick = s->now;
    sl->flags &= ~F_PING_OUT;
}

/* read_into_spill reads the rest of a large head + body or frame straight into its spill. A
 * frame's payload is checked as it arrives (UTF-8 fails fast); once complete, the spill is
 * lent to Python with the event. */
static void read_into_spill(lmw_server *s, int fd, lmw_slot *sl, lmw_ext *x) {
    int room = lmw__grow_spill(s, fd, sl, x);
    if (room < 0 && lmw__is_handshake_state(sl->state)) return lmw__conn_reject(s, fd, sl, 503);
    if (room == GROW_NEVER) return lmw__conn_fail(s, fd, 1013); /* try again later */
    if (room == GROW_NOMEM) {
        s->stats->errors[LMW_ERR_NOMEM]++;
        return lmw__conn_fail(s, fd, 1011);
    }
    if (room == GROW_WAIT) return;
    if (x->in_cap == x->in_len) { /* nothing arrived: EOF or an error woke us */
        if (peer_gone(fd)) lmw__conn_free(s, fd, 0);
        return;
    }
    ssize_t n = recv_some(fd, x->in + x->in_len, x->in_cap - x->in_len, 0);
    if (n == 0) return;
    if (n < 0) return lmw__conn_free(s, fd, 0);
    input_seen(s, sl);
    x->in_len += (uint64_t)n;
    int handshake = lmw__is_handshake_state(sl->state);
    if (x->in_len < x->in_want) {
        if (handshake) return;
        lmw_progress done = {.checked = x->in_checked, .begun = x->in_frame_begun};
        return lmw__process_frames(s, fd, sl, x->in, x->in_len, done);
    }
    lmw_pending p = lmw__take_spill(s, x);
    if (!handshake) return lmw__process_frames(s, fd, sl, p.buf, p.len, p.progress);
    lmw__process_head(s, fd, sl, p.buf, p.len);
}

/* complete_frames is how many leading bytes of buf are frames that complete without a
 * spill: whole control frames and whole unfragmented messages, as many as this poll can
 * hand to Python. A malformed frame counts in (parsing it fails the connection). */
static size_t complete_frames(lmw_server *s, const lmw_slot *sl, const uint8_t *buf, size_t len) {
    size_t off = 0;
    int work = s->nwork;
    while (off < len) {
        lmw_frame f;
        int r = lmw_parse_frame(buf + off, len - off, rsv_allowed(sl), 1, &f);
        if (r == LMW_ERROR) return len;
        if (r == LMW_INCOMPLETE || f.header_len + f.payload_len > len - off) break;
        if (f.opcode < 8) {
            if ((!f.fin && f.opcode != LMW_OP_CONTINUATION) || work >= s->maxwork) break;
            work++;
        }
        off += f.header_len + (size_t)f.payload_len;
    }
    return off;
}

/* complete_head is the length of a complete head (and body) at buf, 0 if incomplete; a
 * malformed or refused one counts whole (parsing it answers the error). */
static size_t complete_head(lmw_server *s, const uint8_t *buf, size_t len) {
    lmw_request req;
    memset(&req, 0, sizeof req);
    int r = lmw_parse_request(buf, len, s->cfg.max_head, &req);
    if (r == LMW_INCOMPLETE) return 0;
    if (r < 0 || req.content_length > s->cfg.max_http_body) return len;
    uint64_t total = (uint64_t)r + (req.kind == LMW_KIND_HTTP ? req.content_length : 0);
    return total <= len ? (size_t)total : 0;
}

/* read_complete serves a socket with nothing pending while the spill budget is short: it
 * peeks, takes only what completes without a spill, and leaves the rest in the kernel (the
 * socket waits, paused, until the spills drain). Everyone sending whole messages is still
 * served while a few hold the budget with partial ones. */
static void read_complete(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t room) {
    ssize_t n = recv_some(fd, buf, room, MSG_PEEK);
    if (n == 0) return;
    if (n < 0) return lmw__conn_free(s, fd, 0);
    int head = sl->state == ST_HEAD;
    size_t take = head ? complete_head(s, buf, (size_t)n) : complete_frames(s, sl, buf, (size_t)n);
    if (!take) return lmw__budget_pause(s, fd, sl);
    if (recv_some(fd, buf, take, 0) != (ssize_t)take) return lmw__conn_free(s, fd, 0);
    lmw__commit_read_space(s, take);
    input_seen(s, sl);
    if (head) return lmw__process_head(s, fd, sl, buf, take);
    lmw__process_frames(s, fd, sl, buf, take, (lmw_progress){0});
}

/* tls_readable reads a TLS connection: its records are opened (_tls_input.c) and their
 * plaintext parsed exactly as a plain socket's bytes. */
static void tls_readable(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc) {
    uint32_t gen = sl->gen;
    lmw_tls_plain p;
    if (!lmw__tls_read(s, fd, sl, tc, &p)) return;
    if (p.len && (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY))
        lmw__process_head(s, fd, sl, p.buf, (size_t)p.len);
    else if (p.len && lmw__is_open_state(sl->state))
        lmw__process_frames(s, fd, sl, p.buf, (size_t)p.len, p.done);
    lmw__tls_read_done(s, fd, gen, tc);
}

/* lmw__on_readable reads fd (epoll reported what) and handles what arrived. */
void lmw__on_readable(lmw_server *s, int fd, lmw_slot *sl, uint32_t what) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (sl->state == ST_LINGER) {
        uint8_t sink[4096];
        if (recv_some(fd, sink, sizeof sink, 0) < 0) lmw__conn_free(s, fd, 0);
        return;
    }
    if (lmw__is_parked_state(sl->state)) { /* only a hang-up or an error is watched for */
        if (what & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) lmw__conn_free(s, fd, 0);
        return;
    }
    if ((sl->flags & (F_PAUSED | F_BUDGET)) && !(what & EPOLLIN)) {
        /* a paused socket reporting a hang-up or an error: the peer is gone (reported
         * every poll while it stays, so it is ended now, not paused again) */
        return lmw__conn_free(s, fd, 0);
    }
    if (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT || sl->state == ST_DEFERRED)
        return;
    if (sl->flags & F_BACKLOG) return; /* its pending input is parsed first (next poll) */
    lmw_tls_conn *tc = lmw__tls_of(s, fd);
    if (tc) return tls_readable(s, fd, sl, tc);
    if (x && x->in && lmw__spill_is_large(s, x) && sl->state != ST_HEAD)
        return read_into_spill(s, fd, sl, x);
    size_t pending = x && x->in ? (size_t)x->in_len : 0;
    int short_mode = !(x && (x->in || x->msg)) && lmw__budget_short(s);
    size_t want = pending + MIN_READ_SPACE;
    if (x && x->in_want > want) want = (size_t)x->in_want; /* a small body: read it whole */
    if (short_mode) want = s->cfg.read_buffer_size / 2;    /* room for whole messages to peek */
    if (want > s->cfg.read_buffer_size) /* a head longer than a read block (max_head allows) */
        return lmw__conn_reject(s, fd, sl, 431);
    uint8_t *buf;
    size_t cap;
    if (lmw__take_read_space(s, want, &buf, &cap) < 0) return; /* next poll: epoll reports again */
    size_t room = cap - pending;
    if (sl->state == ST_HEAD && room > s->cfg.max_head + 1 - pending &&
        s->cfg.max_head + 1 > pending)
        room = s->cfg.max_head + 1 - pending; /* never read more head than the cap */
    if (short_mode) return read_complete(s, fd, sl, buf, room);
    if (pending) memcpy(buf, x->in, pending);
    ssize_t n = recv_some(fd, buf + pending, room, 0);
    if (n == 0) return;
    if (n < 0) return lmw__conn_free(s, fd, 0);
    lmw__commit_read_space(s, pending + (size_t)n);
    input_seen(s, sl);
    lmw_progress done = {0};
    if (pending) {
        done = (lmw_progress){.checked = x->in_checked, .begun = x->in_frame_begun};
        lmw__in_free(s, x);
    }
    size_t len = pending + (size_t)n;
    if (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY)
        return lmw__process_head(s, fd, sl, buf, len); /* a body: its head is parsed again */
    lmw__process_frames(s, fd, sl, buf, len, done);
}

/* lmw__run_backlog parses the input kept for later when an earlier poll's event array
 * filled up, before any socket is read again. */
void lmw__run_backlog(lmw_server *s) {
    uint32_t n = s->nbacklog;
    int *fds = s->backlog;
    s->backlog = NULL;
    s->nbacklog = 0;
    s->cap_backlog = 0;
    for (uint32_t i = 0; i < n; i++) {
        int fd = fds[i];
        lmw_slot *sl = &s->slots[fd];
        sl->flags &= ~F_BACKLOG;
        lmw_ext *x = lmw__ext_of(s, sl);
        if (!x || !x->in) continue;
        if (s->nwork >= s->maxwork) {
            lmw__backlog_add(s, fd, sl);
            continue;
        }
        lmw_pending p = lmw__take_spill(s, x);
        if (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY) {
            lmw__process_head(s, fd, sl, p.buf, p.len);
        } else if (lmw__is_open_state(sl->state)) {
            lmw__process_frames(s, fd, sl, p.buf, p.len, p.progress);
        }
    }
    free(fds);
}
