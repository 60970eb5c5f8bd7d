/* _fanout.c - one frame to many: a topic's members, a user's connections, everyone.
 *
 * The frame is built once and the same bytes go to every recipient: one non-blocking send
 * each, a queue only for what the kernel does not take, the write bounds and the caller's
 * policy applied per recipient (lmw__conn_send_data). Membership is _hub.c's.
 * With permessage-deflate and no context takeover, a message compresses to the same bytes
 * for every connection of a window size, so its compressed frame is built once too, when
 * the first such recipient is met (one per window size asked for: one with browsers), and
 * sent to every connection that negotiated compression; the plain frame to the others.
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

/* One message to fan out: its plain frame, and its compressed frames by window class
 * (built on first need; NULL with tried set when it is better sent plain). */
typedef struct {
    const uint8_t *plain;
    size_t plain_len;
    int opcode;
    const uint8_t *data;
    size_t len;
    uint8_t *z[8];
    size_t zlen[8];
    uint8_t tried[8];
} fan_msg;

static void fan_msg_free(fan_msg *m) {
    for (int i = 0; i < 8; i++) lmw__deflate_frame_free(NULL, m->z[i]);
}

/* send_one writes the message to fd: compressed when it negotiated permessage-deflate;
 * its envelope form (env, when there is one) when it chose the envelope subprotocol. */
static int send_one(lmw_server *s, fan_msg *m, int fd, lmw_slot *sl, uint64_t key, int policy) {
    if (sl->envelope && m[1].plain)
        m++;
    else if (!m[0].data && m[1].plain)
        return 0; /* a notice for the envelope clients only */
    int cls = lmw__deflate_class(s, sl, m->len);
    if (cls && !m->tried[cls - 1]) {
        m->tried[cls - 1] = 1;
        m->z[cls - 1] =
            lmw__deflate_frame(s, cls, m->opcode, m->data, m->len, NULL, &m->zlen[cls - 1]);
    }
    if (cls && m->z[cls - 1])
        return lmw__conn_send_data(s, fd, sl, m->z[cls - 1], m->zlen[cls - 1], NULL, 0, key,
                                   policy) > 0;
    return lmw__conn_send_data(s, fd, sl, m->plain, m->plain_len, NULL, 0, key, policy) > 0;
}

/* fan_out writes one frame, built once, to every member of a topic, every connection of
 * a user, or every open connection; it returns how many took it (sent or queued). */
static int64_t fan_out(lmw_server *s, int to, uint64_t key, int opcode, const uint8_t *data,
                       size_t len, const uint8_t *env, size_t env_len, int policy) {
    uint8_t stack[STACK_FRAME], env_stack[STACK_FRAME];
    size_t flen, elen = 0;
    uint8_t *f = frame_begin(stack, opcode, data, len, &flen);
    if (!f) return LMW_ERROR;
    uint8_t *e = env ? frame_begin(env_stack, LMW_OP_TEXT, env, env_len, &elen) : NULL;
    if (env && !e) {
        frame_end(stack, f);
        return LMW_ERROR;
    }
    /* m[0]: the raw message; m[1]: its envelope (plain NULL: none, everyone gets m[0]) */
    fan_msg m[2] = {
        {.plain = f, .plain_len = flen, .opcode = opcode, .data = data, .len = len},
        {.plain = e, .plain_len = elen, .opcode = LMW_OP_TEXT, .data = env, .len = env_len}};
    int64_t sent = 0;
    pthread_mutex_lock(&s->lock);
    if (to == TO_TOPIC) {
        uint32_t t = lmw__topic_find(s, key);
        for (uint32_t n = t ? s->topics[t - 1].head : 0, next; n; n = next) {
            next = s->nodes[n].tnext; /* a failed write may free n, never next */
            int fd = (int)s->nodes[n].fd;
            sent += send_one(s, m, fd, &s->slots[fd], key, policy);
        }
    } else if (to == TO_USER) {
        uint64_t latest_key = key | (1ull << 63); /* LATEST per user, apart from topics */
        for (uint32_t at = s->user_buckets[lmw__mix(key) & s->user_mask], next; at; at = next) {
            lmw_slot *sl = &s->slots[at - 1];
            next = sl->user_next;
            if (sl->user_tag == key) sent += send_one(s, m, (int)at - 1, sl, latest_key, policy);
        }
    } else {
        for (uint32_t fd = 0; fd <= s->max_fd_seen && fd < s->nslots; fd++)
            if (lmw__may_receive_data(s->slots[fd].state))
                sent += send_one(s, m, (int)fd, &s->slots[fd], UINT64_MAX, policy);
    }
    pthread_mutex_unlock(&s->lock);
    fan_msg_free(&m[0]);
    fan_msg_free(&m[1]);
    frame_end(stack, f);
    if (e) frame_end(env_stack, e);
    return sent;
}

int64_t lmw_publish(lmw_server *s, uint64_t topic, int opcode, const uint8_t *data, size_t len,
                    int policy) {
    return fan_out(s, TO_TOPIC, topic, opcode, data, len, NULL, 0, policy);
}

int64_t lmw_send_user(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data, size_t len,
                      int policy) {
    return user_tag ? fan_out(s, TO_USER, user_tag, opcode, data, len, NULL, 0, policy) : 0;
}

int64_t lmw_broadcast(lmw_server *s, int opcode, const uint8_t *data, size_t len, int policy) {
    return fan_out(s, TO_ALL, 0, opcode, data, len, NULL, 0, policy);
}

int64_t lmw_publish_env(lmw_server *s, uint64_t topic, int opcode, const uint8_t *data, size_t len,
                        const uint8_t *env, size_t env_len, int policy) {
    return fan_out(s, TO_TOPIC, topic, opcode, data, len, env, env_len, policy);
}

int64_t lmw_send_user_env(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data,
                          size_t len, const uint8_t *env, size_t env_len, int policy) {
    return user_tag ? fan_out(s, TO_USER, user_tag, opcode, data, len, env, env_len, policy) : 0;
}

int64_t lmw_broadcast_env(lmw_server *s, int opcode, const uint8_t *data, size_t len,
                          const uint8_t *env, size_t env_len, int policy) {
    return fan_out(s, TO_ALL, 0, opcode, data, len, env, env_len, policy);
}
