/* _interest.c - local members per routing partition (issue 15).
 *
 * A bus between machines publishes each envelope on the channel of its partition and a
 * node subscribes only to the partitions it has members in. This file keeps what that
 * needs: two fixed arrays of LMW_PARTITIONS counters (connections per user partition,
 * live topics per topic partition), so the cost is per server, never per connection.
 * When a counter goes 0 -> 1 or 1 -> 0 the server writes one byte to the watcher's fd;
 * the bus then reads the whole picture with lmw_interest and subscribes or (after a
 * grace) unsubscribes. Transitions are rare next to joins and leaves, so the write costs
 * nothing on the common path.
 *
 * Every function here runs with the server lock held (the public ones take it).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_runtime.h"

uint32_t lmw_user_partition(uint64_t user_tag) {
    /* splitmix64's finaliser: every bit of the tag moves the partition, so tags handed out
     * in sequence spread evenly. Python and Lua callers reach it through lowmemws._routing. */
    uint64_t x = user_tag;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (uint32_t)(x & (LMW_PARTITIONS - 1));
}

int lmw__interest_init(lmw_server *s) {
    s->interest_fd = -1;
    s->partition_users = calloc(LMW_PARTITIONS, sizeof(uint32_t));
    s->partition_topics = calloc(LMW_PARTITIONS, sizeof(uint32_t));
    return s->partition_users && s->partition_topics ? 0 : -1;
}

void lmw__interest_free(lmw_server *s) {
    free(s->partition_users);
    free(s->partition_topics);
}

static void changed(lmw_server *s) {
    if (s->interest_fd < 0) return;
    ssize_t r;
    do r = write(s->interest_fd, "!", 1);
    while (r < 0 && errno == EINTR); /* EAGAIN: a wake-up is pending already */
}

static void count(lmw_server *s, uint32_t *counters, uint32_t p, int delta) {
    if (delta > 0 ? counters[p]++ == 0 : --counters[p] == 0) changed(s);
}

void lmw__interest_user(lmw_server *s, uint64_t user_tag, int delta) {
    count(s, s->partition_users, lmw_user_partition(user_tag), delta);
}

void lmw__interest_topic(lmw_server *s, uint64_t topic, int delta) {
    count(s, s->partition_topics, (uint32_t)(topic & (LMW_PARTITIONS - 1)), delta);
}

void lmw_interest_watch(lmw_server *s, int fd) {
    pthread_mutex_lock(&s->lock);
    s->interest_fd = fd;
    pthread_mutex_unlock(&s->lock);
}

static void bits(const uint32_t *counters, uint8_t *out) {
    memset(out, 0, LMW_PARTITIONS / 8);
    for (uint32_t p = 0; p < LMW_PARTITIONS; p++)
        if (counters[p]) out[p / 8] |= (uint8_t)(1u << (p % 8));
}

void lmw_interest(lmw_server *s, uint8_t *users, uint8_t *topics) {
    pthread_mutex_lock(&s->lock);
    bits(s->partition_users, users);
    bits(s->partition_topics, topics);
    pthread_mutex_unlock(&s->lock);
}
