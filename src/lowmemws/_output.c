/* _output.c - sending: straight to the kernel, queueing only what it does not take.
 *
 * A frame goes out with one sendmsg; the unsent rest is copied into an lmw_out chunk on
 * the connection's ext and EPOLLOUT is armed until the queue drains. Control frames go
 * ahead of queued data (never inside a frame already partly written), except close,
 * which follows what was queued before it. The write bounds are decided here, before
 * anything is written; the policy past them is the caller's (_conn.c). Nothing here frees a
 * connection or changes its state: a dead socket is reported (-1) to the caller, which
 * owns the slot and ends it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "_runtime.h"

/* ---------------------------------------------------------------- output */

/* out_new copies a frame (header a + payload b) into a queue chunk, done bytes already sent. */
static lmw_out *out_new(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen, size_t done,
                        int control, uint64_t topic) {
    lmw_out *o = malloc(sizeof(lmw_out) + alen + blen);
    if (!o) return NULL;
    o->next = NULL;
    o->topic = topic;
    o->len = alen + blen;
    o->sent = done;
    o->control = (uint8_t)control;
    memcpy(o->data, a, alen);
    if (blen) memcpy(o->data + alen, b, blen);
    return o;
}

/* out_replace puts o in the place of the queued frame at *at (not begun: never a frame
 * partly on the wire). */
static void out_replace(lmw_server *s, lmw_ext *x, lmw_out **at, lmw_out *o) {
    lmw_out *old = *at;
    o->next = old->next;
    if (x->out_tail == old) x->out_tail = o;
    *at = o;
    x->out_bytes += o->len - old->len;
    s->stats->pending_write_bytes += o->len - old->len;
    free(old);
}

static void out_append(lmw_server *s, lmw_ext *x, lmw_out *o) {
    if (x->out_tail)
        x->out_tail->next = o;
    else
        x->out_head = o;
    x->out_tail = o;
    x->out_bytes += o->len;
    s->stats->pending_write_bytes += o->len;
}

static void arm_out(lmw_server *s, int fd, lmw_slot *sl) {
    if (!(sl->flags & F_WANT_OUT)) {
        sl->flags |= F_WANT_OUT;
        lmw__set_interest(s, fd, sl, 1);
    }
}

/* send_now writes what the kernel takes; returns bytes written, or -1 if the socket is
 * dead (the caller frees the connection). */
static ssize_t send_now(int fd, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen) {
    struct iovec iov[2] = {{(void *)a, alen}, {(void *)b, blen}};
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = blen ? 2 : 1};
    ssize_t n;
    do n = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    return n;
}

/* queue_rest keeps the unsent part of a frame (a, b concatenated, from offset done). */
static int queue_rest(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, size_t done, int control, uint64_t topic) {
    lmw_ext *x = lmw__ext_get(s, sl);
    lmw_out *o = x ? out_new(a, alen, b, blen, done, control, topic) : NULL;
    if (!o) return -1;
    out_append(s, x, o);
    arm_out(s, fd, sl);
    return 0;
}

/* begun: a queued chunk that must go out as it is, first (partly on the wire, or TLS records
 * already sealed, whose sequence numbers fix their place). */
static int begun(const lmw_out *o) { return o->sent > 0 || (o->control & OUT_SEALED); }

/* tls_write protects output of a TLS connection: sealed and sent now when nothing is queued
 * (the unsent rest of the records queued sealed), else queued in plaintext and sealed when it
 * reaches the head of the queue, so records are numbered in the order they leave. After our
 * close_notify or a fatal alert nothing more is written. */
static int tls_write(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, int kind,
                     const uint8_t *a, size_t alen, const uint8_t *b, size_t blen, int control,
                     uint64_t topic) {
    if (tc->close_sent) return 1;
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x && x->out_head)
        return queue_rest(s, fd, sl, a, alen, b, blen, 0, control | kind << OUT_KIND_SHIFT, topic) <
                       0
                   ? -1
                   : 1;
    uint8_t *sealed;
    size_t n;
    int r = lmw__tls_seal_out(s, tc, kind, a, alen, b, blen, &sealed, &n);
    if (r <= 0) return r == 0 ? 1 : -1; /* 0: nothing may go out now (handshake, closed) */
    r = lmw__write_clear(s, fd, sl, sealed, n, NULL, 0, OUT_SEALED, 0);
    lmw__tls_scratch_done(s);
    return r;
}

/* lmw__write_raw sends header a + payload b, queueing what the kernel does not take; on a TLS
 * connection, protected (tls_write). Returns 1, or -1 when the socket is dead or the rest
 * could not be queued (the caller, which owns the slot, ends the connection). */
int lmw__write_raw(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                   const uint8_t *b, size_t blen, int control, uint64_t topic) {
    lmw_tls_conn *tc = lmw__tls_of(s, fd);
    if (tc) return tls_write(s, fd, sl, tc, TLS_OUT_DATA, a, alen, b, blen, control, topic);
    return lmw__write_clear(s, fd, sl, a, alen, b, blen, control, topic);
}

/* lmw__tls_send_alert sends a TLS alert (close_notify as a warning, any other as fatal) on a
 * TLS connection past its handshake, once: nothing is written after it. Returns as
 * lmw__write_raw; 0 when there is nothing to send. */
int lmw__tls_send_alert(lmw_server *s, int fd, lmw_slot *sl, int description) {
    lmw_tls_conn *tc = lmw__tls_of(s, fd);
    if (!tc || tc->close_sent || (tc->phase != TLS_RECORDS && tc->phase != TLS_OPENSSL)) return 0;
    uint8_t alert[2] = {description == TLS_ALERT_CLOSE_NOTIFY ? 1 : 2, (uint8_t)description};
    int r = tls_write(s, fd, sl, tc, TLS_OUT_ALERT, alert, sizeof alert, NULL, 0, 0, 0);
    tc->close_sent = 1;
    return r;
}

/* lmw__tls_send_key_update answers a KeyUpdate that asked for ours (RFC 8446 section 4.6.3). */
int lmw__tls_send_key_update(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_tls_conn *tc = lmw__tls_of(s, fd);
    return tc ? tls_write(s, fd, sl, tc, TLS_OUT_KEY_UPDATE, NULL, 0, NULL, 0, 0, 0) : 0;
}

/* seal_head seals the plaintext chunk at the head of a TLS connection's queue in its place.
 * Returns 0, or -1 on failure. */
static int seal_head(lmw_server *s, lmw_ext *x, lmw_tls_conn *tc) {
    lmw_out *o = x->out_head;
    uint8_t *sealed;
    size_t n;
    int r = lmw__tls_seal_out(s, tc, o->control >> OUT_KIND_SHIFT, o->data, o->len, NULL, 0,
                              &sealed, &n);
    if (r < 0) return -1;
    lmw_out *z = out_new(sealed, r ? n : 0, NULL, 0, 0, OUT_SEALED, 0); /* r 0: nothing goes */
    lmw__tls_scratch_done(s);
    if (!z) return -1;
    out_replace(s, x, &x->out_head, z);
    return 0;
}

/* lmw__write_clear is lmw__write_raw without TLS: the bytes go to the socket as they are. */
int lmw__write_clear(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                     const uint8_t *b, size_t blen, int control, uint64_t topic) {
    lmw_ext *x = lmw__ext_of(s, sl);
    size_t done = 0;
    if (!x || !x->out_head) {
        ssize_t n = send_now(fd, a, alen, b, blen);
        if (n < 0) return -1;
        if ((size_t)n == alen + blen) return 1;
        done = (size_t)n;
    }
    return queue_rest(s, fd, sl, a, alen, b, blen, done, control, topic) < 0 ? -1 : 1;
}

/* send_control sends a control frame ahead of queued data frames (but never inside a
 * frame already partly written). A pong that is still queued is replaced by the newest
 * one: RFC 6455 section 5.5.3 allows answering only the most recent ping. */
int lmw__send_control(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p, size_t n) {
    uint8_t frame[10 + 125];
    int hl = lmw_build_header(frame, 1, opcode, n);
    if (n) memcpy(frame + hl, p, n);
    size_t flen = (size_t)hl + n;
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!x || !x->out_head) {
        int r = lmw__write_raw(s, fd, sl, frame, flen, NULL, 0, 1, 0);
        if (r > 0) s->stats->frames_sent_total++;
        return r;
    }
    lmw_out **at = &x->out_head;
    while (*at && begun(*at)) at = &(*at)->next; /* never split a frame on the wire */
    if (opcode == LMW_OP_CLOSE) /* data queued before a close must arrive before it */
        while (*at) at = &(*at)->next;
    while (*at && ((*at)->control & OUT_CONTROL)) {
        if (opcode == LMW_OP_PONG && ((*at)->data[0] & 0x0f) == LMW_OP_PONG && !(*at)->sent) {
            lmw_out *o = out_new(frame, flen, NULL, 0, 0, 1, 0);
            if (!o) return -1;
            out_replace(s, x, at, o);
            return 1;
        }
        at = &(*at)->next;
    }
    lmw_out *o = out_new(frame, flen, NULL, 0, 0, 1, 0);
    if (!o) return -1;
    o->next = *at;
    *at = o;
    if (!o->next) x->out_tail = o;
    x->out_bytes += flen;
    s->stats->pending_write_bytes += flen;
    s->stats->frames_sent_total++;
    arm_out(s, fd, sl);
    return 1;
}

/* lmw__flush_out writes queued output while the kernel takes it; at the end of a lingering
 * connection's output, its write side is shut down. Returns 1, or -1 when the socket is
 * dead (the caller ends the connection). */
int lmw__flush_out(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    lmw_tls_conn *tc = lmw__tls_of(s, fd);
    while (x && x->out_head) {
        if (tc && !(x->out_head->control & OUT_SEALED) && seal_head(s, x, tc) < 0) return -1;
        lmw_out *o = x->out_head;
        ssize_t n = send_now(fd, o->data + o->sent, o->len - o->sent, NULL, 0);
        if (n < 0) return -1;
        o->sent += (uint64_t)n;
        if (o->sent < o->len) return 1; /* EPOLLOUT stays armed */
        x->out_head = o->next;
        if (!x->out_head) x->out_tail = NULL;
        x->out_bytes -= o->len;
        s->stats->pending_write_bytes -= o->len;
        free(o);
    }
    sl->flags &= ~F_WANT_OUT;
    if (sl->flags & F_SHUT_WR) {
        sl->flags &= ~F_SHUT_WR;
        shutdown(fd, SHUT_WR);
    }
    lmw__set_interest(s, fd, sl, 1);
    lmw__ext_trim(s, sl);
    return 1;
}

/* drop_unsent discards queued frames not yet begun (a frame partly on the wire stays): a
 * client closed for being too slow gets its close frame next, not after all it missed. */
void lmw__drop_unsent(lmw_server *s, lmw_ext *x) {
    lmw_out **at = &x->out_head;
    while (*at && begun(*at)) at = &(*at)->next;
    while (*at) {
        lmw_out *o = *at;
        if (o->control >> OUT_KIND_SHIFT) { /* a TLS alert or KeyUpdate: it still goes */
            at = &o->next;
            continue;
        }
        *at = o->next;
        x->out_bytes -= o->len;
        s->stats->pending_write_bytes -= o->len;
        free(o);
    }
    x->out_tail = NULL;
    for (lmw_out *o = x->out_head; o; o = o->next) x->out_tail = o;
}

/* unsent_of_topic finds the queued, not yet begun frame of topic (for LATEST), or NULL. */
static lmw_out **unsent_of_topic(lmw_ext *x, uint64_t topic) {
    for (lmw_out **at = &x->out_head; *at; at = &(*at)->next)
        if ((*at)->topic == topic && !(*at)->sent) return at;
    return NULL;
}

/* over_bounds decides BEFORE anything is written whether a data frame of len bytes may
 * go out, so the bounds hold whatever the kernel takes: the frame must fit whole in
 * write_budget (all connections), and in write_limit with what this connection has queued.
 * A frame larger than write_limit may go to a connection with nothing queued (else it could
 * never be sent): one connection holds at most write_limit, or one such frame. LATEST keeps
 * one pending frame per topic past the connection's limit (the client always learns the
 * newest state); only the budget bounds it. */
static int over_bounds(lmw_server *s, lmw_ext *x, uint64_t len, int latest, uint64_t replaced) {
    uint64_t queued = x ? x->out_bytes : 0;
    if (s->stats->pending_write_bytes - replaced + len > s->cfg.write_budget) return 1;
    return !latest && queued && queued + len > s->cfg.write_limit;
}

/* lmw__write_data sends a complete data frame (header a + payload b) if the write bounds
 * allow it (the caller applies the policy otherwise). Returns 1 sent or queued, 0 over the
 * bounds (nothing written), -1 when the socket is dead. */
int lmw__write_data(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                    const uint8_t *b, size_t blen, uint64_t topic, int policy) {
    lmw_ext *x = lmw__ext_of(s, sl);
    int latest = topic && policy == LMW_POLICY_LATEST;
    lmw_out **old = latest && x ? unsent_of_topic(x, topic) : NULL;
    if (over_bounds(s, x, alen + blen, latest, old ? (*old)->len : 0)) return 0;
    if (old) { /* LATEST: the newest frame takes the place of the one still queued */
        lmw_out *o = out_new(a, alen, b, blen, 0, 0, topic);
        if (!o) return 0;
        out_replace(s, x, old, o);
        s->stats->dropped[LMW_DROP_LATEST]++;
        return 1;
    }
    int r = lmw__write_raw(s, fd, sl, a, alen, b, blen, 0, topic);
    if (r > 0) s->stats->frames_sent_total++;
    return r;
}
