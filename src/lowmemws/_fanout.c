/* _fanout.c - one frame to many: a topic's members, a user's connections, everyone.
 *
 * The frame is built once and the same bytes go to every recipient: one non-blocking send
 * each, a queue only for what the kernel does not take, the write bounds and the caller's
 * policy applied per recipient (lmw__conn_send_data). Membership is _hub.c's.
 */
#include <stdlib.h>
#include <string.h>

#include "_runtime.h"

#define STACK_FRAME 4096

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
        uint32_t t = lmw__topic_find(s, key);
        for (uint32_t n = t ? s->topics[t - 1].head : 0, next; n; n = next) {
            next = s->nodes[n].tnext; /* a failed write may free n, never next */
            int fd = (int)s->nodes[n].fd;
            sent += lmw__conn_send_data(s, fd, &s->slots[fd], f, flen, NULL, 0, key, policy) > 0;
        }
    } else if (to == TO_USER) {
        uint64_t latest_key = key | (1ull << 63); /* LATEST per user, apart from topics */
        for (uint32_t at = s->user_buckets[lmw__mix(key) & s->user_mask], next; at; at = next) {
            lmw_slot *sl = &s->slots[at - 1];
            next = sl->user_next;
            if (sl->user_tag == key)
                sent += lmw__conn_send_data(s, (int)at - 1, sl, f, flen, NULL, 0, latest_key,
                                            policy) > 0;
        }
    } else {
        for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++)
            if (lmw__may_receive_data(s->slots[fd].state))
                sent += lmw__conn_send_data(s, (int)fd, &s->slots[fd], f, flen, NULL, 0, UINT64_MAX,
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
