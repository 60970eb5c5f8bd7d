/* _slot.c - where per-connection memory lives: the slot table's lookups, exts (memory a
 * connection holds only while it needs it), memory lent to Python, growable arrays, the
 * epoll interest of a slot, and the per-address table.
 *
 * Storage only: nothing here changes a connection's state (that is _conn.c) or writes to a
 * socket (_output.c). Every function runs with the server lock held.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "_runtime.h"

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
        /* out of memory: an event may still point into it, so it is kept (leaked) rather
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

/* lmw__shift_delete empties the slot `hole` of an open-addressing table of mask + 1
 * entries by backward shifting, so lookups never need tombstones: each later entry of the
 * probe run moves back into the hole unless its home lies cyclically in (hole, j]. */
void lmw__shift_delete(const lmw_open_table *t, uint32_t hole) {
    for (uint32_t j = (hole + 1) & t->mask; t->used(t->ctx, j); j = (j + 1) & t->mask) {
        uint32_t home = t->home(t->ctx, j);
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays) continue;
        t->move(t->ctx, hole, j);
        hole = j;
    }
    t->clear(t->ctx, hole);
}

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

/* lmw__ext_drop frees everything the connection holds besides its slot. */
void lmw__ext_drop(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (!x) return;
    lmw__in_free(s, x);
    lmw__msg_free(s, x);
    out_free_all(s, x);
    s->exts[sl->ext - 1] = NULL;
    if (lmw__grow((void **)&s->free_exts, &s->cap_free_exts, s->nfree_exts + 1, sizeof(uint32_t)) ==
        0)
        s->free_exts[s->nfree_exts++] = sl->ext - 1; /* else the index is not reused */
    free(x);
    sl->ext = 0;
}

/* An ext with nothing in it is freed at once: idle connections keep no ext. */
void lmw__ext_trim(lmw_server *s, lmw_slot *sl) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x && !x->in && !x->msg && !x->out_head && x->ms.opcode == 0 && !x->parked_key_len)
        lmw__ext_drop(s, sl);
}

/* lmw__set_interest brings the epoll interest in line with the flags; out_changed says
 * F_WANT_OUT was just flipped (EPOLLIN is tracked by F_EPOLL_IN). A failed epoll_ctl is
 * counted: the socket then keeps its previous interest (level-triggered, so nothing is
 * lost; at worst it is reported once more). */
void lmw__set_interest(lmw_server *s, int fd, lmw_slot *sl, int out_changed) {
    int parked = lmw__is_parked_state(sl->state);
    int want_in = !(sl->flags & (F_PAUSED | F_BUDGET)) && !parked;
    int has_in = (sl->flags & F_EPOLL_IN) != 0;
    if (want_in == has_in && !out_changed) return;
    int want_out = (sl->flags & F_WANT_OUT) != 0;
    /* a parked upgrade is not read, but a client that leaves (FIN) is noticed at once; a
     * parked HTTP request waits even for a half-closed client (it may still read the
     * answer): only a reset or a full hang-up (always reported) ends it */
    uint32_t hangup = sl->state == ST_UPGRADE_PARKED ? EPOLLRDHUP : 0;
    struct epoll_event ev = {.events = (want_in ? EPOLLIN : 0) | (want_out ? EPOLLOUT : 0) | hangup,
                             .data.fd = fd};
    if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
        s->stats->errors[LMW_ERR_EPOLL]++;
        return;
    }
    sl->flags = (uint8_t)((sl->flags & ~F_EPOLL_IN) | (want_in ? F_EPOLL_IN : 0));
}

/* ---------------------------------------------------------------- per-address table */

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

/* lmw__peer_add counts one more connection from ss for fd; returns the new count (0 if
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

static int peer_used(void *ctx, uint32_t i) { return ((lmw_server *)ctx)->peers[i].count != 0; }

static uint32_t peer_home_of(void *ctx, uint32_t i) {
    lmw_server *s = ctx;
    return peer_home(s, s->peers[i].hi, s->peers[i].lo);
}

static void peer_move(void *ctx, uint32_t to, uint32_t from) {
    lmw_server *s = ctx;
    s->peers[to] = s->peers[from];
}

static void peer_clear(void *ctx, uint32_t i) { ((lmw_server *)ctx)->peers[i].count = 0; }

/* lmw__peer_remove uncounts fd's address (a no-op for an untracked fd). */
void lmw__peer_remove(lmw_server *s, int fd) {
    if (!s->peers || !s->peer_counted[fd]) return;
    uint64_t hi = s->peer_of_fd[2 * fd], lo = s->peer_of_fd[2 * fd + 1];
    s->peer_counted[fd] = 0;
    uint32_t mask = s->peer_mask, i = peer_home(s, hi, lo);
    while (s->peers[i].count && (s->peers[i].hi != hi || s->peers[i].lo != lo)) i = (i + 1) & mask;
    if (!s->peers[i].count || --s->peers[i].count) return;
    lmw_open_table t = {mask, s, peer_used, peer_home_of, peer_move, peer_clear};
    lmw__shift_delete(&t, i);
}
