/* _presence.c - presence and kick by user tag (issue 12): how many connections of a user this
 * server holds, and closing them all.
 *
 * Both walk the user's hub bucket (_hub.c keeps one chain per bucket through
 * lmw_slot.user_next), so they cost a few slots' worth of work and no memory: nothing is
 * recorded per connection beyond the tag the slot already has. The deployment-wide answer
 * (every process and machine) is Python's: it asks every node through the bus.
 */
#include "_runtime.h"

uint32_t lmw_user_count(lmw_server *s, uint64_t user_tag) {
    uint32_t n = 0;
    if (!user_tag) return 0;
    pthread_mutex_lock(&s->lock);
    for (uint32_t at = s->user_buckets[lmw__mix(user_tag) & s->user_mask]; at;) {
        lmw_slot *sl = &s->slots[at - 1];
        if (sl->user_tag == user_tag && lmw__may_receive_data(sl->state)) n++;
        at = sl->user_next;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

int64_t lmw_close_user(lmw_server *s, uint64_t user_tag, int code, const uint8_t *reason,
                       size_t reason_len) {
    int64_t n = 0;
    if (!user_tag || !lmw_close_code_valid(code) || reason_len > LMW_CLOSE_REASON_MAX)
        return LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    for (uint32_t at = s->user_buckets[lmw__mix(user_tag) & s->user_mask], next; at; at = next) {
        lmw_slot *sl = &s->slots[at - 1];
        next = sl->user_next; /* a failed close frees the slot (and unlinks it), never next */
        /* DEFERRED: the client's own close is already being answered */
        if (sl->user_tag != user_tag || sl->state != ST_OPEN) continue;
        lmw__conn_close(s, (int)at - 1, sl, code, reason, reason_len);
        n++;
    }
    pthread_mutex_unlock(&s->lock);
    if (n) lmw_wake(s); /* the loop flushes the close frames and starts their deadlines */
    return n;
}
