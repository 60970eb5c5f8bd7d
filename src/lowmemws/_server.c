/* _server.c - the socket-facing runtime: slot table, epoll loop, read buffers, sends.
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
 *   input spill      at 3/4 of spill_budget, sockets with nothing pending stop being read;
 *                    a spill past the budget closes its connection with 1013;
 *   output           write_limit per connection and write_budget in all, by policy.
 *
 * Slot state machine (RFC 6455 section 4 and 7)
 * ---------------------------------------------
 *   FREE --accept--> HEAD
 *   HEAD --head complete, plain HTTP, body pending--> HTTP_BODY --body--> HTTP_WAIT
 *   HEAD --head complete, plain HTTP--> HTTP_WAIT --lmw_respond--> LINGER
 *   HEAD --valid upgrade, auto_upgrade--> OPEN
 *   HEAD --valid upgrade--> UPGRADE_WAIT --lmw_upgrade_accept--> OPEN
 *                                        --lmw_reject--> LINGER
 *   HEAD/HTTP_BODY --bad head, cap, deadline--> LINGER (an HTTP error response)
 *   OPEN --peer's close--> LINGER (our close echoed)
 *   OPEN --lmw_close, sweep, shutdown--> CLOSING --peer's close or deadline--> FREE
 *   OPEN --protocol error--> LINGER (close frame with the error code)
 *   OPEN --protocol error or peer's close right after a message in the same read-->
 *        DEFERRED --next lmw_poll, once Python has answered that message--> LINGER
 *   LINGER: output drains, then shutdown(SHUT_WR); input is discarded until EOF or the
 *           close deadline, so the peer reads our last bytes instead of a reset.
 *   any --EOF, socket error--> FREE (gen + 1: every handle to the fd goes stale)
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
#define MIN_READ_SPACE 2048

static const int CLOSE_CODES[LMW_CLOSE_CODES - 1] = {1000, 1001, 1002, 1003, 1005, 1006,
                                                      1007, 1008, 1009, 1011, 1013};

int lmw_close_code_index(int code) {
    for (int i = 0; i < LMW_CLOSE_CODES - 1; i++)
        if (CLOSE_CODES[i] == code) return i;
    return LMW_CLOSE_CODES - 1;
}

static uint32_t now_tick(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)(ts.tv_sec * 10 + ts.tv_nsec / 100000000);
}

static uint32_t ms_to_ticks(uint32_t ms) { return (ms + 99) / 100; }

/* ---------------------------------------------------------------- growable arrays */

static int grow(void **arr, uint32_t *cap, uint32_t need, size_t elem) {
    if (need <= *cap) return 0;
    uint32_t ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    void *p = realloc(*arr, (size_t)ncap * elem);
    if (!p) return -1;
    *arr = p;
    *cap = ncap;
    return 0;
}

static void lend(lmw_server *s, void *ptr, uint64_t size) {
    if (!ptr) return;
    if (grow((void **)&s->lent, &s->cap_lent, s->nlent + 1, sizeof(lmw_lent)) < 0) {
        /* cannot record it: leak nothing, but the event's data must stay valid; keep it */
        return;
    }
    s->lent[s->nlent].ptr = ptr;
    s->lent[s->nlent].size = size;
    s->nlent++;
}

static lmw_event *push_event(lmw_server *s) {
    uint32_t cap = (uint32_t)s->cap_ev;
    if (grow((void **)&s->ev, &cap, (uint32_t)s->nev + 1, sizeof(lmw_event)) < 0) return NULL;
    s->cap_ev = (int)cap;
    lmw_event *e = &s->ev[s->nev++];
    memset(e, 0, sizeof(*e));
    return e;
}

static void peer_remove(lmw_server *s, int fd);

/* ---------------------------------------------------------------- slots and exts */

lmw_slot *lmw__slot(lmw_server *s, int fd, uint32_t gen) {
    if (fd < 0 || (uint32_t)fd >= s->nslots) return NULL;
    lmw_slot *sl = &s->slots[fd];
    if (sl->state == ST_FREE || sl->gen != gen) return NULL;
    return sl;
}

static lmw_ext *ext_of(lmw_server *s, lmw_slot *sl) {
    return sl->ext ? s->exts[sl->ext - 1] : NULL;
}

static lmw_ext *ext_get(lmw_server *s, lmw_slot *sl) {
    if (sl->ext) return s->exts[sl->ext - 1];
    lmw_ext *x = calloc(1, sizeof(lmw_ext));
    if (!x) return NULL;
    uint32_t idx;
    if (s->nfree_exts) {
        idx = s->free_exts[--s->nfree_exts];
    } else {
        if (grow((void **)&s->exts, &s->cap_exts, s->nexts + 1, sizeof(lmw_ext *)) < 0) {
            free(x);
            return NULL;
        }
        idx = s->nexts++;
    }
    s->exts[idx] = x;
    sl->ext = idx + 1;
    return x;
}

static void out_free_all(lmw_server *s, lmw_ext *x) {
    for (lmw_out *o = x->out_head, *n; o; o = n) {
        n = o->next;
        free(o);
    }
    s->stats->pending_write_bytes -= x->out_bytes;
    x->out_head = x->out_tail = NULL;
    x->out_bytes = 0;
}

static void in_free(lmw_server *s, lmw_ext *x) {
    free(x->in);
    s->stats->spill_bytes -= x->in_cap;
    x->in = NULL;
    x->in_len = x->in_cap = x->in_checked = 0;
}

static void msg_free(lmw_server *s, lmw_ext *x) {
    free(x->msg);
    s->stats->spill_bytes -= x->msg_cap;
    x->msg = NULL;
    x->msg_len = x->msg_cap = 0;
}

static void ext_drop(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = ext_of(s, sl);
    if (!x) return;
    in_free(s, x);
    msg_free(s, x);
    out_free_all(s, x);
    s->exts[sl->ext - 1] = NULL;
    if (grow((void **)&s->free_exts, &s->cap_free_exts, s->nfree_exts + 1, sizeof(uint32_t)) == 0)
        s->free_exts[s->nfree_exts++] = sl->ext - 1;
    free(x);
    sl->ext = 0;
}

/* An ext with nothing in it is freed at once: idle connections keep no ext. */
static void ext_trim(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = ext_of(s, sl);
    if (x && !x->in && !x->msg && !x->out_head && x->ms.opcode == 0 && !x->head_scanned)
        ext_drop(s, sl);
}

/* set_interest brings the epoll interest in line with the flags; out_changed says
 * F_WANT_OUT was just flipped (EPOLLIN is tracked by F_EPOLL_IN). */
static void set_interest(lmw_server *s, int fd, lmw_slot *sl, int out_changed) {
    int want_in = !(sl->flags & (F_PAUSED | F_BUDGET));
    int has_in = (sl->flags & F_EPOLL_IN) != 0;
    if (want_in == has_in && !out_changed) return;
    int want_out = (sl->flags & F_WANT_OUT) != 0;
    struct epoll_event ev = {.events = (want_in ? EPOLLIN : 0) | (want_out ? EPOLLOUT : 0),
                             .data.fd = fd};
    epoll_ctl(s->epfd, EPOLL_CTL_MOD, fd, &ev);
    sl->flags = (uint8_t)((sl->flags & ~F_EPOLL_IN) | (want_in ? F_EPOLL_IN : 0));
}

static int is_handshake_state(uint8_t st) {
    return st == ST_HEAD || st == ST_HTTP_BODY || st == ST_UPGRADE_WAIT || st == ST_HTTP_WAIT;
}

static int is_open_state(uint8_t st) {
    return st == ST_OPEN || st == ST_CLOSING || st == ST_DEFERRED;
}

/* conn_free closes the fd and forgets everything about the connection. */
static void conn_free(lmw_server *s, int fd, uint16_t code) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state == ST_FREE) return;
    if (is_handshake_state(sl->state)) s->stats->handshakes--;
    if (sl->close_code) { /* it was an open WebSocket connection */
        uint16_t c = code ? code : sl->close_code;
        s->stats->connections--;
        s->stats->closes[lmw_close_code_index(c)]++;
        if (grow((void **)&s->closed, &s->cap_closed, s->nclosed + 1, sizeof(lmw_event)) == 0) {
            lmw_event *e = &s->closed[s->nclosed++];
            memset(e, 0, sizeof(*e));
            e->type = LMW_EV_CLOSED;
            e->fd = fd;
            e->gen = sl->gen;
            e->code = c;
            e->user_tag = sl->user_tag;
        }
    }
    lmw__hub_forget(s, fd);
    ext_drop(s, sl);
    peer_remove(s, fd);
    sl->gen++;
    sl->state = ST_FREE;
    sl->flags = 0;
    sl->close_code = 0;
    sl->user_tag = 0;
    close(fd);
    s->emfile = 0;
}

/* ---------------------------------------------------------------- output */

static lmw_out *out_new(const uint8_t *data, size_t len, int control, uint64_t topic) {
    lmw_out *o = malloc(sizeof(lmw_out) + len);
    if (!o) return NULL;
    o->next = NULL;
    o->topic = topic;
    o->len = (uint32_t)len;
    o->sent = 0;
    o->control = (uint8_t)control;
    memcpy(o->data, data, len);
    return o;
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
        set_interest(s, fd, sl, 1);
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
    lmw_ext *x = ext_get(s, sl);
    size_t total = alen + blen;
    lmw_out *o = x ? malloc(sizeof(lmw_out) + total) : NULL;
    if (!o) return -1;
    o->next = NULL;
    o->topic = topic;
    o->len = (uint32_t)total;
    o->sent = (uint32_t)done;
    o->control = (uint8_t)control;
    memcpy(o->data, a, alen);
    if (blen) memcpy(o->data + alen, b, blen);
    out_append(s, x, o);
    arm_out(s, fd, sl);
    return 0;
}

/* write_raw sends header a + payload b, queueing what the kernel does not take.
 * Returns 1, or -1 when the connection died (already freed). */
static int write_raw(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                     const uint8_t *b, size_t blen, int control, uint64_t topic) {
    lmw_ext *x = ext_of(s, sl);
    if (!x || !x->out_head) {
        ssize_t n = send_now(fd, a, alen, b, blen);
        if (n < 0) {
            conn_free(s, fd, 1006);
            return -1;
        }
        if ((size_t)n == alen + blen) return 1;
        if (queue_rest(s, fd, sl, a, alen, b, blen, (size_t)n, control, topic) < 0) {
            conn_free(s, fd, 1006);
            return -1;
        }
        return 1;
    }
    return queue_rest(s, fd, sl, a, alen, b, blen, 0, control, topic) < 0 ? -1 : 1;
}

/* send_control sends a control frame ahead of queued data frames (but never inside a
 * frame already partly written). A pong that is still queued is replaced by the newest
 * one: RFC 6455 section 5.5.3 allows answering only the most recent ping. */
static int send_control(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p,
                        size_t n) {
    uint8_t frame[10 + 125];
    int hl = lmw_build_header(frame, 1, opcode, n);
    if (n) memcpy(frame + hl, p, n);
    size_t flen = (size_t)hl + n;
    lmw_ext *x = ext_of(s, sl);
    if (!x || !x->out_head) {
        int r = write_raw(s, fd, sl, frame, flen, NULL, 0, 1, 0);
        if (r > 0) s->stats->frames_sent_total++;
        return r;
    }
    lmw_out **at = &x->out_head;
    if ((*at)->sent > 0) at = &(*at)->next; /* never split a frame on the wire */
    if (opcode == LMW_OP_CLOSE) /* data queued before a close must arrive before it */
        while (*at) at = &(*at)->next;
    while (*at && (*at)->control) {
        if (opcode == LMW_OP_PONG && ((*at)->data[0] & 0x0f) == LMW_OP_PONG && !(*at)->sent) {
            lmw_out *o = out_new(frame, flen, 1, 0);
            if (!o) return -1;
            lmw_out *old = *at;
            o->next = old->next;
            if (x->out_tail == old) x->out_tail = o;
            *at = o;
            x->out_bytes += flen - old->len;
            s->stats->pending_write_bytes += flen - old->len;
            free(old);
            return 1;
        }
        at = &(*at)->next;
    }
    lmw_out *o = out_new(frame, flen, 1, 0);
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

static void start_linger(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_ext *x = ext_of(s, sl);
    sl->state = ST_LINGER;
    sl->tick = s->now;
    if (x) {
        in_free(s, x);
        msg_free(s, x);
        x->ms.opcode = 0;
        x->head_scanned = 0;
    }
    if (x && x->out_head) {
        sl->flags |= F_SHUT_WR;
    } else {
        shutdown(fd, SHUT_WR);
        ext_trim(s, sl);
    }
    sl->flags &= ~(F_PAUSED | F_BUDGET);
    set_interest(s, fd, sl, 0);
}

static void flush_out(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_ext *x = ext_of(s, sl);
    while (x && x->out_head) {
        lmw_out *o = x->out_head;
        ssize_t n = send_now(fd, o->data + o->sent, o->len - o->sent, NULL, 0);
        if (n < 0) {
            conn_free(s, fd, 1006);
            return;
        }
        o->sent += (uint32_t)n;
        if (o->sent < o->len) return; /* EPOLLOUT stays armed */
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
    set_interest(s, fd, sl, 1);
    ext_trim(s, sl);
}

/* drop_unsent discards queued frames not yet begun (a frame partly on the wire stays): a
 * client closed for being too slow gets its close frame next, not after all it missed. */
static void drop_unsent(lmw_server *s, lmw_ext *x) {
    lmw_out **at = &x->out_head;
    if (*at && (*at)->sent) at = &(*at)->next;
    while (*at) {
        lmw_out *o = *at;
        *at = o->next;
        x->out_bytes -= o->len;
        s->stats->pending_write_bytes -= o->len;
        free(o);
    }
    x->out_tail = NULL;
    for (lmw_out *o = x->out_head; o; o = o->next) x->out_tail = o;
}

/* lmw__write sends a complete data frame (fan-out and lmw_send), applying the write
 * limit and policy. Returns 1 sent or queued, 0 dropped, -1 connection gone. */
int lmw__write(lmw_server *s, int fd, const uint8_t *frame, size_t len, uint64_t topic,
               int policy) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state != ST_OPEN && sl->state != ST_DEFERRED) return -1;
    lmw_ext *x = ext_of(s, sl);
    if (x && x->out_head) {
        if (topic && policy == LMW_POLICY_LATEST) {
            for (lmw_out **at = &x->out_head; *at; at = &(*at)->next) {
                lmw_out *old = *at;
                if (old->topic != topic || old->sent) continue;
                lmw_out *o = out_new(frame, len, 0, topic);
                if (!o) return 0;
                o->next = old->next;
                if (x->out_tail == old) x->out_tail = o;
                *at = o;
                x->out_bytes += len - old->len;
                s->stats->pending_write_bytes += len - old->len;
                free(old);
                s->stats->dropped[LMW_DROP_LATEST]++;
                return 1;
            }
        }
        /* LATEST keeps one pending frame per topic even past the connection's limit, so
         * the client always learns the newest state; only the global budget bounds it. */
        int latest = topic && policy == LMW_POLICY_LATEST;
        if ((!latest && x->out_bytes + len > s->cfg.write_limit) ||
            s->stats->pending_write_bytes + len > s->cfg.write_budget) {
            if (policy == LMW_POLICY_CLOSE) {
                s->stats->dropped[LMW_DROP_CLOSED]++;
                drop_unsent(s, x);
                lmw__fail(s, fd, 1008);
                return 0;
            }
            s->stats->dropped[LMW_DROP_WRITE_LIMIT]++;
            return 0;
        }
    }
    int r = write_raw(s, fd, sl, frame, len, NULL, 0, 0, topic);
    if (r > 0) s->stats->frames_sent_total++;
    return r;
}

/* lmw__fail fails the connection (RFC 6455 section 7.1.7): a close frame with code, then
 * the TCP connection is closed once it drains. */
void lmw__fail(lmw_server *s, int fd, int code) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state == ST_OPEN || sl->state == ST_CLOSING) {
        if (!(sl->flags & F_CLOSE_SENT)) {
            uint8_t payload[2] = {(uint8_t)(code >> 8), (uint8_t)code};
            sl->flags |= F_CLOSE_SENT;
            if (send_control(s, fd, sl, LMW_OP_CLOSE, payload, 2) < 0) return;
        }
        if (sl->state == ST_OPEN) sl->close_code = (uint16_t)code;
        start_linger(s, fd, sl);
    }
}

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
    lmw_ext *x = ext_get(s, sl);
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
    in_free(s, x);
    x->in = m;
    x->in_len = (uint32_t)n;
    x->in_cap = (uint32_t)cap;
    s->stats->spill_bytes += cap;
    return 0;
}

static void backlog_add(lmw_server *s, int fd, lmw_slot *sl) {
    if (sl->flags & F_BACKLOG) return;
    if (grow((void **)&s->backlog, &s->cap_backlog, s->nbacklog + 1, sizeof(int)) < 0) return;
    s->backlog[s->nbacklog++] = fd;
    sl->flags |= F_BACKLOG;
}

/* ---------------------------------------------------------------- handshake */

static void reject(lmw_server *s, int fd, lmw_slot *sl, int status) {
    size_t len = 0;
    const uint8_t *resp = lmw_reject_response(status, &len);
    if (!resp) resp = lmw_reject_response(500, &len);
    if (is_handshake_state(sl->state)) s->stats->handshakes--;
    s->stats->rejects_total++;
    sl->state = ST_LINGER; /* before writing: a dead socket frees as a non-handshake */
    if (resp && write_raw(s, fd, sl, resp, len, NULL, 0, 0, 0) < 0) return;
    start_linger(s, fd, sl);
}

static void process_frames(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len,
                           uint32_t progress);

static int open_connection(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key,
                           size_t key_len, const uint8_t *proto, size_t proto_len,
                           uint64_t user_tag) {
    uint8_t resp[512];
    int n = lmw_build_101(key, key_len, proto, proto_len, resp, sizeof resp);
    if (n < 0) {
        reject(s, fd, sl, 500);
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
    if (write_raw(s, fd, sl, resp, (size_t)n, NULL, 0, 0, 0) < 0) return -1;
    return 0;
}

static void process_head(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len) {
    lmw_ext *x = ext_of(s, sl);
    lmw_request req;
    memset(&req, 0, sizeof req);
    if (x) req.scanned = x->head_scanned;
    int r = lmw_parse_request(buf, len, s->cfg.max_head, &req);
    if (r == LMW_INCOMPLETE) {
        if (spill(s, fd, sl, buf, len, len) < 0) return reject(s, fd, sl, 503);
        ext_of(s, sl)->head_scanned = req.scanned ? req.scanned : 1;
        return;
    }
    if (x) x->head_scanned = 0;
    if (r < 0) return reject(s, fd, sl, req.status ? req.status : 400);
    size_t head_len = (size_t)r;
    if (req.kind == LMW_KIND_HTTP) {
        if (req.content_length > s->cfg.max_http_body) return reject(s, fd, sl, 413);
        size_t total = head_len + (size_t)req.content_length;
        if (len < total) {
            sl->state = ST_HTTP_BODY;
            if (spill(s, fd, sl, buf, len, total) < 0) return reject(s, fd, sl, 503);
            return;
        }
        if (s->nwork >= s->maxwork) { /* answer on the next poll */
            if (spill(s, fd, sl, buf, len, len) < 0) return reject(s, fd, sl, 503);
            ext_of(s, sl)->head_scanned = 0;
            sl->state = ST_HTTP_BODY;
            backlog_add(s, fd, sl);
            return;
        }
        s->stats->http_requests_total++;
        sl->state = ST_HTTP_WAIT;
        s->reqs[s->nwork] = req;
        lmw_event *e = push_event(s);
        if (!e) return reject(s, fd, sl, 500);
        e->type = LMW_EV_HTTP;
        e->fd = fd;
        e->gen = sl->gen;
        e->data = buf;
        e->len = total;
        e->request = &s->reqs[s->nwork++];
        return;
    }
    const uint8_t *key = buf + req.headers[LMW_H_SEC_WEBSOCKET_KEY].off;
    size_t key_len = req.headers[LMW_H_SEC_WEBSOCKET_KEY].len;
    if (s->cfg.auto_upgrade) {
        if (open_connection(s, fd, sl, key, key_len, NULL, 0, 0) < 0) return;
        if (len > head_len) process_frames(s, fd, sl, buf + head_len, len - head_len, 0);
        return;
    }
    if (s->nwork >= s->maxwork) {
        if (spill(s, fd, sl, buf, len, len) < 0) return reject(s, fd, sl, 503);
        backlog_add(s, fd, sl);
        return;
    }
    if (len > head_len) { /* a client that did not wait for the 101: keep its frames */
        if (spill(s, fd, sl, buf + head_len, len - head_len, len - head_len) < 0)
            return reject(s, fd, sl, 503);
    }
    sl->state = ST_UPGRADE_WAIT;
    s->reqs[s->nwork] = req;
    lmw_upgrade_pending *u = &s->ups[s->nups++];
    u->fd = fd;
    u->gen = sl->gen;
    u->key = key;
    u->key_len = (uint32_t)key_len;
    lmw_event *e = push_event(s);
    if (!e) return reject(s, fd, sl, 500);
    e->type = LMW_EV_UPGRADE;
    e->fd = fd;
    e->gen = sl->gen;
    e->data = buf;
    e->len = head_len;
    e->request = &s->reqs[s->nwork++];
}

/* ---------------------------------------------------------------- frames */

static void deliver(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p,
                    uint64_t n) {
    lmw_event *e = push_event(s);
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
    if (send_control(s, fd, sl, LMW_OP_CLOSE, echo, code == 1005 ? 0 : 2) < 0) return;
    start_linger(s, fd, sl);
}

/* message_waiting reports whether this batch holds a message of fd for Python. */
static int message_waiting(lmw_server *s, int fd, uint32_t gen) {
    for (int i = s->nev - 1; i >= 0; i--)
        if (s->ev[i].type == LMW_EV_MESSAGE && s->ev[i].fd == fd && s->ev[i].gen == gen)
            return 1;
    return 0;
}

/* end_after_batch ends the connection (fail with code, or answer the peer's close) once
 * Python has handled the messages read before the close, so that its replies to them
 * reach the peer first; with no such message it ends it now. */
static void end_after_batch(lmw_server *s, int fd, lmw_slot *sl, uint8_t what, int code) {
    if (sl->state == ST_OPEN && message_waiting(s, fd, sl->gen) &&
        grow((void **)&s->deferred, &s->cap_deferred, s->ndeferred + 1, sizeof(lmw_deferred)) ==
            0) {
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

static void run_deferred(lmw_server *s) {
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
        if (sl->state == ST_OPEN) return send_control(s, fd, sl, LMW_OP_PONG, p, n) < 0;
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
        conn_free(s, fd, 0);
        return 1;
    }
    end_after_batch(s, fd, sl, DEFER_CLOSE_REPLY, code);
    return 1;
}

/* on_data handles the unmasked payload of a complete data frame. */
static int on_data(lmw_server *s, int fd, lmw_slot *sl, lmw_message_state *ms,
                   const lmw_frame *f, uint8_t *p, int fragmented) {
    uint64_t n = f->payload_len;
    int opcode = ms->opcode ? ms->opcode : f->opcode;
    if (!fragmented && f->fin) {
        deliver(s, fd, sl, opcode, p, n);
        return 0;
    }
    lmw_ext *x = ext_get(s, sl);
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
        deliver(s, fd, sl, opcode, x->msg, x->msg_len);
        s->stats->spill_bytes -= x->msg_cap;
        lend(s, x->msg, 0);
        x->msg = NULL;
        x->msg_len = x->msg_cap = 0;
    }
    return 0;
}

/* process_frames parses every complete frame in buf[0, len). progress describes a
 * frame already partly handled on an earlier read: 0 = nothing, else 1 + the payload
 * bytes already unmasked and checked (its header was checked then too). */
static void process_frames(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len,
                           uint32_t progress) {
    lmw_ext *x = ext_of(s, sl);
    lmw_message_state local = {0};
    lmw_message_state *ms = x ? &x->ms : &local;
    size_t off = 0;
    while (off < len) {
        if (sl->state != ST_OPEN && sl->state != ST_CLOSING) return;
        if (s->nwork >= s->maxwork && !progress) {
            /* the event array is full: keep the rest for the next poll */
            if (spill(s, fd, sl, buf + off, len - off, len - off) < 0)
                return lmw__fail(s, fd, 1013);
            x = ext_of(s, sl);
            x->in_checked = 0;
            if (ms == &local) x->ms = local;
            backlog_add(s, fd, sl);
            return;
        }
        lmw_frame f;
        int r = lmw_parse_frame(buf + off, len - off, 0, 1, &f);
        if (r == LMW_ERROR)
            return end_after_batch(s, fd, sl, DEFER_FAIL, f.close_code ? f.close_code : 1002);
        if (r == LMW_INCOMPLETE) {
            if (spill(s, fd, sl, buf + off, len - off, len - off) < 0)
                return lmw__fail(s, fd, 1013);
            x = ext_of(s, sl);
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
            if (spill(s, fd, sl, buf + off, len - off, cap) < 0)
                return lmw__fail(s, fd, 1013);
            x = ext_of(s, sl);
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
                x = ext_get(s, sl);
                if (!x) return lmw__fail(s, fd, 1011);
                x->ms = local;
                ms = &x->ms;
            }
            if (on_data(s, fd, sl, ms, &f, p, fragmented)) return;
            int code = lmw_message_frame_end(ms, f.fin);
            if (code) return end_after_batch(s, fd, sl, DEFER_FAIL, code);
        }
    }
    ext_trim(s, sl);
}

/* ---------------------------------------------------------------- reading */

static void read_large_frame(lmw_server *s, int fd, lmw_slot *sl, lmw_ext *x) {
    ssize_t n;
    do n = recv(fd, x->in + x->in_len, x->in_cap - x->in_len, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) return conn_free(s, fd, 1006);
    sl->tick = s->now;
    sl->flags &= ~F_PING_OUT;
    uint8_t *buf = x->in;
    size_t len = x->in_len + (size_t)n;
    uint32_t progress = x->in_checked;
    if (len == x->in_cap) { /* complete: the buffer goes to Python with the message */
        s->stats->spill_bytes -= x->in_cap;
        lend(s, buf, 0);
        x->in = NULL;
        x->in_len = x->in_cap = x->in_checked = 0;
    }
    process_frames(s, fd, sl, buf, len, progress);
}

static void on_readable(lmw_server *s, int fd, lmw_slot *sl) {
    lmw_ext *x = ext_of(s, sl);
    if (sl->state == ST_LINGER) {
        uint8_t sink[4096];
        ssize_t n;
        do n = recv(fd, sink, sizeof sink, 0);
        while (n < 0 && errno == EINTR);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) conn_free(s, fd, 0);
        return;
    }
    if (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT || sl->state == ST_DEFERRED)
        return;
    int holding = x && (x->in || x->msg);
    if (!holding && s->stats->spill_bytes >= s->cfg.spill_budget / 4 * 3) {
        /* the budget is short: this socket waits in the kernel until spills drain */
        if (grow((void **)&s->budget_paused, &s->cap_budget_paused, s->nbudget_paused + 1,
                 sizeof(int)) < 0)
            return;
        s->budget_paused[s->nbudget_paused++] = fd;
        sl->flags |= F_BUDGET;
        set_interest(s, fd, sl, 0);
        return;
    }
    if (x && x->in && x->in_cap > s->cfg.read_buffer_size / 2 && sl->state != ST_HEAD &&
        sl->state != ST_HTTP_BODY)
        return read_large_frame(s, fd, sl, x);
    size_t pending = x && x->in ? x->in_len : 0;
    size_t want = pending + MIN_READ_SPACE;
    if (sl->state == ST_HTTP_BODY && x && x->in_cap > want) want = x->in_cap;
    uint8_t *buf;
    size_t cap;
    if (want > s->cfg.read_buffer_size) {
        /* a head or body that needs more than a read block (caps allow it): read into
         * the spill directly */
        if (!x || !x->in || x->in_len >= x->in_cap) return reject(s, fd, sl, 431);
        ssize_t n;
        do n = recv(fd, x->in + x->in_len, x->in_cap - x->in_len, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) return conn_free(s, fd, 0);
        x->in_len += (uint32_t)n; /* a handshake keeps its accept tick: a deadline */
        buf = x->in;
        size_t len = x->in_len;
        if (sl->state == ST_HTTP_BODY && len < x->in_cap) return;
        s->stats->spill_bytes -= x->in_cap;
        lend(s, x->in, 0);
        x->in = NULL;
        x->in_len = x->in_cap = 0;
        x->head_scanned = 0;
        if (sl->state == ST_HTTP_BODY) sl->state = ST_HEAD;
        return process_head(s, fd, sl, buf, len);
    }
    if (take_read_space(s, want, &buf, &cap) < 0) return; /* next poll: epoll reports again */
    size_t room = cap - pending;
    if (sl->state == ST_HEAD && room > s->cfg.max_head + 1 - pending &&
        s->cfg.max_head + 1 > pending)
        room = s->cfg.max_head + 1 - pending; /* never read more head than the cap */
    if (pending) memcpy(buf, x->in, pending);
    ssize_t n;
    do n = recv(fd, buf + pending, room, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) return conn_free(s, fd, 0);
    commit_read_space(s, pending + (size_t)n);
    if (!is_handshake_state(sl->state)) { /* a handshake keeps its accept tick: a deadline */
        sl->tick = s->now;
        sl->flags &= ~F_PING_OUT;
    }
    uint32_t progress = 0;
    if (pending) {
        progress = x->in_checked;
        in_free(s, x);
    }
    size_t len = pending + (size_t)n;
    switch (sl->state) {
    case ST_HEAD:
        return process_head(s, fd, sl, buf, len);
    case ST_HTTP_BODY: {
        sl->state = ST_HEAD;
        if (x) x->head_scanned = 0;
        return process_head(s, fd, sl, buf, len);
    }
    default:
        return process_frames(s, fd, sl, buf, len, progress);
    }
}

/* ---------------------------------------------------------------- per-address cap */

/* An open-addressing table from client address (IPv4 mapped into IPv6) to the number of
 * its connections and handshakes; allocated only when max_per_ip is set. */
typedef struct lmw_peer {
    uint64_t hi, lo;
    uint32_t count;
    uint32_t pad;
} lmw_peer;

static int peer_key(const struct sockaddr_storage *ss, uint64_t *hi, uint64_t *lo) {
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        *hi = 0;
        *lo = 0xffff00000000ull | ntohl(in->sin_addr.s_addr);
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        memcpy(hi, in6->sin6_addr.s6_addr, 8);
        memcpy(lo, in6->sin6_addr.s6_addr + 8, 8);
        return 0;
    }
    return -1;
}

static uint32_t peer_home(lmw_server *s, uint64_t hi, uint64_t lo) {
    uint64_t h = (hi * 0x9e3779b97f4a7c15ull) ^ (lo * 0xc2b2ae3d27d4eb4full);
    return (uint32_t)(h >> 32) & s->peer_mask;
}

/* peer_add counts one more connection from ss for fd; returns the new count (0 if
 * untracked). The address is remembered per fd: after a reset, getpeername fails. */
static uint32_t peer_add(lmw_server *s, int fd, const struct sockaddr_storage *ss) {
    uint64_t hi, lo;
    if (!s->peers || peer_key(ss, &hi, &lo) < 0) return 0;
    s->peer_of_fd[2 * fd] = hi;
    s->peer_of_fd[2 * fd + 1] = lo;
    s->peer_counted[fd] = 1;
    for (uint32_t i = peer_home(s, hi, lo);; i = (i + 1) & s->peer_mask) {
        lmw_peer *p = &s->peers[i];
        if (p->count && (p->hi != hi || p->lo != lo)) continue;
        p->hi = hi;
        p->lo = lo;
        return ++p->count;
    }
}

static void peer_remove(lmw_server *s, int fd) {
    if (!s->peers || !s->peer_counted[fd]) return;
    uint64_t hi = s->peer_of_fd[2 * fd], lo = s->peer_of_fd[2 * fd + 1];
    s->peer_counted[fd] = 0;
    uint32_t mask = s->peer_mask, i = peer_home(s, hi, lo);
    while (s->peers[i].count && (s->peers[i].hi != hi || s->peers[i].lo != lo))
        i = (i + 1) & mask;
    if (!s->peers[i].count || --s->peers[i].count) return;
    /* backward-shift deletion keeps every probe chain unbroken */
    for (uint32_t j = (i + 1) & mask; s->peers[j].count; j = (j + 1) & mask) {
        uint32_t home = peer_home(s, s->peers[j].hi, s->peers[j].lo);
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (stays) continue;
        s->peers[i] = s->peers[j];
        s->peers[j].count = 0;
        i = j;
    }
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
        epoll_ctl(s->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, s->listeners[i], &ev);
    }
    s->listening = on;
    s->stats->accept_paused = !on;
}

static int accepting_allowed(lmw_server *s) {
    return !s->stopped && !s->emfile &&
           s->stats->connections + s->stats->handshakes < s->cfg.max_connections &&
           s->stats->handshakes < s->cfg.max_handshakes;
}

/* slot_open starts a connection on fd: state HEAD, in the epoll set. */
static int slot_open(lmw_server *s, int fd) {
    if (fd < 0 || (uint32_t)fd >= s->nslots || s->slots[fd].state != ST_FREE) return LMW_ERROR;
    lmw_slot *sl = &s->slots[fd];
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return LMW_ERROR;
    sl->state = ST_HEAD;
    sl->flags = F_EPOLL_IN;
    sl->tick = s->now;
    sl->close_code = 0;
    if ((uint32_t)fd > s->max_fd_seen) s->max_fd_seen = (uint32_t)fd;
    s->stats->handshakes++;
    return 0;
}

static void accept_batch(lmw_server *s, int lfd) {
    for (uint32_t i = 0; i < s->cfg.accept_batch && accepting_allowed(s); i++) {
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        int fd = accept4(lfd, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) s->emfile = 1;
            return;
        }
        if (slot_open(s, fd) < 0) {
            close(fd);
            continue;
        }
        if (s->peers && peer_add(s, fd, &peer) > s->cfg.max_per_ip)
            reject(s, fd, &s->slots[fd], 503); /* this address holds its share: 503, close */
    }
}

int lmw_adopt(lmw_server *s, int fd) {
    pthread_mutex_lock(&s->lock);
    int r = slot_open(s, fd);
    pthread_mutex_unlock(&s->lock);
    if (r == 0) lmw_wake(s);
    return r;
}

/* ---------------------------------------------------------------- sweep */

static void sweep(lmw_server *s) {
    uint32_t hs = ms_to_ticks(s->cfg.handshake_timeout_ms);
    uint32_t pi = ms_to_ticks(s->cfg.ping_interval_ms);
    uint32_t pt = ms_to_ticks(s->cfg.ping_timeout_ms);
    uint32_t ct = ms_to_ticks(s->cfg.close_timeout_ms);
    static const uint8_t ping[2] = {0x89, 0x00};
    for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++) {
        lmw_slot *sl = &s->slots[fd];
        uint32_t idle = s->now - sl->tick;
        switch (sl->state) {
        case ST_HEAD:
        case ST_HTTP_BODY:
            if (idle >= hs) reject(s, (int)fd, sl, 408);
            break;
        case ST_OPEN:
            if (!s->cfg.ping_interval_ms) break;
            if (sl->flags & F_PING_OUT) {
                if (idle >= pt) conn_free(s, (int)fd, 1006);
            } else if (idle >= pi) {
                lmw_ext *x = ext_of(s, sl);
                sl->flags |= F_PING_OUT;
                sl->tick = s->now;
                if (!x || !x->out_head) {
                    if (write_raw(s, (int)fd, sl, ping, 2, NULL, 0, 1, 0) > 0)
                        s->stats->frames_sent_total++;
                } else {
                    send_control(s, (int)fd, sl, LMW_OP_PING, NULL, 0);
                }
            }
            break;
        case ST_CLOSING:
        case ST_LINGER:
            if (idle >= ct) conn_free(s, (int)fd, 0);
            break;
        default:
            break;
        }
    }
}

/* ---------------------------------------------------------------- poll */

static void release_batch(lmw_server *s) {
    for (uint32_t i = 0; i < s->nlent; i++) free(s->lent[i].ptr);
    s->nlent = 0;
    s->pool_next = 0;
    s->pool_off = 0;
    s->stats->buffer_pool_in_use = 0;
    for (int i = 0; i < s->nev; i++) {
        lmw_event *e = &s->ev[i];
        if (e->type != LMW_EV_UPGRADE && e->type != LMW_EV_HTTP) continue;
        lmw_slot *sl = lmw__slot(s, e->fd, e->gen);
        if (sl && (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT))
            reject(s, e->fd, sl, 500);
    }
    s->nev = 0;
    s->nwork = 0;
    s->nups = 0;
}

static void drain_closed(lmw_server *s) {
    for (uint32_t i = 0; i < s->nclosed; i++) {
        lmw_event *e = push_event(s);
        if (e) *e = s->closed[i];
    }
    s->nclosed = 0;
}

static void run_backlog(lmw_server *s) {
    uint32_t n = s->nbacklog;
    int *fds = s->backlog;
    s->backlog = NULL;
    s->nbacklog = 0;
    s->cap_backlog = 0;
    for (uint32_t i = 0; i < n; i++) {
        int fd = fds[i];
        lmw_slot *sl = &s->slots[fd];
        sl->flags &= ~F_BACKLOG;
        lmw_ext *x = ext_of(s, sl);
        if (!x || !x->in) continue;
        if (s->nwork >= s->maxwork) {
            backlog_add(s, fd, sl);
            continue;
        }
        uint8_t *buf = x->in;
        size_t len = x->in_len;
        uint32_t progress = x->in_checked;
        s->stats->spill_bytes -= x->in_cap;
        lend(s, buf, 0);
        x->in = NULL;
        x->in_len = x->in_cap = x->in_checked = 0;
        if (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY) {
            sl->state = ST_HEAD;
            x->head_scanned = 0;
            process_head(s, fd, sl, buf, len);
        } else if (is_open_state(sl->state)) {
            process_frames(s, fd, sl, buf, len, progress);
        }
    }
    free(fds);
}

static void resume_budget_paused(lmw_server *s) {
    if (!s->nbudget_paused || s->stats->spill_bytes >= s->cfg.spill_budget / 2) return;
    for (uint32_t i = 0; i < s->nbudget_paused; i++) {
        int fd = s->budget_paused[i];
        lmw_slot *sl = &s->slots[fd];
        if (sl->state != ST_FREE && (sl->flags & F_BUDGET)) {
            sl->flags &= ~F_BUDGET;
            set_interest(s, fd, sl, 0);
        }
    }
    s->nbudget_paused = 0;
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

int lmw_poll(lmw_server *s, int timeout_ms, lmw_event **out, int max) {
    struct epoll_event evs[MAX_EPOLL_EVENTS];
    pthread_mutex_lock(&s->lock);
    release_batch(s);
    if (ensure_batch(s, max) < 0) {
        pthread_mutex_unlock(&s->lock);
        return LMW_ERROR;
    }
    s->now = now_tick();
    run_deferred(s);
    drain_closed(s);
    run_backlog(s);
    resume_budget_paused(s);
    listeners_poll(s, accepting_allowed(s));
    if (s->nev || s->nbacklog || s->wake_pending) timeout_ms = 0;
    pthread_mutex_unlock(&s->lock);

    int n = epoll_wait(s->epfd, evs, MAX_EPOLL_EVENTS, timeout_ms);

    pthread_mutex_lock(&s->lock);
    s->now = now_tick();
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        uint32_t what = evs[i].events;
        if (fd == s->wakefd) {
            uint64_t v;
            if (read(s->wakefd, &v, sizeof v) < 0) { /* already drained */
            }
            s->wake_pending = 1;
            continue;
        }
        if (is_listener(s, fd)) {
            accept_batch(s, fd);
            continue;
        }
        lmw_slot *sl = &s->slots[fd];
        if (sl->state == ST_FREE) continue;
        if (what & EPOLLOUT) flush_out(s, fd, sl);
        if (sl->state == ST_FREE) continue;
        if ((what & (EPOLLIN | EPOLLHUP | EPOLLERR)) && s->nwork < s->maxwork)
            on_readable(s, fd, sl);
    }
    if (s->wake_pending) {
        s->wake_pending = 0;
        lmw_event *e = push_event(s);
        if (e) e->type = LMW_EV_WAKE;
    }
    if (s->now - s->last_sweep >= 10) {
        s->last_sweep = s->now;
        sweep(s);
    }
    drain_closed(s);
    listeners_poll(s, accepting_allowed(s));
    *out = s->ev;
    int count = s->nev;
    pthread_mutex_unlock(&s->lock);
    return count;
}

int lmw_wake(lmw_server *s) {
    uint64_t one = 1;
    return write(s->wakefd, &one, sizeof one) == sizeof one ? 0 : LMW_ERROR;
}

/* ---------------------------------------------------------------- answers, sends */

int lmw_upgrade_accept(lmw_server *s, int fd, uint32_t gen, const uint8_t *protocol,
                       size_t protocol_len, uint64_t user_tag) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && sl->state == ST_UPGRADE_WAIT) {
        for (int i = 0; i < s->nups; i++) {
            lmw_upgrade_pending *u = &s->ups[i];
            if (u->fd != fd || u->gen != gen) continue;
            r = open_connection(s, fd, sl, u->key, u->key_len, protocol, protocol_len,
                                user_tag);
            u->fd = -1;
            if (r == 0) {
                lmw_ext *x = ext_of(s, sl);
                if (x && x->in) backlog_add(s, fd, sl); /* frames sent before the 101 */
                lmw_wake(s);
            }
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_reject(lmw_server *s, int fd, uint32_t gen, int status) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && (sl->state == ST_UPGRADE_WAIT || sl->state == ST_HTTP_WAIT);
    if (ok) reject(s, fd, sl, status);
    pthread_mutex_unlock(&s->lock);
    return ok ? 0 : LMW_ERROR;
}

int lmw_respond(lmw_server *s, int fd, uint32_t gen, const uint8_t *data, size_t len) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && sl->state == ST_HTTP_WAIT;
    if (ok) {
        s->stats->handshakes--;
        sl->state = ST_LINGER;
        if (write_raw(s, fd, sl, data, len, NULL, 0, 0, 0) > 0) start_linger(s, fd, sl);
    }
    pthread_mutex_unlock(&s->lock);
    return ok ? 0 : LMW_ERROR;
}

int lmw_send(lmw_server *s, int fd, uint32_t gen, int opcode, const uint8_t *data, size_t len) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && (sl->state == ST_OPEN || sl->state == ST_DEFERRED)) {
        uint8_t hdr[10];
        int hl = lmw_build_header(hdr, 1, opcode, len);
        lmw_ext *x = ext_of(s, sl);
        if (x && x->out_head &&
            (x->out_bytes + len + hl > s->cfg.write_limit ||
             s->stats->pending_write_bytes + len + hl > s->cfg.write_budget)) {
            if (s->cfg.write_policy == LMW_POLICY_CLOSE) {
                s->stats->dropped[LMW_DROP_CLOSED]++;
                drop_unsent(s, x);
                lmw__fail(s, fd, 1008);
            } else {
                s->stats->dropped[LMW_DROP_WRITE_LIMIT]++;
            }
            r = 0;
        } else {
            r = write_raw(s, fd, sl, hdr, (size_t)hl, data, len, 0, 0);
            if (r > 0) s->stats->frames_sent_total++;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return r;
}

static void server_close(lmw_server *s, int fd, lmw_slot *sl, int code, const uint8_t *reason,
                         size_t reason_len) {
    uint8_t payload[125];
    int n = lmw_build_close_payload(payload, code, reason, reason_len);
    if (n < 0) n = lmw_build_close_payload(payload, code, NULL, 0);
    if (n < 0) return;
    sl->flags |= F_CLOSE_SENT;
    sl->close_code = (uint16_t)code;
    if (send_control(s, fd, sl, LMW_OP_CLOSE, payload, (size_t)n) < 0) return;
    sl->state = ST_CLOSING;
    sl->tick = s->now;
}

int lmw_close(lmw_server *s, int fd, uint32_t gen, int code, const uint8_t *reason,
              size_t reason_len) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && sl->state == ST_OPEN && lmw_close_code_valid(code);
    if (ok) server_close(s, fd, sl, code, reason, reason_len);
    pthread_mutex_unlock(&s->lock);
    if (ok) lmw_wake(s);
    return ok ? 0 : LMW_ERROR;
}

int lmw_close_all(lmw_server *s, int code) {
    int n = 0;
    pthread_mutex_lock(&s->lock);
    for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++) {
        lmw_slot *sl = &s->slots[fd];
        if (sl->state == ST_OPEN) {
            server_close(s, (int)fd, sl, code, NULL, 0);
            n++;
        } else if (sl->state == ST_HEAD || sl->state == ST_HTTP_BODY) {
            reject(s, (int)fd, sl, 503);
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
        set_interest(s, fd, sl, 0);
    }
    pthread_mutex_unlock(&s->lock);
    return sl ? 0 : LMW_ERROR;
}

int lmw_resume_reading(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (sl && (sl->flags & F_PAUSED)) {
        sl->flags &= ~F_PAUSED;
        set_interest(s, fd, sl, 0);
    }
    pthread_mutex_unlock(&s->lock);
    if (sl) lmw_wake(s);
    return sl ? 0 : LMW_ERROR;
}

int lmw_is_open(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int r = sl && sl->state == ST_OPEN;
    pthread_mutex_unlock(&s->lock);
    return r;
}

uint64_t lmw_user_tag(lmw_server *s, int fd, uint32_t gen) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    uint64_t t = sl ? sl->user_tag : 0;
    pthread_mutex_unlock(&s->lock);
    return t;
}

int lmw_set_user_tag(lmw_server *s, int fd, uint32_t gen, uint64_t user_tag) {
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    int ok = sl && is_open_state(sl->state);
    if (ok) {
        lmw__hub_user_remove(s, fd);
        sl->user_tag = user_tag;
        if (user_tag) lmw__hub_user_add(s, fd);
    }
    pthread_mutex_unlock(&s->lock);
    return ok ? 0 : LMW_ERROR;
}

uint32_t lmw_connection_count(lmw_server *s) { return (uint32_t)s->stats->connections; }

lmw_stats *lmw_server_stats(lmw_server *s) { return s->stats; }

/* ---------------------------------------------------------------- lifecycle */

lmw_server *lmw_server_new(const lmw_config *cfg, lmw_stats *stats) {
    lmw_server *s = calloc(1, sizeof(lmw_server));
    if (!s) return NULL;
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
        if (!s->peer_of_fd || !s->peer_counted) {
            free(s->peers);
            s->peers = NULL;
        }
    }
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!s->slots || !s->pool || s->epfd < 0 || s->wakefd < 0) {
        lmw_server_free(s);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = s->wakefd};
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->wakefd, &ev);
    pthread_mutex_init(&s->lock, NULL);
    s->now = s->last_sweep = now_tick();
    lmw__hub_init(s);
    return s;
}

void lmw_server_free(lmw_server *s) {
    if (!s) return;
    for (uint32_t fd = 0; s->slots && fd <= s->max_fd_seen && fd < s->nslots; fd++)
        if (s->slots[fd].state != ST_FREE) conn_free(s, (int)fd, 1001);
    for (uint32_t i = 0; i < s->nlent; i++) free(s->lent[i].ptr);
    for (uint32_t i = 0; s->pool && i < s->cfg.read_buffers; i++) free(s->pool[i]);
    lmw__hub_free(s);
    if (s->epfd >= 0) close(s->epfd);
    if (s->wakefd > 0) close(s->wakefd);
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
    int ok = s->nlisteners < 8;
    if (ok) {
        s->listeners[s->nlisteners++] = fd;
        if (s->listening) {
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
            epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
        }
    }
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
