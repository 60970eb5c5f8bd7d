/* _conn.c - per-connection state: the slot table, exts, the per-address table.
 *
 * Every change of a connection's state goes through the functions here and in the two
 * I/O files; lmw_slot (_runtime.h) is its one home.
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
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#include "_runtime.h"

static void peer_remove(lmw_server *s, int fd);

static const int CLOSE_CODES[LMW_CLOSE_CODES - 1] = {1000, 1001, 1002, 1003, 1005, 1006,
                                                     1007, 1008, 1009, 1011, 1013};

int lmw_close_code_index(int code) {
    for (int i = 0; i < LMW_CLOSE_CODES - 1; i++)
        if (CLOSE_CODES[i] == code) return i;
    return LMW_CLOSE_CODES - 1;
}

/* ---------------------------------------------------------------- growable arrays */

int lmw__grow(void **arr, uint32_t *cap, uint32_t need, size_t elem) {
    if (need <= *cap) return 0;
    uint32_t ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    void *p = realloc(*arr, (size_t)ncap * elem);
    if (!p) return -1;
    *arr = p;
    *cap = ncap;
    return 0;
}

void lmw__lend(lmw_server *s, void *ptr) {
    if (!ptr) return;
    if (lmw__grow((void **)&s->lent, &s->cap_lent, s->nlent + 1, sizeof(void *)) < 0) {
        /* out of memory: the event still points into it, so it is kept (leaked) rather
         * than freed while Python may read it */
        return;
    }
    s->lent[s->nlent++] = ptr;
}

lmw_event *lmw__push_event(lmw_server *s) {
    uint32_t cap = (uint32_t)s->cap_ev;
    if (lmw__grow((void **)&s->ev, &cap, (uint32_t)s->nev + 1, sizeof(lmw_event)) < 0) return NULL;
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

lmw_ext *lmw__ext_of(lmw_server *s, lmw_slot *sl) { return sl->ext ? s->exts[sl->ext - 1] : NULL; }

lmw_ext *lmw__ext_get(lmw_server *s, lmw_slot *sl) {
    if (sl->ext) return s->exts[sl->ext - 1];
    lmw_ext *x = calloc(1, sizeof(lmw_ext));
    if (!x) return NULL;
    uint32_t idx;
    if (s->nfree_exts) {
        idx = s->free_exts[--s->nfree_exts];
    } else {
        if (lmw__grow((void **)&s->exts, &s->cap_exts, s->nexts + 1, sizeof(lmw_ext *)) < 0) {
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

void lmw__in_free(lmw_server *s, lmw_ext *x) {
    free(x->in);
    s->stats->spill_bytes -= x->in_cap;
    x->in = NULL;
    x->in_len = x->in_cap = x->in_want = x->in_checked = 0;
    x->in_frame_begun = 0;
}

void lmw__msg_free(lmw_server *s, lmw_ext *x) {
    free(x->msg);
    s->stats->spill_bytes -= x->msg_cap;
    x->msg = NULL;
    x->msg_len = x->msg_cap = 0;
}

static void ext_drop(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!x) return;
    lmw__in_free(s, x);
    lmw__msg_free(s, x);
    out_free_all(s, x);
    s->exts[sl->ext - 1] = NULL;
    if (lmw__grow((void **)&s->free_exts, &s->cap_free_exts, s->nfree_exts + 1, sizeof(uint32_t)) ==
        0)
        s->free_exts[s->nfree_exts++] = sl->ext - 1;
    free(x);
    sl->ext = 0;
}

/* An ext with nothing in it is freed at once: idle connections keep no ext. */
void lmw__ext_trim(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x && !x->in && !x->msg && !x->out_head && x->ms.opcode == 0 && !x->head_scanned)
        ext_drop(s, sl);
}

/* set_interest brings the epoll interest in line with the flags; out_changed says
 * F_WANT_OUT was just flipped (EPOLLIN is tracked by F_EPOLL_IN). */
void lmw__set_interest(lmw_server *s, int fd, lmw_slot *sl, int out_changed) {
    int want_in = !(sl->flags & (F_PAUSED | F_BUDGET));
    int has_in = (sl->flags & F_EPOLL_IN) != 0;
    if (want_in == has_in && !out_changed) return;
    int want_out = (sl->flags & F_WANT_OUT) != 0;
    struct epoll_event ev = {.events = (want_in ? EPOLLIN : 0) | (want_out ? EPOLLOUT : 0),
                             .data.fd = fd};
    epoll_ctl(s->epfd, EPOLL_CTL_MOD, fd, &ev);
    sl->flags = (uint8_t)((sl->flags & ~F_EPOLL_IN) | (want_in ? F_EPOLL_IN : 0));
}

int lmw__is_handshake_state(uint8_t st) {
    return st == ST_HEAD || st == ST_HTTP_BODY || st == ST_UPGRADE_WAIT || st == ST_HTTP_WAIT;
}

/* lmw__is_open_state: a WebSocket connection that is open or closing (its frames are
 * parsed, it is counted as a connection). */
int lmw__is_open_state(uint8_t st) {
    return st == ST_OPEN || st == ST_CLOSING || st == ST_DEFERRED;
}

/* lmw__may_receive_data: data frames (sends, publishes, broadcasts) may be written. A
 * DEFERRED connection is still open: its close waits for Python's replies to go first. */
int lmw__may_receive_data(uint8_t st) { return st == ST_OPEN || st == ST_DEFERRED; }

/* conn_free closes the fd and forgets everything about the connection. */
void lmw__conn_free(lmw_server *s, int fd, uint16_t code) {
    lmw_slot *sl = &s->slots[fd];
    if (sl->state == ST_FREE) return;
    if (lmw__is_handshake_state(sl->state)) s->stats->handshakes--;
    if (sl->close_code) { /* it was an open WebSocket connection */
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
    s->live--;
    close(fd);
    s->emfile = 0;
}

/* ---------------------------------------------------------------- per-address cap */

/* The per-address table (lmw_peer, _runtime.h): open addressing from the client address
 * (IPv4 mapped into IPv6) to its connections and handshakes; only when max_per_ip is set. */

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
uint32_t lmw__peer_add(lmw_server *s, int fd, const struct sockaddr_storage *ss) {
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
    while (s->peers[i].count && (s->peers[i].hi != hi || s->peers[i].lo != lo)) i = (i + 1) & mask;
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
