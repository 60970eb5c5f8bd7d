/* _hub.c - topic and user membership (fan-out over it is _fanout.c).
 *
 * A membership is one 20-byte lmw_node in a single array (index 0 means "none"), linked
 * twice: through its topic (doubly, so unsubscribing is O(1)) and through its fd (singly,
 * so a closing connection forgets all its topics without a search). A topic is an
 * lmw_topic record (id, first node, member count) found by its 64-bit id through an
 * open-addressing index; a topic whose last member leaves is freed. Users need no
 * records at all: a bucket array holds fd + 1 of the first connection whose user tag
 * hashes there, and lmw_slot.user_next chains the rest.
 *
 * Storage only: nothing here writes to a socket or changes a connection's state. Every
 * function here runs with the server lock held (the public ones take it).
 */
#include <stdlib.h>
#include <string.h>

#include "_runtime.h"

uint32_t lmw__mix(uint64_t id) {
    id ^= id >> 31;
    id *= 0x9e3779b97f4a7c15ull;
    return (uint32_t)(id >> 32);
}

static uint32_t pow2_at_least(uint32_t n) {
    uint32_t p = 64;
    while (p < n) p <<= 1;
    return p;
}

int lmw__hub_init(lmw_server *s) {
    s->user_mask = pow2_at_least(s->nslots / 2) - 1;
    s->user_buckets = calloc((size_t)s->user_mask + 1, sizeof(uint32_t));
    s->topic_index_mask = 63;
    s->topic_index = calloc(64, sizeof(uint32_t));
    /* One membership per connection fits without growing: calloc'd, so only the nodes in
     * use touch memory (like the slot table). Growing by realloc would copy the array and,
     * when the allocator serves it from the heap, leave the old copy resident: up to ~16 B
     * per idle connection depending on the process's allocation history (measured). */
    s->cap_nodes = pow2_at_least(s->nslots);
    s->nodes = calloc(s->cap_nodes, sizeof(lmw_node));
    s->nnodes = 1; /* node 0 is "none" */
    s->ntopics = 0;
    int interest = lmw__interest_init(s);
    return s->user_buckets && s->topic_index && s->nodes && interest == 0 ? 0 : -1;
}

void lmw__hub_free(lmw_server *s) {
    free(s->user_buckets);
    free(s->topic_index);
    free(s->nodes);
    free(s->topics);
    lmw__interest_free(s);
}

/* ---------------------------------------------------------------- topic index */

uint32_t lmw__topic_find(lmw_server *s, uint64_t id) {
    if (!s->topic_index) return 0;
    for (uint32_t i = lmw__mix(id) & s->topic_index_mask;; i = (i + 1) & s->topic_index_mask) {
        uint32_t t = s->topic_index[i];
        if (!t) return 0;
        if (s->topics[t - 1].id == id) return t;
    }
}

static void index_put(uint32_t *index, uint32_t mask, uint64_t id, uint32_t t) {
    uint32_t i = lmw__mix(id) & mask;
    while (index[i]) i = (i + 1) & mask;
    index[i] = t;
}

static int index_grow(lmw_server *s) {
    uint32_t size = (s->topic_index_mask + 1) * 2;
    uint32_t *n = calloc(size, sizeof(uint32_t));
    if (!n) return -1;
    for (uint32_t i = 0; i <= s->topic_index_mask; i++) {
        uint32_t t = s->topic_index[i];
        if (t) index_put(n, size - 1, s->topics[t - 1].id, t);
    }
    free(s->topic_index);
    s->topic_index = n;
    s->topic_index_mask = size - 1;
    return 0;
}

static int index_used(void *ctx, uint32_t i) { return ((lmw_server *)ctx)->topic_index[i] != 0; }

static uint32_t index_home(void *ctx, uint32_t i) {
    lmw_server *s = ctx;
    return lmw__mix(s->topics[s->topic_index[i] - 1].id) & s->topic_index_mask;
}

static void index_move(void *ctx, uint32_t to, uint32_t from) {
    lmw_server *s = ctx;
    s->topic_index[to] = s->topic_index[from];
}

static void index_clear(void *ctx, uint32_t i) { ((lmw_server *)ctx)->topic_index[i] = 0; }

/* index_remove deletes topic t from the index (lmw__shift_delete: no tombstones). */
static void index_remove(lmw_server *s, uint32_t t) {
    uint32_t mask = s->topic_index_mask;
    uint32_t i = lmw__mix(s->topics[t - 1].id) & mask;
    while (s->topic_index[i] != t) i = (i + 1) & mask;
    lmw_open_table table = {mask, s, index_used, index_home, index_move, index_clear};
    lmw__shift_delete(&table, i);
}

static uint32_t topic_create(lmw_server *s, uint64_t id) {
    if ((s->topics_live + 1) * 2 > s->topic_index_mask + 1 && index_grow(s) < 0) return 0;
    uint32_t t;
    if (s->free_topic) {
        t = s->free_topic;
        s->free_topic = s->topics[t - 1].head;
    } else {
        if (lmw__grow((void **)&s->topics, &s->cap_topics, s->ntopics + 1, sizeof(lmw_topic)) < 0)
            return 0;
        t = ++s->ntopics;
    }
    s->topics[t - 1] = (lmw_topic){.id = id, .head = 0, .count = 0};
    index_put(s->topic_index, s->topic_index_mask, id, t);
    s->topics_live++;
    lmw__interest_topic(s, id, +1);
    return t;
}

static void topic_release(lmw_server *s, uint32_t t) {
    lmw__interest_topic(s, s->topics[t - 1].id, -1);
    index_remove(s, t);
    s->topics[t - 1].id = 0;
    s->topics[t - 1].head = s->free_topic;
    s->free_topic = t;
    s->topics_live--;
}

/* ---------------------------------------------------------------- nodes */

static uint32_t node_alloc(lmw_server *s) {
    if (s->free_node) {
        uint32_t n = s->free_node;
        s->free_node = s->nodes[n].fnext;
        return n;
    }
    if (lmw__grow((void **)&s->nodes, &s->cap_nodes, s->nnodes + 1, sizeof(lmw_node)) < 0) return 0;
    return s->nnodes++;
}

/* unlink_from_topic removes node n from its topic's list, freeing an empty topic. */
static void unlink_from_topic(lmw_server *s, uint32_t n) {
    lmw_node *node = &s->nodes[n];
    lmw_topic *t = &s->topics[node->topic - 1];
    if (node->tprev)
        s->nodes[node->tprev].tnext = node->tnext;
    else
        t->head = node->tnext;
    if (node->tnext) s->nodes[node->tnext].tprev = node->tprev;
    if (--t->count == 0) topic_release(s, node->topic);
}

static void node_free(lmw_server *s, uint32_t n) {
    s->nodes[n].fnext = s->free_node;
    s->nodes[n].fd = UINT32_MAX;
    s->free_node = n;
}

/* ---------------------------------------------------------------- users */

void lmw__hub_user_add(lmw_server *s, int fd) {
    lmw_slot *sl = &s->slots[fd];
    uint32_t b = lmw__mix(sl->user_tag) & s->user_mask;
    sl->user_next = s->user_buckets[b];
    s->user_buckets[b] = (uint32_t)fd + 1;
    lmw__interest_user(s, sl->user_tag, +1);
}

void lmw__hub_user_remove(lmw_server *s, int fd) {
    lmw_slot *sl = &s->slots[fd];
    if (!sl->user_tag) return;
    uint32_t *at = &s->user_buckets[lmw__mix(sl->user_tag) & s->user_mask];
    while (*at && *at != (uint32_t)fd + 1) at = &s->slots[*at - 1].user_next;
    if (*at) {
        *at = sl->user_next;
        lmw__interest_user(s, sl->user_tag, -1);
    }
    sl->user_next = 0;
}

void lmw__hub_forget(lmw_server *s, int fd) {
    lmw_slot *sl = &s->slots[fd];
    for (uint32_t n = sl->first_sub, next; n; n = next) {
        next = s->nodes[n].fnext;
        unlink_from_topic(s, n);
        node_free(s, n);
    }
    sl->first_sub = 0;
    lmw__hub_user_remove(s, fd);
}

/* ---------------------------------------------------------------- membership API */

int lmw_subscribe(lmw_server *s, int fd, uint32_t gen, uint64_t topic) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (!sl || topic == 0 || !lmw__may_subscribe(sl->state)) goto out;
    uint32_t t = lmw__topic_find(s, topic);
    for (uint32_t n = sl->first_sub; t && n; n = s->nodes[n].fnext)
        if (s->nodes[n].topic == t) {
            r = 0; /* already a member */
            goto out;
        }
    if (!t && !(t = topic_create(s, topic))) goto out;
    uint32_t n = node_alloc(s);
    if (!n) {
        if (s->topics[t - 1].count == 0) topic_release(s, t);
        goto out;
    }
    lmw_topic *tp = &s->topics[t - 1];
    s->nodes[n] = (lmw_node){
        .fd = (uint32_t)fd, .topic = t, .tnext = tp->head, .tprev = 0, .fnext = sl->first_sub};
    if (tp->head) s->nodes[tp->head].tprev = n;
    tp->head = n;
    tp->count++;
    sl->first_sub = n;
    r = 1;
out:
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_unsubscribe(lmw_server *s, int fd, uint32_t gen, uint64_t topic) {
    int r = LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (!sl) goto out;
    r = 0;
    uint32_t t = lmw__topic_find(s, topic);
    if (!t) goto out;
    for (uint32_t *at = &sl->first_sub; *at; at = &s->nodes[*at].fnext) {
        uint32_t n = *at;
        if (s->nodes[n].topic != t) continue;
        *at = s->nodes[n].fnext;
        unlink_from_topic(s, n);
        node_free(s, n);
        r = 1;
        break;
    }
out:
    pthread_mutex_unlock(&s->lock);
    return r;
}

uint32_t lmw_topic_size(lmw_server *s, uint64_t topic) {
    pthread_mutex_lock(&s->lock);
    uint32_t t = lmw__topic_find(s, topic);
    uint32_t n = t ? s->topics[t - 1].count : 0;
    pthread_mutex_unlock(&s->lock);
    return n;
}

int lmw_is_member(lmw_server *s, int fd, uint32_t gen, uint64_t topic) {
    int r = 0;
    pthread_mutex_lock(&s->lock);
    lmw_slot *sl = lmw__slot(s, fd, gen);
    uint32_t t = sl && topic ? lmw__topic_find(s, topic) : 0;
    for (uint32_t n = t ? sl->first_sub : 0; n; n = s->nodes[n].fnext)
        if (s->nodes[n].topic == t) r = 1;
    pthread_mutex_unlock(&s->lock);
    return r;
}

int lmw_user_held(lmw_server *s, uint64_t user_tag) {
    int held = 0;
    pthread_mutex_lock(&s->lock);
    if (user_tag && s->user_buckets) {
        uint32_t at = s->user_buckets[lmw__mix(user_tag) & s->user_mask];
        for (; at && !held; at = s->slots[at - 1].user_next)
            held = s->slots[at - 1].user_tag == user_tag;
    }
    pthread_mutex_unlock(&s->lock);
    return held;
}
