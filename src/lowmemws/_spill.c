/* _spill.c - memory for input: the pooled read space and the spills, under the budget.
 *
 * Reading borrows space from a bump arena over read_buffers pooled blocks, returned all
 * at once by the next lmw_poll. Input that does not complete a head or frame is kept in a
 * spill of exactly what arrived; a head + body or frame larger than half a read block is
 * read straight into its spill, which grows with what the kernel holds. So spill_budget is
 * charged for bytes clients really sent, never for lengths they declared. Past 3/4 of it no
 * socket starts a new spill (_input.c then takes only whole messages); a socket that must
 * wait for the budget is taken off EPOLLIN and its bytes wait in the kernel.
 *
 * Storage and accounting only: nothing here changes a connection's state.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "_runtime.h"

/* ---------------------------------------------------------------- read space */

int lmw__take_read_space(lmw_server *s, size_t need, uint8_t **buf, size_t *cap) {
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

void lmw__commit_read_space(lmw_server *s, size_t used) { s->pool_off += (uint32_t)used; }

/* ---------------------------------------------------------------- spills and the budget */

/* A spill is "large" when the whole head + body or frame it waits for is more than half a
 * read block: it is then read straight into, growing as bytes arrive (_input.c). */
int lmw__spill_is_large(lmw_server *s, const lmw_ext *x) {
    return x->in_want > s->cfg.read_buffer_size / 2;
}

/* lmw__budget_short: past 3/4 of the spill budget no socket starts a new spill; a socket with
 * nothing pending is read only for what completes without one (_input.c). */
int lmw__budget_short(lmw_server *s) {
    return s->stats->spill_bytes >= s->cfg.spill_budget / 4 * 3;
}

/* lmw__spill keeps the n pending bytes at p in the connection's ext, in an allocation of exactly
 * n: the budget pays for bytes that arrived. want is the size of the whole head + body or
 * frame once known (0: not yet). */
int lmw__spill(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *p, size_t n, uint64_t want) {
    lmw_ext *x = lmw__ext_get(s, sl);
    if (!x) return -1;
    if (x->in != p) {
        if (s->stats->spill_bytes + n > s->cfg.spill_budget) return -1;
        uint8_t *m = malloc(n ? n : 1);
        if (!m) return -1;
        memcpy(m, p, n);
        lmw__in_free(s, x);
        x->in = m;
        x->in_cap = n;
        s->stats->spill_bytes += n;
    }
    x->in_len = n; /* else already there: reading straight into a large spill */
    x->in_want = want;
    x->in_checked = 0;
    x->in_frame_begun = 0;
    return 0;
}

/* spill_cap_wanted is the allocation a large spill needs for what the kernel holds now: at
 * most the whole head + body or frame, never more than twice what has arrived. */
static uint64_t spill_cap_wanted(int fd, const lmw_ext *x) {
    uint64_t cap = x->in_len + lmw__bytes_waiting(fd);
    if (cap < 2 * x->in_len) cap = 2 * x->in_len; /* doubling: few reallocs, at most 2x */
    return cap > x->in_want ? x->in_want : cap;
}

/* growth_fits: a large spill may grow to cap while the spills stay within 3/4 of the budget
 * (all of it for the only one held, so a small budget still lets a message through). */
static int growth_fits(lmw_server *s, const lmw_ext *x, uint64_t cap) {
    uint64_t after = s->stats->spill_bytes + (cap - x->in_cap);
    int alone = s->stats->spill_bytes == x->in_cap + x->msg_cap; /* no one else holds any */
    return after <= s->cfg.spill_budget / 4 * 3 || (alone && after <= s->cfg.spill_budget);
}

/* compact_budget_paused keeps each paused fd once: a paused connection that ended leaves
 * its entry behind, and its fd may be paused again by the next connection that gets it, so
 * while the budget stays short under churn the list would otherwise grow without bound. */
static void compact_budget_paused(lmw_server *s) {
    uint32_t kept = 0;
    for (uint32_t i = 0; i < s->nbudget_paused; i++) {
        int fd = s->budget_paused[i];
        if (!(s->slots[fd].flags & F_BUDGET)) continue; /* ended, or already kept */
        s->slots[fd].flags &= ~F_BUDGET;
        s->budget_paused[kept++] = fd;
    }
    for (uint32_t i = 0; i < kept; i++) s->slots[s->budget_paused[i]].flags |= F_BUDGET;
    s->nbudget_paused = kept;
}

/* lmw__budget_pause takes fd off EPOLLIN until the spills drain below half the budget
 * (lmw__resume_budget_paused): its bytes wait in the kernel. Listed once, however often
 * it is reported again. */
void lmw__budget_pause(lmw_server *s, int fd, lmw_slot *sl) {
    if (sl->flags & F_BUDGET) return;
    if (s->nbudget_paused >= 2 * s->live + 64) compact_budget_paused(s);
    if (lmw__grow((void **)&s->budget_paused, &s->cap_budget_paused, s->nbudget_paused + 1,
                  sizeof(int)) < 0)
        return; /* not listed: it stays readable and is tried again next poll */
    s->budget_paused[s->nbudget_paused++] = fd;
    sl->flags |= F_BUDGET;
    lmw__set_interest(s, fd, sl, 0);
}

/* lmw__resume_budget_paused gives EPOLLIN back once the spills are below half the budget,
 * except to a large spill whose growth still would not fit: resumed, it would only pause
 * again at once, a busy loop while its bytes wait in the kernel. */
void lmw__resume_budget_paused(lmw_server *s) {
    if (!s->nbudget_paused || s->stats->spill_bytes >= s->cfg.spill_budget / 2) return;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < s->nbudget_paused; i++) {
        int fd = s->budget_paused[i];
        lmw_slot *sl = &s->slots[fd];
        if (sl->state == ST_FREE || !(sl->flags & F_BUDGET)) continue;
        lmw_ext *x = lmw__ext_of(s, sl);
        if (x && x->in && lmw__spill_is_large(s, x) &&
            !growth_fits(s, x, spill_cap_wanted(fd, x))) {
            s->budget_paused[kept++] = fd;
            continue;
        }
        sl->flags &= ~F_BUDGET;
        lmw__set_interest(s, fd, sl, 0);
    }
    s->nbudget_paused = kept;
}

/* lmw__take_spill hands the pending input to the caller: the spill is lent (freed by the next
 * lmw_poll, events may point into it) and the ext forgets it. */
lmw_pending lmw__take_spill(lmw_server *s, lmw_ext *x) {
    lmw_pending p = {.buf = x->in,
                     .len = x->in_len,
                     .progress = {.checked = x->in_checked, .begun = x->in_frame_begun}};
    s->stats->spill_bytes -= x->in_cap;
    lmw__lend(s, x->in);
    x->in = NULL;
    x->in_len = x->in_cap = x->in_want = x->in_checked = 0;
    x->in_frame_begun = 0;
    return p;
}

/* lmw__bytes_waiting is what the kernel holds unread for fd (FIONREAD): what has arrived. */
uint64_t lmw__bytes_waiting(int fd) {
    int n = 0;
    return ioctl(fd, FIONREAD, &n) == 0 && n > 0 ? (uint64_t)n : 0;
}

/* lmw__grow_spill makes room in a large spill for the bytes the kernel holds now. When the
 * budget cannot take it yet, the socket waits in the kernel (GROW_WAIT); a head + body or
 * frame larger than the whole budget never fits (GROW_NEVER). */
int lmw__grow_spill(lmw_server *s, int fd, lmw_slot *sl, lmw_ext *x) {
    if (x->in_want > s->cfg.spill_budget) return GROW_NEVER;
    uint64_t cap = spill_cap_wanted(fd, x);
    if (cap <= x->in_cap) return GROWN;
    if (!growth_fits(s, x, cap)) {
        lmw__budget_pause(s, fd, sl);
        return GROW_WAIT;
    }
    uint8_t *m = realloc(x->in, cap);
    if (!m) return GROW_NOMEM;
    x->in = m;
    s->stats->spill_bytes += cap - x->in_cap;
    x->in_cap = cap;
    return GROWN;
}
