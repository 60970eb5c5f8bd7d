/* _user_names.c - the names of long str user ids online in this process (issue 12).
 *
 * A str user id that does not fit in the connection's 64-bit tag (more than 9 characters of
 * [0-9A-Za-z_-] and more than 7 bytes of UTF-8: an email, a UUID) is tagged by a keyed hash,
 * which cannot be turned back into the name. So that Connection.user gives hooks the str the
 * Accept gave, this file keeps ONE entry per such user online here: the tag and the name's
 * bytes in one allocation, found by the tag through an open-addressing table of pointers.
 * Nothing is allocated for int ids or short str ids, and the table itself exists only while
 * some entry does.
 *
 * Lifetime. An entry lives while the hub holds a connection tagged with it, or while someone
 * holds it explicitly: Python holds the name from just before an upgrade is accepted (so the
 * hub join finds it) until the accept returned, and _conn.c holds it for each closed event it
 * records (so on_close still sees the name), until Python has handled that event. Wherever a
 * connection leaves its user's hub chain (_conn.c freeing a slot, lmw_set_user retagging one)
 * lmw__user_name_left drops the entry unless it is held or the hub's own chain still has a
 * connection of the user: membership is read from the hub, never from a second count that
 * could drift, so a name can neither outlive its user here nor miss it while it is online.
 *
 * Every function here runs with the server lock held (the public ones take it).
 */
#include <stdlib.h>
#include <string.h>

#include "_runtime.h"

typedef struct lmw_user_name_entry {
    uint64_t tag;
    uint32_t holds; /* explicit holds (accepts in progress, closed events not handled) */
    uint32_t len;
    uint8_t bytes[]; /* the name's UTF-8, not terminated */
} name_entry;

#define FIRST_SIZE 16 /* table slots when the first entry arrives */

static size_t entry_bytes(const name_entry *e) { return sizeof(*e) + e->len; }

static void count(lmw_server *s, int64_t entries, int64_t bytes) {
    s->stats->user_names += (uint64_t)entries;
    s->stats->user_name_bytes += (uint64_t)bytes;
}

static uint32_t find(lmw_server *s, uint64_t tag) {
    if (!s->user_names) return UINT32_MAX;
    for (uint32_t i = lmw__mix(tag) & s->user_names_mask;; i = (i + 1) & s->user_names_mask) {
        name_entry *e = s->user_names[i];
        if (!e) return UINT32_MAX;
        if (e->tag == tag) return i;
    }
}

static void put(name_entry **table, uint32_t mask, name_entry *e) {
    uint32_t i = lmw__mix(e->tag) & mask;
    while (table[i]) i = (i + 1) & mask;
    table[i] = e;
}

/* resize makes the table size slots (a power of two), or frees it for size 0. */
static int resize(lmw_server *s, uint32_t size) {
    name_entry **table = size ? calloc(size, sizeof(*table)) : NULL;
    if (size && !table) return -1;
    uint32_t old = s->user_names ? s->user_names_mask + 1 : 0;
    for (uint32_t i = 0; i < old; i++)
        if (s->user_names[i]) put(table, size - 1, s->user_names[i]);
    free(s->user_names);
    count(s, 0, ((int64_t)size - old) * (int64_t)sizeof(*table));
    s->user_names = table;
    s->user_names_mask = size ? size - 1 : 0;
    return 0;
}

static int used(void *ctx, uint32_t i) { return ((lmw_server *)ctx)->user_names[i] != NULL; }

static uint32_t home(void *ctx, uint32_t i) {
    lmw_server *s = ctx;
    return lmw__mix(s->user_names[i]->tag) & s->user_names_mask;
}

static void move(void *ctx, uint32_t to, uint32_t from) {
    lmw_server *s = ctx;
    s->user_names[to] = s->user_names[from];
}

static void clear(void *ctx, uint32_t i) { ((lmw_server *)ctx)->user_names[i] = NULL; }

static void remove_at(lmw_server *s, uint32_t i) {
    name_entry *e = s->user_names[i];
    count(s, -1, -(int64_t)entry_bytes(e));
    free(e);
    lmw_open_table table = {s->user_names_mask, s, used, home, move, clear};
    lmw__shift_delete(&table, i);
    if (--s->user_names_live == 0) resize(s, 0); /* nothing is kept while no long id is online */
}

static int in_hub(lmw_server *s, uint64_t tag) {
    for (uint32_t at = s->user_buckets[lmw__mix(tag) & s->user_mask]; at;
         at = s->slots[at - 1].user_next)
        if (s->slots[at - 1].user_tag == tag) return 1;
    return 0;
}

static void drop_if_unused(lmw_server *s, uint32_t i) {
    name_entry *e = s->user_names[i];
    if (!e->holds && !in_hub(s, e->tag)) remove_at(s, i);
}

static int add(lmw_server *s, uint64_t tag, const uint8_t *name, size_t len) {
    /* at most 3/4 full (linear probing stays short): 11-21 bytes of table per entry */
    if ((s->user_names_live + 1) * 4 > (s->user_names ? s->user_names_mask + 1 : 0) * 3 &&
        resize(s, s->user_names ? (s->user_names_mask + 1) * 2 : FIRST_SIZE) < 0)
        return -1;
    name_entry *e = malloc(sizeof(*e) + len);
    if (!e) {
        if (!s->user_names_live) resize(s, 0);
        return -1;
    }
    *e = (name_entry){.tag = tag, .holds = 1, .len = (uint32_t)len};
    memcpy(e->bytes, name, len);
    put(s->user_names, s->user_names_mask, e);
    s->user_names_live++;
    count(s, 1, (int64_t)entry_bytes(e));
    return 0;
}

/* ---------------------------------------------------------------- internal */

void lmw__user_name_left(lmw_server *s, uint64_t tag) {
    uint32_t i = lmw__is_long_user_tag(tag) ? find(s, tag) : UINT32_MAX;
    if (i != UINT32_MAX) drop_if_unused(s, i);
}

int lmw__user_name_hold(lmw_server *s, uint64_t tag) {
    uint32_t i = lmw__is_long_user_tag(tag) ? find(s, tag) : UINT32_MAX;
    if (i == UINT32_MAX) return 0;
    s->user_names[i]->holds++;
    return 1;
}

void lmw__user_names_free(lmw_server *s) {
    for (uint32_t i = 0; s->user_names && i <= s->user_names_mask; i++)
        if (s->user_names[i]) { /* held ones too: closed events nobody will handle now */
            count(s, -1, -(int64_t)entry_bytes(s->user_names[i]));
            free(s->user_names[i]);
            s->user_names[i] = NULL; /* resize must find nothing left to move */
        }
    s->user_names_live = 0;
    resize(s, 0);
}

/* ---------------------------------------------------------------- public API */

int lmw_user_name_hold(lmw_server *s, uint64_t tag, const uint8_t *name, size_t len) {
    if (!lmw__is_long_user_tag(tag) || !len || len > LMW_USER_NAME_MAX) return LMW_ERROR;
    int r = 0;
    pthread_mutex_lock(&s->lock);
    uint32_t i = find(s, tag);
    if (i != UINT32_MAX)
        s->user_names[i]->holds++; /* the same user (or, once in 2**62, a hash twin) */
    else if (add(s, tag, name, len) < 0)
        r = LMW_ERROR;
    pthread_mutex_unlock(&s->lock);
    return r;
}

void lmw_user_name_release(lmw_server *s, uint64_t tag) {
    pthread_mutex_lock(&s->lock);
    uint32_t i = lmw__is_long_user_tag(tag) ? find(s, tag) : UINT32_MAX;
    if (i != UINT32_MAX && s->user_names[i]->holds) {
        s->user_names[i]->holds--;
        drop_if_unused(s, i);
    }
    pthread_mutex_unlock(&s->lock);
}

int lmw_user_name(lmw_server *s, uint64_t tag, uint8_t *out, size_t cap) {
    int n = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    uint32_t i = find(s, tag);
    if (i != UINT32_MAX && s->user_names[i]->len <= cap) {
        name_entry *e = s->user_names[i];
        memcpy(out, e->bytes, e->len);
        n = (int)e->len;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}
