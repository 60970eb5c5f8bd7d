/* _paced.c - paced fan-out: one frame to many, spread over time (issue 18).
 *
 * Theory of operation
 * -------------------
 * A paced send is one lmw_paced object: the frame (built once), who receives it (a topic, a
 * set of user tags, or everyone), the policy, a cursor over the slot table, the fd where the
 * scan ends, the pace (spread or rate), its start on the loop's clock and how many members
 * it has reached. Nothing is kept per member: no queue, no list of recipients.
 *
 * A send goes out in steps on a fixed grid from its start, at least PACE_STEP_MS apart
 * (step_of). lmw_poll wakes for each step (lmw__paced_wait_ms) and takes it in C
 * (lmw__paced_advance), without a turn of the Python loop unless one is due anyway. Each
 * step works out the quota the pace allows by the end of the interval it opens and scans
 * the slot table from the cursor, in fd order, sending to each member it finds until the
 * quota is met. A member is judged when the cursor reaches it, so:
 *   - a member that leaves (closes, unsubscribes) before the cursor reaches it is skipped;
 *   - a connection that joins (connects, subscribes) during the send gets it when its fd is
 *     ahead of the cursor and below the end fixed at the start (the highest fd in use then),
 *     and not otherwise; either way a connection gets it at most once, since the cursor
 *     passes each fd once.
 * The hub's node lists are only read (is this fd in the topic?), never walked by the
 * cursor, so joins and leaves never invalidate it.
 *
 * With permessage-deflate, the compressed frame is built once too, when the cursor meets the
 * first member that negotiated it (one per window size asked for), and kept with the send.
 *
 * The pace runs on the loop's clock (s->clock_us), which stops while the loop itself is
 * stalled: a stall shifts the rest of a paced send later, it never turns into a burst.
 * A spread send's quota is (members at start) x horizon / spread, a rate send's is
 * rate x horizon, rounded up, where the horizon is the end of the current step's interval
 * (see quota). A send with neither is delivered whole at once (the batch form of
 * send_to_user). Cancelling a send (by its id) or closing the server (lmw_close_all)
 * drops the remainder: the members still ahead of the cursor are counted, never sent to.
 */
#include <stdlib.h>
#include <string.h>

#include "_runtime.h"

#define STACK_FRAME 4096
#define SECOND_US 1000000u

struct lmw_paced {
    struct lmw_paced *next;
    uint64_t id;       /* the caller's id, for lmw_paced_cancel */
    uint64_t key;      /* topic id (TOPIC) */
    uint64_t *users;   /* sorted, distinct user tags (USERS) */
    size_t nusers;     /* entries of users */
    uint64_t start_us; /* loop clock at the first advance; 0: not started */
    uint64_t spread_us;
    double rate;     /* members per second, 0: none */
    double step_us;  /* time between two steps of the send (see step_of) */
    uint64_t total;  /* members when the send started */
    uint64_t done;   /* members reached so far */
    uint32_t cursor; /* next fd to judge */
    uint32_t end;    /* the scan ends before this fd */
    uint8_t to;      /* LMW_PACE_* */
    uint8_t policy;
    uint8_t opcode;
    uint8_t hl;       /* header length of frame: the payload follows it */
    uint8_t tried[8]; /* compressed frame made (or found not worth it) per window class */
    uint8_t *z[8];    /* the compressed frames, NULL: send the plain one */
    size_t zlen[8];
    uint8_t *env; /* with history: the frame for envelope clients (a text frame), or NULL */
    size_t envlen;
    size_t flen;
    uint8_t frame[];
};

/* env_frame builds the text frame of env (the envelope text, issue 12) once for a send. */
static uint8_t *env_frame(const uint8_t *env, size_t len, size_t *flen) {
    uint8_t *f = malloc(len + 10);
    if (!f) return NULL;
    int hl = lmw_build_header(f, 1, LMW_OP_TEXT, len);
    memcpy(f + hl, env, len);
    *flen = (size_t)hl + len;
    return f;
}

/* frame_for gives the frame for sl: compressed when it negotiated permessage-deflate and
 * compression shrinks the message (built on first need, see lmw__deflate_frame). */
static const uint8_t *frame_for(lmw_server *s, lmw_paced *p, const lmw_slot *sl, size_t *len) {
    if (p->env && sl->envelope) { /* the envelope subprotocol: its position with it */
        *len = p->envlen;
        return p->env;
    }
    int cls = lmw__deflate_class(s, sl, p->flen - p->hl);
    if (cls && !p->tried[cls - 1]) {
        p->tried[cls - 1] = 1;
        p->z[cls - 1] = lmw__deflate_frame(s, cls, p->opcode, p->frame + p->hl, p->flen - p->hl,
                                           NULL, &p->zlen[cls - 1]);
    }
    if (cls && p->z[cls - 1]) {
        *len = p->zlen[cls - 1];
        return p->z[cls - 1];
    }
    *len = p->flen;
    return p->frame;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int has_user(const lmw_paced *p, uint64_t tag) {
    size_t lo = 0, hi = p->nusers;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (p->users[mid] == tag) return 1;
        if (p->users[mid] < tag)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* in_topic: fd is a member of topic record t (its own short list of memberships). */
static int in_topic(lmw_server *s, const lmw_slot *sl, uint32_t t) {
    for (uint32_t n = sl->first_sub; t && n; n = s->nodes[n].fnext)
        if (s->nodes[n].topic == t) return 1;
    return 0;
}

/* is_member: the connection on fd receives p now (t: p's topic record, looked up once). */
static int is_member(lmw_server *s, const lmw_paced *p, uint32_t fd, uint32_t t) {
    const lmw_slot *sl = &s->slots[fd];
    if (!lmw__may_receive_data(sl->state)) return 0;
    if (p->to == LMW_PACE_TOPIC) return in_topic(s, sl, t);
    if (p->to == LMW_PACE_USERS) return sl->user_tag && has_user(p, sl->user_tag);
    return 1;
}

static uint32_t topic_of(lmw_server *s, const lmw_paced *p) {
    return p->to == LMW_PACE_TOPIC ? lmw__topic_find(s, p->key) : 0;
}

/* members_ahead counts the members between the cursor and the end (the remainder). */
static uint64_t members_ahead(lmw_server *s, const lmw_paced *p) {
    uint32_t t = topic_of(s, p);
    if (p->to == LMW_PACE_TOPIC && !t) return 0;
    uint64_t n = 0;
    for (uint32_t fd = p->cursor; fd < p->end; fd++) n += is_member(s, p, fd, t);
    return n;
}

/* round_up is the smallest whole number at or above x (0 <= x < 2^64), without libm. */
static uint64_t round_up(double x) {
    uint64_t whole = (uint64_t)x;
    return whole + ((double)whole < x);
}

/* step_of is the time between two steps of a send reaching per_s members a second: one
 * member's time when that is longer than PACE_STEP_MS (at most a second), else
 * PACE_STEP_MS. Each step costs a wake-up of the loop, whose caches the rest of the machine
 * has cooled meanwhile, so a step per member would cost a paced send several times the CPU
 * of the same unpaced one; a step's batch shares the warmed caches. */
static double step_of(double per_s) {
    double member_us = per_s > 0 ? SECOND_US / per_s : SECOND_US;
    double min_us = PACE_STEP_MS * 1000.0;
    return member_us < min_us ? min_us : member_us > SECOND_US ? SECOND_US : member_us;
}

/* steps_begun is how many steps of p have begun by now (the first at its start). */
static uint64_t steps_begun(const lmw_paced *p, uint64_t now) {
    return (uint64_t)((double)(now - p->start_us) / p->step_us) + 1;
}

/* quota is how many members the pace allows to have been reached by now. Steps fall on a
 * fixed grid from the start (start, start + step, ...), whenever the loop happens to wake,
 * and each step sends the share of the interval it opens: every second of a spread send
 * gets the same number of steps, so the same share, and its first step sends at once. */
static uint64_t quota(const lmw_paced *p, uint64_t now) {
    double horizon_us = (double)steps_begun(p, now) * p->step_us;
    double due;
    if (p->spread_us) {
        if (horizon_us >= (double)p->spread_us) return UINT64_MAX; /* the last step: the rest */
        due = (double)p->total * horizon_us / (double)p->spread_us;
    } else {
        due = p->rate * horizon_us / SECOND_US;
        if (!(p->rate > 0) || !(due < 1e19)) return UINT64_MAX; /* no pace, enormous rates */
    }
    return due > 1e-6 ? round_up(due - 1e-6) : 0; /* a float's rounding never adds a member */
}

/* run sends to members from the cursor on until the quota is met or the scan ends;
 * returns how many took the frame (sent or queued). */
static uint64_t run(lmw_server *s, lmw_paced *p, uint64_t allowed) {
    uint64_t took = 0;
    uint32_t t = topic_of(s, p);
    if (p->to == LMW_PACE_TOPIC && !t) p->cursor = p->end; /* no member left anywhere */
    uint64_t latest = p->to == LMW_PACE_TOPIC   ? p->key
                      : p->to == LMW_PACE_USERS ? 1ull << 63 /* per user, see below */
                                                : UINT64_MAX;
    while (p->cursor < p->end && p->done < allowed) {
        uint32_t fd = p->cursor++;
        if (!is_member(s, p, fd, t)) continue;
        lmw_slot *sl = &s->slots[fd];
        uint64_t key = p->to == LMW_PACE_USERS ? sl->user_tag | latest : latest;
        p->done++;
        size_t flen;
        const uint8_t *frame = frame_for(s, p, sl, &flen);
        took += lmw__conn_send_data(s, (int)fd, sl, frame, flen, NULL, 0, key, p->policy) > 0;
        if (p->to == LMW_PACE_TOPIC && !(t = lmw__topic_find(s, p->key))) p->cursor = p->end;
    }
    return took;
}

static void paced_free(lmw_paced *p) {
    for (int i = 0; i < 8; i++) lmw__deflate_frame_free(NULL, p->z[i]);
    free(p->users);
    free(p->env);
    free(p);
}

/* unlink_paced removes p from the server's list and frees it. */
static void unlink_paced(lmw_server *s, lmw_paced **at) {
    lmw_paced *p = *at;
    *at = p->next;
    paced_free(p);
    s->stats->paced_in_flight--;
}

/* note_rate keeps lmw_stats.paced_rate: members reached per second over the last second. */
static void note_rate(lmw_server *s, uint64_t now) {
    if (!s->paced_window_start_us) s->paced_window_start_us = now;
    uint64_t span = now - s->paced_window_start_us;
    if (span < SECOND_US) return;
    s->stats->paced_rate = s->paced_window_count * SECOND_US / span;
    s->paced_window_count = 0;
    s->paced_window_start_us = now;
}

void lmw__paced_advance(lmw_server *s) {
    uint64_t now = s->clock_us;
    for (lmw_paced **at = &s->paced; *at;) {
        lmw_paced *p = *at;
        if (!p->start_us) p->start_us = now ? now : 1;
        uint64_t before = p->done;
        s->stats->paced_deliveries_total += run(s, p, quota(p, now));
        s->paced_window_count += p->done - before;
        if (p->cursor >= p->end)
            unlink_paced(s, at);
        else
            at = &p->next;
    }
    note_rate(s, now);
}

void lmw__paced_drop_all(lmw_server *s) {
    while (s->paced) {
        s->stats->paced_dropped_total += members_ahead(s, s->paced);
        unlink_paced(s, &s->paced);
    }
}

/* lmw__paced_wait_ms is how long the loop may wait before a paced send's next step is due,
 * or -1 when none is in flight (see step_of and quota). */
int lmw__paced_wait_ms(const lmw_server *s) {
    uint64_t now = s->clock_us;
    int wait = -1;
    for (const lmw_paced *p = s->paced; p; p = p->next) {
        int m = 0; /* not started: at the next turn */
        if (p->start_us) {
            double next_us = (double)p->start_us + (double)steps_begun(p, now) * p->step_us;
            m = next_us > (double)now ? (int)round_up((next_us - (double)now) / 1000.0) : 0;
        }
        if (wait < 0 || m < wait) wait = m;
    }
    return wait;
}

/* paced_new builds the frame once and copies the user set (sorted, without repeats). */
static lmw_paced *paced_new(int opcode, const uint8_t *data, size_t len, const uint64_t *users,
                            size_t nusers) {
    lmw_paced *p = calloc(1, sizeof(lmw_paced) + len + 10);
    if (!p) return NULL;
    int hl = lmw_build_header(p->frame, 1, opcode, len);
    if (len) memcpy(p->frame + hl, data, len);
    p->opcode = (uint8_t)opcode;
    p->hl = (uint8_t)hl;
    p->flen = (size_t)hl + len;
    if (!nusers) return p;
    p->users = malloc(nusers * sizeof(uint64_t));
    if (!p->users) {
        paced_free(p);
        return NULL;
    }
    memcpy(p->users, users, nusers * sizeof(uint64_t));
    qsort(p->users, nusers, sizeof(uint64_t), cmp_u64);
    size_t kept = 0;
    for (size_t i = 0; i < nusers; i++)
        if (!kept || p->users[kept - 1] != p->users[i]) p->users[kept++] = p->users[i];
    p->nusers = kept;
    return p;
}

int64_t lmw_paced_start(lmw_server *s, uint64_t id, int to, uint64_t topic, const uint64_t *users,
                        size_t nusers, int opcode, const uint8_t *data, size_t len, int policy,
                        double spread_s, double rate) {
    return lmw_paced_start_env(s, id, to, topic, users, nusers, opcode, data, len, NULL, 0, policy,
                               spread_s, rate);
}

int64_t lmw_paced_start_env(lmw_server *s, uint64_t id, int to, uint64_t topic,
                            const uint64_t *users, size_t nusers, int opcode, const uint8_t *data,
                            size_t len, const uint8_t *env, size_t env_len, int policy,
                            double spread_s, double rate) {
    if (to != LMW_PACE_TOPIC && to != LMW_PACE_USERS && to != LMW_PACE_ALL) return LMW_ERROR;
    if (!(spread_s >= 0) || !(rate >= 0) || spread_s > 1e7) return LMW_ERROR; /* NaN too */
    lmw_paced *p = paced_new(opcode, data, len, to == LMW_PACE_USERS ? users : NULL,
                             to == LMW_PACE_USERS ? nusers : 0);
    if (!p) return LMW_ERROR;
    if (env && !(p->env = env_frame(env, env_len, &p->envlen))) {
        paced_free(p);
        return LMW_ERROR;
    }
    p->id = id;
    p->to = (uint8_t)to;
    p->key = topic;
    p->policy = (uint8_t)policy;
    p->spread_us = (uint64_t)(spread_s * SECOND_US);
    p->rate = p->spread_us ? 0 : rate;
    pthread_mutex_lock(&s->lock);
    p->end = s->max_fd_seen + 1 < s->nslots ? s->max_fd_seen + 1 : s->nslots;
    p->total = members_ahead(s, p);
    p->step_us = step_of(p->spread_us ? (double)p->total * SECOND_US / (double)p->spread_us : rate);
    int64_t r = (int64_t)p->total;
    int paced = p->spread_us || p->rate > 0;
    if (!paced) {
        r = (int64_t)run(s, p, UINT64_MAX);
        paced_free(p);
    } else if (!p->total) {
        paced_free(p); /* nobody to reach: done at once */
    } else {
        p->next = s->paced;
        s->paced = p;
        s->stats->paced_in_flight++;
    }
    pthread_mutex_unlock(&s->lock);
    if (paced && r > 0) lmw_wake(s); /* the loop starts pacing at its next turn */
    return r;
}

int64_t lmw_paced_cancel(lmw_server *s, uint64_t id) {
    int64_t left = 0;
    pthread_mutex_lock(&s->lock);
    for (lmw_paced **at = &s->paced; *at;) {
        if ((*at)->id != id) {
            at = &(*at)->next;
            continue;
        }
        uint64_t n = members_ahead(s, *at);
        s->stats->paced_cancelled_total += n;
        left += (int64_t)n;
        unlink_paced(s, at);
    }
    pthread_mutex_unlock(&s->lock);
    return left;
}
