/* _hub.c - topic and user membership, and fan-out.
 *
 * A membership is one 20-byte lmw_node in a single array (index 0 means "none"), linked
 * twice: through its topic (doubly, so unsubscribing is O(1)) and through its fd (singly,
 * so a closing connection forgets all its topics without a search). A topic is an
 * lmw_topic record (id, first node, member count) found by its 64-bit id through an
 * open-addressing index; a topic whose last member leaves is freed. Users need no
 * records at all: a bucket array holds fd + 1 of the first connection whose user tag
 * hashes there, and lmw_slot.user_next chains the rest.
 *
 * Fan-out builds the frame once and hands the same bytes to lmw__write for every
 * member: one non-blocking send each, a spill only for what the kernel does not take.
 * Every function here runs with the server lock held (the public ones take it).
 */
#include <stdlib.h>
#include <string.h>

#include "_runtime.h"

#define STACK_FRAME 4096

static uint32_t mix(uint64_t id) {
    id ^= id >> 31;
    id *= 0x9e3779b97f4a7c15ull;
    return (uint32_t)(id >> 32);
}

static uint32_t pow2_at_least(uint32_t n) {
    uint32_t p = 64;
    while (p < n) p <<= 1;
    return p;
}

void lmw__hub_init(lmw_server *s) {
    s->user_mask = pow2_at_least(s->nslots / 2) - 1;
    s->user_buckets = calloc((size_t)s->user_mask + 1, sizeof(uint32_t));
    s->topic_index_mask = 63;
    s->topic_index = calloc(64, sizeof(uint32_t));
    s->nnodes = 1; /* node 0 is "none" */
    s->ntopics = 0;
}

void lmw__hub_free(lmw_server *s) {
    free(s->user_buckets);
    free(s->topic_index);
    free(s->nodes);
    free(s->topics);
}

/* ---------------------------------------------------------------- topic index */

static uint32_t topic_find(lmw_server *s, uint64_t id) {
    if (!s->topic_index) return 0;
    for (uint32_t i = mix(id) & s->topic_index_mask;; i = (i + 1) & s->topic_index_mask) {
        uint32_t t = s->topic_index[i];
        if (!t) return 0;
        if (s->topics[t - 1].id == id) return t;
    }
}

static void index_put(uint32_t *index, uint32_t mask, uint64_t id, uint32_t t) {
    uint32_t i = mix(id) & mask;
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

/* index_remove deletes topic t by backward shifting, so lookups never need tombstones. */
static void index_remove(lmw_server *s, uint32_t t) {
    uint32_t mask = s->topic_index_mask;
    uint32_t i = mix(s->topics[t - 1].id) & mask;
    while (s->topic_index[i] != t) i = (i + 1) & mask;
    for (uint32_t j = (i + 1) & mask; s->topic_index[j]; j = (j + 1) & mask) {
        uint32_t home = mix(s->topics[s->topic_index[j] - 1].id) & mask;
        /* move j back into the hole i unless its home lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (stays) continue;
        s->topic_index[i] = s->topic_index[j];
        i = j;
    }
    s->topic_index[i] = 0;
}

static uint32_t topic_create(lmw_server *s, uint64_t id) {
    if ((s->topics_live + 1) * 2 > s->topic_index_mask + 1 && index_grow(s) < 0) return 0;
    uint32_t t;
    if (s->free_topic) {
        t = s->free_topic;
        s->free_topic = s->topics[t - 1].head;
    } else {
        if (s->ntopics == s->cap_topics) {
            uint32_t cap = s->cap_topics ? s->cap_topics * 2 : 64;
            lmw_topic *n = realloc(s->topics, sizeof(lmw_topic) * cap);
            if (!n) return 0;
            s->topics = n;
            s->cap_topics = cap;
        }
        t = ++s->ntopics;
    }
    s->topics[t - 1] = (lmw_topic){.id = id, .head = 0, .count = 0};
    index_put(s->topic_index, s->topic_index_mask, id, t);
    s->topics_live++;
    return t;
}

static void topic_release(lmw_server *s, uint32_t t) {
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
    if (s->nnodes >= s->cap_nodes) {
        uint32_t cap = s->cap_nodes ? s->cap_nodes * 2 : 1024;
        lmw_node *n = realloc(s->nodes, sizeof(lmw_node) * cap);
        if (!n) return 0;
        s->nodes = n;
        s->cap_nodes = cap;
    }
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
    uint32_t b = mix(sl->user_tag) & s->user_mask;
    sl->user_next = s->user_buckets[b];
    s->user_buckets[b] = (uint32_t)fd + 1;
}

void lmw__hub_user_remove(lmw_server *s, int fd) {
    lmw_slot *sl = &s->slots[fd];
    if (!sl->user_tag) return;
    uint32_t *at = &s->user_buckets[mix(sl->user_tag) & s->user_mask];
    while (*at && *at != (uint32_t)fd + 1) at = &s->slots[*at - 1].user_next;
    if (*at) *at = sl->user_next;
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
    if (!sl || topic == 0 || (sl->state != ST_OPEN && sl->state != ST_UPGRADE_WAIT)) goto out;
    uint32_t t = topic_find(s, topic);
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
    uint32_t t = topic_find(s, topic);
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
    uint32_t t = topic_find(s, topic);
    uint32_t n = t ? s->topics[t - 1].count : 0;
    pthread_mutex_unlock(&s->lock);
    return n;
}

uint32_t lmw_topic_count(lmw_server *s) {
    pthread_mutex_lock(&s->lock);
    uint32_t n = s->topics_live;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* ---------------------------------------------------------------- fan-out */

/* frame_begin builds the frame once, on the stack when small. */
static uint8_t *frame_begin(uint8_t *stack, int opcode, const uint8_t *data, size_t len,
                            size_t *flen) {
    uint8_t *f = len + 10 <= STACK_FRAME ? stack : malloc(len + 10);
    if (!f) return NULL;
    int hl = lmw_build_header(f, 1, opcode, len);
    if (len) memcpy(f + hl, data, len);
    *flen = (size_t)hl + len;
    return f;
}

static void frame_end(uint8_t *stack, uint8_t *f) {
    if (f != stack) free(f);
}

enum { TO_TOPIC, TO_USER, TO_ALL };

/* fan_out writes one frame, built once, to every member of a topic, every connection of
 * a user, or every open connection; it returns how many took it (sent or queued). */
static int64_t fan_out(lmw_server *s, int to, uint64_t key, int opcode, const uint8_t *data,
                       size_t len, int policy) {
    uint8_t stack[STACK_FRAME];
    size_t flen;
    uint8_t *f = frame_begin(stack, opcode, data, len, &flen);
    if (!f) return LMW_ERROR;
    int64_t sent = 0;
    pthread_mutex_lock(&s->lock);
    if (to == TO_TOPIC) {
        uint32_t t = topic_find(s, key);
        for (uint32_t n = t ? s->topics[t - 1].head : 0, next; n; n = next) {
            next = s->nodes[n].tnext; /* a failed write may free n, never next */
            int fd = (int)s->nodes[n].fd;
            sent += lmw__write_data(s, fd, &s->slots[fd], f, flen, NULL, 0, key, policy) > 0;
        }
    } else if (to == TO_USER) {
        uint64_t latest_key = key | (1ull << 63); /* LATEST per user, apart from topics */
        for (uint32_t at = s->user_buckets[mix(key) & s->user_mask], next; at; at = next) {
            lmw_slot *sl = &s->slots[at - 1];
            next = sl->user_next;
            if (sl->user_tag == key)
                sent += lmw__write_data(s, (int)at - 1, sl, f, flen, NULL, 0, latest_key, policy) > 0;
        }
    } else {
        for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++)
            if (lmw__may_receive_data(s->slots[fd].state))
                sent += lmw__write_data(s, (int)fd, &s->slots[fd], f, flen, NULL, 0, UINT64_MAX,
                                        policy) > 0;
    }
    pthread_mutex_unlock(&s->lock);
    frame_end(stack, f);
    return sent;
}

int64_t lmw_publish(lmw_server *s, uint64_t topic, int opcode, const uint8_t *data, size_t len,
                    int policy) {
    return fan_out(s, TO_TOPIC, topic, opcode, data, len, policy);
}

int64_t lmw_send_user(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data, size_t len,
                      int policy) {
    return user_tag ? fan_out(s, TO_USER, user_tag, opcode, data, len, policy) : 0;
}

int64_t lmw_broadcast(lmw_server *s, int opcode, const uint8_t *data, size_t len, int policy) {
    return fan_out(s, TO_ALL, 0, opcode, data, len, policy);
}
