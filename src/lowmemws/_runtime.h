/* _runtime.h - private structures and functions shared by the runtime's files (their
 * layers are listed above the declarations at the end). Not part of the cffi interface.
 *
 * Per-connection state has one home: lmw_slot, indexed by fd, 32 bytes. Everything
 * else a connection may need (pending input, a message being assembled, pending output)
 * lives in an lmw_ext that exists only while it is needed, so an idle connection costs
 * its slot, its hub entries and nothing else in user space.
 */
#ifndef LMW_RUNTIME_H
#define LMW_RUNTIME_H

#include <pthread.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <string.h>

#include "_tls.h"
#include "lmw.h"

/* Slot states. The state machine is written down, and made, in _conn.c. */
enum {
    ST_FREE = 0,
    ST_HEAD,           /* reading the request head */
    ST_HTTP_BODY,      /* reading a plain HTTP request body */
    ST_UPGRADE_WAIT,   /* UPGRADE event handed to Python, not answered yet */
    ST_HTTP_WAIT,      /* HTTP event handed to Python, not answered yet */
    ST_OPEN,           /* WebSocket open */
    ST_CLOSING,        /* our close frame sent; waiting for the peer's close */
    ST_LINGER,         /* we are done; output flushing, then discard input until EOF */
    ST_DEFERRED,       /* open, input stopped: a close waits until Python has answered
                          the messages read just before it (see defer_end) */
    ST_UPGRADE_PARKED, /* UPGRADE_WAIT kept past its batch (lmw_park): an off-loop hook
                          decides; not read, only a hang-up is watched for */
    ST_HTTP_PARKED,    /* HTTP_WAIT kept past its batch (lmw_park) */
};

/* The questions asked of a state, each answered once (the table is in _conn.c). */

/* lmw__is_handshake_state: a request head is being read or answered (counted in
 * lmw_stats.handshakes). */
static inline int lmw__is_handshake_state(uint8_t st) {
    return st == ST_HEAD || st == ST_HTTP_BODY || st == ST_UPGRADE_WAIT || st == ST_HTTP_WAIT ||
           st == ST_UPGRADE_PARKED || st == ST_HTTP_PARKED;
}

/* lmw__is_parked_state: a request waits for an off-loop hook's answer (lmw_park); its socket
 * is not read (input waits in the kernel), only watched for a hang-up. */
static inline int lmw__is_parked_state(uint8_t st) {
    return st == ST_UPGRADE_PARKED || st == ST_HTTP_PARKED;
}

/* lmw__awaits_upgrade_answer: an upgrade handed to Python, answered by lmw_upgrade_accept or
 * lmw_reject. */
static inline int lmw__awaits_upgrade_answer(uint8_t st) {
    return st == ST_UPGRADE_WAIT || st == ST_UPGRADE_PARKED;
}

/* lmw__awaits_http_answer: a plain HTTP request handed to Python, answered by lmw_respond or
 * lmw_reject. */
static inline int lmw__awaits_http_answer(uint8_t st) {
    return st == ST_HTTP_WAIT || st == ST_HTTP_PARKED;
}

/* lmw__is_open_state: a WebSocket connection whose frames may still arrive. */
static inline int lmw__is_open_state(uint8_t st) {
    return st == ST_OPEN || st == ST_CLOSING || st == ST_DEFERRED;
}

/* lmw__may_receive_data: data frames (sends, publishes, broadcasts) may be written. A
 * DEFERRED connection is still open: its close waits for Python's replies to go first. */
static inline int lmw__may_receive_data(uint8_t st) { return st == ST_OPEN || st == ST_DEFERRED; }

/* lmw__may_subscribe: topic membership may be added (before the 101 too, for Accept). */
static inline int lmw__may_subscribe(uint8_t st) {
    return lmw__may_receive_data(st) || lmw__awaits_upgrade_answer(st);
}

/* What a deferred connection does at the next lmw_poll. */
enum { DEFER_FAIL = 1, DEFER_CLOSE_REPLY = 2 };

typedef struct {
    int fd;
    uint32_t gen;
    uint16_t code;
    uint8_t what;
} lmw_deferred;

/* Slot flags. */
enum {
    F_WANT_OUT = 1 << 0,   /* EPOLLOUT armed */
    F_PAUSED = 1 << 1,     /* EPOLLIN removed by lmw_pause_reading */
    F_BUDGET = 1 << 2,     /* EPOLLIN removed while the spill budget is short */
    F_PING_OUT = 1 << 3,   /* a heartbeat ping is unanswered */
    F_CLOSE_SENT = 1 << 4, /* our close frame is queued or sent */
    F_SHUT_WR = 1 << 5,    /* shutdown(SHUT_WR) once output drains */
    F_BACKLOG = 1 << 6,    /* unparsed input waits in ext->in (event array was full) */
    F_EPOLL_IN = 1 << 7,   /* EPOLLIN currently in the interest set */
};

/* Loop lag (issue 17): a poll cycle that kept the loop away from epoll for longer than
 * LAG_GRACE_US (Python work between polls, or epoll_wait returning late because the
 * process was stopped or starved) does not advance the clock deadlines are judged by,
 * beyond the grace; accepting slows down while the last cycle lagged past LAG_SLOW_US. */
#define LAG_GRACE_US 100000u
#define LAG_SLOW_US 250000u
#define LAG_WINDOW_TICKS 100u /* the lag gauge covers about the last 10 s */

/* The loop's clock counts ticks of TICK_MS (lmw_slot.tick, lmw_server.now); every deadline
 * is judged in whole ticks by the sweep (_server.c), which runs only when one falls due. */
#define TICK_MS 100u
#define NO_SWEEP UINT32_MAX /* lmw_server.sweep_at: no deadline pending anywhere */

/* lmw__ticks is ms rounded up to whole ticks. */
static inline uint32_t lmw__ticks(uint32_t ms) {
    return (uint32_t)(((uint64_t)ms + TICK_MS - 1) / TICK_MS);
}

typedef struct lmw_paced lmw_paced; /* one paced send: _paced.c */

typedef struct lmw_slot {
    uint32_t gen;        /* bumped when the fd is freed: stale handles never match */
    uint8_t state : 4;   /* ST_* */
    uint8_t deflate : 4; /* permessage-deflate: 0 off, else server window bits - 7 (_deflate.c) */
    uint8_t flags;
    uint16_t close_code : 15; /* close code received or sent, for the CLOSED event */
    uint16_t envelope : 1;    /* the client chose LMW_ENVELOPE_PROTOCOL: data goes enveloped */
    uint32_t tick;            /* last activity, in ticks of 100 ms */
    uint32_t first_sub;       /* hub: first membership node of this fd, 0 = none */
    uint64_t user_tag;        /* 0 = none */
    uint32_t user_next;       /* hub: next fd + 1 in the same user bucket, 0 = end */
    uint32_t ext;             /* index + 1 into the ext table, 0 = none */
} lmw_slot;

_Static_assert(sizeof(lmw_slot) == 32, "an idle connection costs its 32-byte slot");

/* Sec-WebSocket-Key: base64 of 16 bytes (the parser refuses any other, RFC 6455 4.1). */
#define WS_KEY_LEN 24

/* lmw_out.control: bit 0 a control frame; OUT_SEALED: bytes for the wire as they are (TLS
 * records already sealed, or handshake bytes); bits 2-3 the TLS_OUT_* kind of a queued TLS
 * record still in plaintext (sealed when it reaches the head of the queue). */
#define OUT_CONTROL 1
#define OUT_SEALED 2
#define OUT_KIND_SHIFT 2

/* One pending output frame (or the rest of one). */
typedef struct lmw_out {
    struct lmw_out *next;
    uint64_t topic; /* for the LATEST policy, 0 otherwise */
    uint64_t len;
    uint64_t sent;
    uint8_t control;
    uint8_t data[];
} lmw_out;

typedef struct lmw_ext {
    /* pending input: an incomplete head, body or frame. The spill holds what has arrived
     * (in_len) in an allocation of in_cap; in_want is the size of the whole head + body or
     * frame once known (0: not known yet), so a large one grows as its bytes arrive and
     * the budget is charged for bytes received, never for a declared length. */
    uint8_t *in;
    uint64_t in_len;
    uint64_t in_cap;
    uint64_t in_want;
    uint64_t in_checked;    /* payload bytes of the pending frame already unmasked+checked */
    uint8_t in_frame_begun; /* the pending frame's header was checked on an earlier read */
    uint32_t head_scanned;  /* lmw_request.scanned for a partial head */
    uint32_t partial_since; /* tick a message was first seen incomplete by the sweep, 0: none */
    /* a fragmented message being assembled */
    uint8_t *msg;
    uint64_t msg_len;
    uint64_t msg_cap;
    lmw_message_state ms;
    /* pending output */
    lmw_out *out_head;
    lmw_out *out_tail;
    uint64_t out_bytes;
    /* a parked upgrade's Sec-WebSocket-Key, for its 101 (the read buffer it came in is
     * returned at the next poll) */
    uint8_t parked_key[WS_KEY_LEN];
    uint8_t parked_key_len;
    uint8_t parked_pmd; /* its lmw_pmd_negotiate result */
} lmw_ext;

/* An upgrade handed to Python: the key still points into this batch's read buffer. */
typedef struct lmw_upgrade_pending {
    int fd;
    uint32_t gen;
    const uint8_t *key;
    uint32_t key_len;
    int pmd; /* lmw_pmd_negotiate result for its offers, 0: none accepted */
} lmw_upgrade_pending;

/* What of a partly received frame was handled on an earlier read: its header checked
 * (begun) and the first `checked` payload bytes unmasked and validated. */
typedef struct {
    uint64_t checked;
    uint8_t begun;
} lmw_progress;

/* Pending input taken out of a connection's ext (lent until the next lmw_poll). */
typedef struct {
    uint8_t *buf;
    uint64_t len;
    lmw_progress progress;
} lmw_pending;

/* One client address of the per-address cap and its connections + handshakes. */
typedef struct lmw_peer {
    uint64_t hi, lo;
    uint32_t count;
    uint32_t pad;
} lmw_peer;

typedef struct {
    uint64_t id;
    uint32_t head; /* first node, 0 = none */
    uint32_t count;
} lmw_topic;

typedef struct {
    uint32_t fd;
    uint32_t topic; /* index into topics */
    uint32_t tnext, tprev;
    uint32_t fnext; /* next node of the same fd; free-list link when free */
} lmw_node;

struct lmw_server {
    pthread_mutex_t lock;
    lmw_config cfg;
    lmw_stats *stats;
    lmw_stats own_stats;
    int epfd;
    int wakefd;
    int listeners[LMW_MAX_LISTENERS];
    int nlisteners;
    int listening; /* listeners in the epoll set */
    int stopped;   /* lmw_listen_stop called */
    /* slots */
    lmw_slot *slots;
    uint32_t nslots; /* table size (RLIMIT_NOFILE) */
    uint32_t max_fd_seen;
    uint32_t now;      /* current tick of the loop's clock (see LAG_GRACE_US) */
    uint32_t sweep_at; /* tick by which the sweep must run (lmw__sweep_by); NO_SWEEP: none */
    int asleep;        /* the loop waits in epoll_wait (lock dropped): see lmw__sweep_by */
    uint64_t clock_us; /* the loop's clock: monotonic time minus lag past the grace */
    uint64_t real_us;  /* monotonic time when clock_us was last advanced */
    int polled;        /* lmw_poll ran before: real_us is when its epoll_wait returned */
    uint64_t lag_us;   /* lag of the latest poll cycle */
    uint64_t lag_window_max, lag_prev_window_max, lag_window_start_us;
    uint32_t live; /* slots in use (any state but FREE): bounded by max_connections */
    /* ext table */
    lmw_ext **exts;
    uint32_t nexts, cap_exts;
    uint32_t *free_exts;
    uint32_t nfree_exts, cap_free_exts;
    /* read buffers: a bump arena over read_buffers pooled blocks */
    uint8_t **pool;
    uint32_t pool_next; /* next block to take */
    uint32_t pool_off;  /* used bytes of the current block */
    /* memory lent to Python until the next poll */
    void **lent;
    uint32_t nlent, cap_lent;
    /* events being filled by the current poll */
    lmw_event *ev;
    int nev, cap_ev;
    int nwork, maxwork; /* UPGRADE/HTTP/MESSAGE events so far, and the cap */
    lmw_request *reqs;  /* request views for this batch's events (cap_reqs >= maxwork) */
    int cap_reqs;
    lmw_upgrade_pending *ups;
    int nups;
    /* CLOSED events made outside lmw_poll (by sends on other threads) wait here */
    lmw_event *closed;
    uint32_t nclosed, cap_closed;
    int emfile;      /* accept4 hit the fd limit: accepting waits for a close */
    int accept_held; /* lmw_accept_hold: Python's hooks are at their cap */
    lmw_deferred *deferred;
    uint32_t ndeferred, cap_deferred;
    /* per-address counts, only when cfg.max_per_ip is set (see _server.c, peers) */
    struct lmw_peer *peers;
    uint32_t peer_mask;
    uint64_t *peer_of_fd;  /* 2 words per fd: the address counted for it */
    uint8_t *peer_counted; /* 1 when fd's address is in the table */
    /* fds with unparsed input (the event array filled up) or paused for budget */
    int *backlog;
    uint32_t nbacklog, cap_backlog;
    int *budget_paused;
    uint32_t nbudget_paused, cap_budget_paused;
    int wake_pending;
    /* hub */
    lmw_node *nodes;
    uint32_t nnodes, cap_nodes, free_node;
    lmw_topic *topics;
    uint32_t ntopics, cap_topics, free_topic;
    uint32_t *topic_index; /* open addressing: topic index + 1, 0 empty */
    uint32_t topic_index_mask;
    uint32_t topics_live;
    uint32_t *user_buckets;
    uint32_t user_mask;
    /* names of long str user ids online here (_user_names.c); NULL while there are none */
    struct lmw_user_name_entry **user_names;
    uint32_t user_names_mask, user_names_live;
    /* interest (_interest.c): local members per routing partition, for the buses */
    uint32_t *partition_users;  /* connections tagged with a user of partition p */
    uint32_t *partition_topics; /* topics of partition p with at least one member */
    int interest_fd;            /* written to when a partition gains or loses all; -1 none */
    /* permessage-deflate (_deflate.c): z_streams, one per server window size and one inflater */
    void *deflaters[8];
    void *inflater;
    uint64_t inflated_lent; /* decompressed messages lent this batch, under the spill budget */
    /* paced sends in flight (_paced.c), and the window of lmw_stats.paced_rate */
    struct lmw_paced *paced;
    uint64_t paced_window_start_us, paced_window_count;
    /* TLS (_tls_conn.c): NULL unless lmw_tls_configure gave the server a certificate */
    struct lmw_tls_server *tls;
};

/* lmw__tls_of is fd's TLS state, NULL for a plain connection (and on a plain server, where
 * this one test is all TLS costs). */
static inline lmw_tls_conn *lmw__tls_of(const lmw_server *s, int fd) {
    return s->tls ? s->tls->conns[fd] : NULL;
}

/* lmw__deflate_class is the window class a message of len bytes to sl is compressed for
 * (permessage-deflate negotiated and len at least deflate_min_size), or 0: sent plain. */
static inline int lmw__deflate_class(const lmw_server *s, const lmw_slot *sl, size_t len) {
    return len >= s->cfg.deflate_min_size ? sl->deflate : 0;
}

/* lmw__deflate_class_of is the window class a negotiation result (lmw_pmd_negotiate) gives
 * a connection: the server window bits asked for (15 when none) - 7; 0 when none accepted. */
/* lmw__is_envelope_protocol: the chosen subprotocol is the envelope one (issue 12). */
static inline uint16_t lmw__is_envelope_protocol(const uint8_t *proto, size_t len) {
    return len == LMW_ENVELOPE_PROTOCOL_LEN && memcmp(proto, "lowmemws.v1", len) == 0;
}

static inline uint8_t lmw__deflate_class_of(int pmd) {
    return pmd ? (uint8_t)(((pmd & 15) ? (pmd & 15) : 15) - 7) : 0;
}

/* lmw_open_table describes an open-addressing table to lmw__shift_delete. */
typedef struct {
    uint32_t mask;
    void *ctx;
    int (*used)(void *ctx, uint32_t i);
    uint32_t (*home)(void *ctx, uint32_t i);
    void (*move)(void *ctx, uint32_t to, uint32_t from);
    void (*clear)(void *ctx, uint32_t i);
} lmw_open_table;

/* Internal functions shared by the runtime files, all called with s->lock held. The files
 * form layers; each calls only the ones below it (no cycles):
 *   _server.c (loop, accept, sweep, the public API)
 *   _fanout.c (one frame to many)   _paced.c (one frame to many, over time)
 *   _input.c  (reading, heads, frames)
 *   _tls_input.c (TLS records to plaintext for _input.c)
 *   _conn.c   (the state machine: every state change)
 *   _user_names.c (names of long str user ids online: reads the hub's user chains)
 *   _output.c (sends and queues)    _hub.c (membership)    _spill.c (read space, spills)
 *   _deflate.c (permessage-deflate: the zlib pool, one message at a time)
 *   _slot.c   (storage: slots, exts, lent memory, the per-address table)
 *   _tls_conn.c (storage: TLS context and per-connection TLS state, sealing; _tls.h)
 */
#define MIN_READ_SPACE 2048
/* _slot.c */
int lmw__grow(void **arr, uint32_t *cap, uint32_t need, size_t elem);
void lmw__lend(lmw_server *s, void *ptr);
lmw_event *lmw__push_event(lmw_server *s);
void lmw__shift_delete(const lmw_open_table *t, uint32_t hole);
lmw_slot *lmw__slot(lmw_server *s, int fd, uint32_t gen);
lmw_ext *lmw__ext_of(lmw_server *s, lmw_slot *sl);
lmw_ext *lmw__ext_get(lmw_server *s, lmw_slot *sl);
void lmw__in_free(lmw_server *s, lmw_ext *x);
void lmw__msg_free(lmw_server *s, lmw_ext *x);
void lmw__ext_drop(lmw_server *s, lmw_slot *sl);
void lmw__ext_trim(lmw_server *s, lmw_slot *sl);
void lmw__set_interest(lmw_server *s, int fd, lmw_slot *sl, int out_changed);
uint32_t lmw__peer_add(lmw_server *s, int fd, const struct sockaddr_storage *ss);
void lmw__peer_remove(lmw_server *s, int fd);
/* _hub.c */
int lmw__hub_init(lmw_server *s);
void lmw__hub_free(lmw_server *s);
uint32_t lmw__mix(uint64_t id);
/* lmw__is_long_user_tag: a str id's tag (top bit) that is a hash, not the name (next bit). */
static inline int lmw__is_long_user_tag(uint64_t tag) { return (tag >> 62) == 2; }
void lmw__user_name_left(lmw_server *s, uint64_t tag);
int lmw__user_name_hold(lmw_server *s, uint64_t tag);
void lmw__user_names_free(lmw_server *s);
uint32_t lmw__topic_find(lmw_server *s, uint64_t id);
void lmw__hub_forget(lmw_server *s, int fd);
void lmw__hub_user_add(lmw_server *s, int fd);
int lmw__interest_init(lmw_server *s);
void lmw__interest_free(lmw_server *s);
void lmw__interest_user(lmw_server *s, uint64_t user_tag, int delta);
void lmw__interest_topic(lmw_server *s, uint64_t topic, int delta);
void lmw__hub_user_remove(lmw_server *s, int fd);
/* _output.c: never frees a connection nor changes its state; -1 means "dead socket" */
int lmw__write_raw(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                   const uint8_t *b, size_t blen, int control, uint64_t topic);
int lmw__write_clear(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                     const uint8_t *b, size_t blen, int control, uint64_t topic);
int lmw__tls_send_alert(lmw_server *s, int fd, lmw_slot *sl, int description);
int lmw__tls_send_key_update(lmw_server *s, int fd, lmw_slot *sl);
int lmw__send_control(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p, size_t n);
int lmw__flush_out(lmw_server *s, int fd, lmw_slot *sl);
void lmw__drop_unsent(lmw_server *s, lmw_ext *x);
int lmw__write_data(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                    const uint8_t *b, size_t blen, uint64_t topic, int policy);
/* _conn.c */
int lmw__conn_accept(lmw_server *s, int fd);
void lmw__conn_await_body(lmw_slot *sl);
void lmw__conn_await_answer(lmw_slot *sl, int upgrade);
int lmw__conn_park(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key, size_t key_len,
                   int pmd);
void lmw__conn_reject(lmw_server *s, int fd, lmw_slot *sl, int status);
void lmw__conn_respond(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *data, size_t len);
int lmw__conn_upgrade(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *key, size_t key_len,
                      const uint8_t *proto, size_t proto_len, uint64_t user_tag, int pmd);
void lmw__conn_close(lmw_server *s, int fd, lmw_slot *sl, int code, const uint8_t *reason,
                     size_t reason_len);
void lmw__conn_fail(lmw_server *s, int fd, int code);
void lmw__conn_abandon(lmw_server *s, int fd, lmw_slot *sl);
void lmw__conn_end(lmw_server *s, int fd, lmw_slot *sl, uint8_t what, int code);
void lmw__conn_run_deferred(lmw_server *s);
void lmw__conn_free(lmw_server *s, int fd, uint16_t code);
int lmw__conn_send_control(lmw_server *s, int fd, lmw_slot *sl, int opcode, const uint8_t *p,
                           size_t n);
int lmw__conn_send_data(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *a, size_t alen,
                        const uint8_t *b, size_t blen, uint64_t topic, int policy);
void lmw__conn_flush(lmw_server *s, int fd, lmw_slot *sl);
void lmw__sweep_by(lmw_server *s, uint32_t at);
/* _deflate.c: permessage-deflate, no state per connection (storage level, like _spill.c) */
#define DEFLATE_STACK 4096
uint8_t *lmw__deflate_frame(lmw_server *s, int cls, int opcode, const uint8_t *data, size_t len,
                            uint8_t *stack, size_t *flen);
void lmw__deflate_frame_free(uint8_t *stack, uint8_t *frame);
int lmw__inflate_message(lmw_server *s, const uint8_t *in, size_t n, int text, const uint8_t **out,
                         uint64_t *out_len);
void lmw__deflate_free(lmw_server *s);
/* _tls_conn.c (storage level: the TLS context, per-connection TLS state, sealing) */
int lmw__tls_start(lmw_server *s, int fd);
void lmw__tls_forget(lmw_server *s, int fd);
void lmw__tls_server_free(lmw_server *s);
int lmw__tls_seal_out(lmw_server *s, lmw_tls_conn *tc, int kind, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t **out, size_t *out_len);
void lmw__tls_scratch_done(lmw_server *s);
int lmw__tls_keep_partial(lmw_server *s, lmw_tls_conn *tc, const uint8_t *p, size_t n);
void lmw__tls_drop_partial(lmw_server *s, lmw_tls_conn *tc);
/* _tls_input.c (below _input.c: records to plaintext for its parsers) */
typedef struct {
    uint8_t *buf;
    uint64_t len;
    lmw_progress done; /* of a frame at buf partly handled on an earlier read */
} lmw_tls_plain;
int lmw__tls_read(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, lmw_tls_plain *out);
void lmw__tls_read_done(lmw_server *s, int fd, uint32_t gen, lmw_tls_conn *tc);
/* _spill.c */
int lmw__take_read_space(lmw_server *s, size_t need, uint8_t **buf, size_t *cap);
void lmw__commit_read_space(lmw_server *s, size_t used);
int lmw__spill_is_large(lmw_server *s, const lmw_ext *x);
int lmw__budget_short(lmw_server *s);
int lmw__spill(lmw_server *s, int fd, lmw_slot *sl, const uint8_t *p, size_t n, uint64_t want);
void lmw__budget_pause(lmw_server *s, int fd, lmw_slot *sl);
void lmw__resume_budget_paused(lmw_server *s);
lmw_pending lmw__take_spill(lmw_server *s, lmw_ext *x);
uint64_t lmw__bytes_waiting(int fd);
enum { GROWN = 1, GROW_WAIT = 0, GROW_NOMEM = -1, GROW_NEVER = -2 }; /* lmw__grow_spill */
int lmw__grow_spill(lmw_server *s, int fd, lmw_slot *sl, lmw_ext *x);
/* _paced.c */
#define PACE_STEP_MS 100 /* a paced send's steps are at least this far apart (_paced.c) */
void lmw__paced_advance(lmw_server *s);
void lmw__paced_drop_all(lmw_server *s);
int lmw__paced_wait_ms(const lmw_server *s);
/* _input.c */
void lmw__run_backlog(lmw_server *s);
void lmw__backlog_add(lmw_server *s, int fd, lmw_slot *sl);
void lmw__process_head(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len);
void lmw__process_frames(lmw_server *s, int fd, lmw_slot *sl, uint8_t *buf, size_t len,
                         lmw_progress done);
void lmw__on_readable(lmw_server *s, int fd, lmw_slot *sl, uint32_t what);

#endif
