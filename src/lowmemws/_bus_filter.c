/* _bus_filter.c - the subscriber side of RedisBus drops what this node does not serve,
 * in C (issue 15).
 *
 * With random placement a node holds members in nearly every partition, so nearly every
 * message of the deployment arrives, and most are for users held on another node. Parsing
 * each in hiredis and checking it in Python cost about 2.5 us; here one pass over a whole
 * read (as many messages as the socket had) frames the pushes, checks the origin and the
 * sequence number, peeks at the Envelope's wire header and asks the hub whether the user
 * has a connection here. Only what needs Python comes back: the messages to deliver (as
 * offsets into the read), those this filter does not judge (the answer channel, short
 * ones), and every other reply (subscribe confirmations, PONGs, errors) as a whole frame
 * for hiredis.
 *
 * The framing is bounded: a line (a type byte up to CRLF) longer than LMW_BUS_LINE_MAX, a
 * length outside 0..LMW_BUS_BULK_MAX, or an unknown type byte is a protocol error (the
 * link is dropped, as hiredis would). An incomplete frame is left for the next read.
 *
 * Sequence numbers: one table of (channel, origin) -> last number seen, open addressing,
 * grown up to LMW_BUS_SEQ_MAX entries and cleared when that is reached (every origin is
 * then heard of afresh: no envelope is counted missed or skipped wrongly, the next gap
 * simply goes uncounted). The subscriber thread alone uses a filter: no lock.
 */
#include <stdlib.h>
#include <string.h>

#include "lmw.h"

#define ORIGIN_BYTES 16
#define SEQ_AT ORIGIN_BYTES
#define ENVELOPE_AT (ORIGIN_BYTES + 8) /* origin, sequence number, then Envelope.encode() */
#define KEY_AT (ENVELOPE_AT + 3)       /* the key follows 3 header bytes */
#define FIRST_CAPACITY 64

typedef struct seq_entry {
    uint64_t channel; /* hash of the channel name; 0: an empty entry */
    uint64_t last;
    uint8_t origin[ORIGIN_BYTES];
} seq_entry;

struct lmw_bus_filter {
    uint8_t node_id[ORIGIN_BYTES];
    uint8_t *answers;
    size_t answers_len;
    seq_entry *table;
    size_t capacity, used; /* capacity: a power of two, or 0 */
};

static uint64_t get_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

/* FNV-1a, with 0 kept for empty entries. Channel names are the deployment's own. */
static uint64_t channel_hash(const uint8_t *name, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) h = (h ^ name[i]) * 0x100000001b3ull;
    return h ? h : 1;
}

static size_t slot_of(uint64_t channel, const uint8_t *origin, size_t mask) {
    uint64_t h = channel ^ get_be64(origin) ^ (get_be64(origin + 8) * 0x9e3779b97f4a7c15ull);
    h ^= h >> 29;
    return (size_t)(h * 0xbf58476d1ce4e5b9ull >> 7) & mask;
}

static void place(seq_entry *table, size_t mask, const seq_entry *e) {
    size_t i = slot_of(e->channel, e->origin, mask);
    while (table[i].channel) i = (i + 1) & mask;
    table[i] = *e;
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* rebuild moves the entries into a table of capacity (a power of two), leaving out those of
 * the channels in drop (sorted hashes, n of them). Returns 0, or -1 when out of memory (the
 * old table stays). */
static int rebuild(lmw_bus_filter *f, size_t capacity, const uint64_t *drop, size_t n) {
    seq_entry *table = calloc(capacity, sizeof *table);
    if (!table) return -1;
    size_t used = 0;
    for (size_t i = 0; i < f->capacity; i++) {
        const seq_entry *e = &f->table[i];
        if (e->channel && !(n && bsearch(&e->channel, drop, n, sizeof *drop, by_value))) {
            place(table, capacity - 1, e);
            used++;
        }
    }
    free(f->table);
    f->table = table;
    f->capacity = capacity;
    f->used = used;
    return 0;
}

/* in_sequence mirrors what the Python bus did per message: 1 to go on, 0 for an envelope
 * seen already (re-sent after a broken connection); counts the gaps in counts->missed. */
static int in_sequence(lmw_bus_filter *f, uint64_t channel, const uint8_t *origin, uint64_t seq,
                       lmw_bus_counts *counts) {
    if (f->capacity) {
        size_t mask = f->capacity - 1;
        for (size_t i = slot_of(channel, origin, mask); f->table[i].channel; i = (i + 1) & mask) {
            seq_entry *e = &f->table[i];
            if (e->channel != channel || memcmp(e->origin, origin, ORIGIN_BYTES)) continue;
            if (seq <= e->last) {
                counts->duplicates++;
                return 0;
            }
            if (seq > e->last + 1) counts->missed += seq - e->last - 1;
            e->last = seq;
            return 1;
        }
    }
    if (f->used >= LMW_BUS_SEQ_MAX) { /* forget every origin rather than grow without bound */
        memset(f->table, 0, f->capacity * sizeof *f->table);
        f->used = 0;
    }
    if ((f->used + 1) * 2 > f->capacity &&
        rebuild(f, f->capacity ? f->capacity * 2 : FIRST_CAPACITY, NULL, 0) < 0)
        return 1; /* no memory to remember it: deliver, as for an origin heard of first */
    seq_entry e = {.channel = channel, .last = seq};
    memcpy(e.origin, origin, ORIGIN_BYTES);
    place(f->table, f->capacity - 1, &e);
    f->used++;
    return 1;
}

lmw_bus_filter *lmw_bus_filter_new(const uint8_t *node_id, const uint8_t *answers,
                                   size_t answers_len) {
    lmw_bus_filter *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->answers = malloc(answers_len ? answers_len : 1);
    if (!f->answers) {
        free(f);
        return NULL;
    }
    memcpy(f->node_id, node_id, ORIGIN_BYTES);
    memcpy(f->answers, answers, answers_len);
    f->answers_len = answers_len;
    return f;
}

void lmw_bus_filter_free(lmw_bus_filter *f) {
    if (!f) return;
    free(f->table);
    free(f->answers);
    free(f);
}

void lmw_bus_filter_forget(lmw_bus_filter *f, const uint8_t *names, const size_t *lengths,
                           size_t count) {
    if (!f->capacity || !count) return;
    uint64_t *drop = malloc(count * sizeof *drop);
    if (!drop) return; /* their numbers stay: a gap may be counted when they come back */
    for (size_t i = 0, at = 0; i < count; at += lengths[i], i++)
        drop[i] = channel_hash(names + at, lengths[i]);
    qsort(drop, count, sizeof *drop, by_value);
    rebuild(f, f->capacity, drop, count);
    free(drop);
}

/* history_origin: the origin of a stored envelope (all 0x00) or of a history read's marker
 * (all 0xff), lowmemws._history_redis's STORED_ORIGIN and MARKER_ORIGIN. Every node takes
 * those in Redis's order with no sequence number of their own: Python handles them. */
static int history_origin(const uint8_t *origin) {
    for (int i = 1; i < ORIGIN_BYTES; i++)
        if (origin[i] != origin[0]) return 0;
    return origin[0] == 0x00 || origin[0] == 0xff;
}

int lmw_bus_filter_judge(lmw_bus_filter *f, lmw_server *hub, const uint8_t *channel,
                         size_t channel_len, const uint8_t *data, size_t len,
                         lmw_bus_counts *counts) {
    if ((channel_len == f->answers_len && !memcmp(channel, f->answers, channel_len)) ||
        len < ENVELOPE_AT || history_origin(data))
        return LMW_BUS_UNJUDGED;
    if (!memcmp(data, f->node_id, ORIGIN_BYTES)) return LMW_BUS_DROP; /* our own echo */
    if (!in_sequence(f, channel_hash(channel, channel_len), data, get_be64(data + SEQ_AT), counts))
        return LMW_BUS_DROP;
    if (hub && len >= KEY_AT + 8 && data[ENVELOPE_AT] == LMW_ENVELOPE_V1 &&
        (data[ENVELOPE_AT + 1] & LMW_ENVELOPE_KIND_MASK) == LMW_ENVELOPE_USER &&
        !lmw_user_held(hub, get_be64(data + KEY_AT))) {
        counts->unserved++;
        return LMW_BUS_DROP;
    }
    return LMW_BUS_DELIVER;
}

/* ---- framing (RESP2 and RESP3) ---------------------------------------------------------- */

#define NEED_MORE 0
#define BAD (-1)

/* line finds the CRLF ending the line that starts at p: its offset, NEED_MORE or BAD. */
static int64_t line(const uint8_t *buf, size_t len, size_t p) {
    size_t stop = len < p + LMW_BUS_LINE_MAX ? len : p + LMW_BUS_LINE_MAX;
    for (size_t i = p; i + 1 < stop; i++)
        if (buf[i] == '\r') return buf[i + 1] == '\n' ? (int64_t)i : BAD;
    return len < p + LMW_BUS_LINE_MAX ? NEED_MORE : BAD;
}

/* number reads the decimal integer of buf[p..end) (-1 allowed when may_be_null). */
static int number(const uint8_t *buf, size_t p, size_t end, int may_be_null, int64_t *out) {
    if (may_be_null && end - p == 2 && buf[p] == '-' && buf[p + 1] == '1') {
        *out = -1;
        return 0;
    }
    if (p == end || end - p > 13) return BAD; /* 13 digits cannot overflow an int64_t */
    int64_t v = 0;
    for (size_t i = p; i < end; i++) {
        if (buf[i] < '0' || buf[i] > '9') return BAD;
        v = v * 10 + (buf[i] - '0');
    }
    if (v > LMW_BUS_BULK_MAX) return BAD;
    *out = v;
    return 0;
}

/* element reads one header at p: for a blob its body is skipped too. Returns the offset
 * after it, NEED_MORE or BAD; *children is how many elements follow it (aggregates), -1 for
 * an attribute (its 2n elements come before the reply they annotate, in *children too). */
static int64_t element(const uint8_t *buf, size_t len, size_t p, int64_t *children,
                       int *attribute) {
    *children = 0;
    *attribute = 0;
    if (p >= len) return NEED_MORE;
    int64_t eol = line(buf, len, p + 1);
    if (eol <= 0) return eol;
    size_t end = (size_t)eol, after = end + 2;
    int64_t n;
    switch (buf[p]) {
    case '+':
    case '-':
    case ':':
    case '_':
    case '#':
    case ',':
    case '(':
        return (int64_t)after;
    case '$':
    case '!':
    case '=':
        if (number(buf, p + 1, end, buf[p] == '$', &n)) return BAD;
        if (n < 0) return (int64_t)after;
        if (len - after < (size_t)n + 2) return NEED_MORE;
        if (buf[after + n] != '\r' || buf[after + n + 1] != '\n') return BAD;
        return (int64_t)(after + n + 2);
    case '*':
    case '>':
    case '~':
        if (number(buf, p + 1, end, buf[p] == '*', &n)) return BAD;
        *children = n < 0 ? 0 : n;
        return (int64_t)after;
    case '%':
    case '|':
        if (number(buf, p + 1, end, 0, &n)) return BAD;
        *children = 2 * n;
        *attribute = buf[p] == '|';
        return (int64_t)after;
    default:
        return BAD;
    }
}

/* frame_end is the offset after the whole reply starting at p, NEED_MORE or BAD. */
static int64_t frame_end(const uint8_t *buf, size_t len, size_t p) {
    int64_t pending = 1, children;
    int attribute;
    while (pending > 0) {
        int64_t next = element(buf, len, p, &children, &attribute);
        if (next <= 0) return next;
        p = (size_t)next;
        pending += children - (attribute ? 0 : 1);
    }
    return (int64_t)p;
}

/* blob reads a '$' element at p: its body's offset and length. */
static int64_t blob(const uint8_t *buf, size_t len, size_t p, size_t *at, size_t *n) {
    if (p >= len) return NEED_MORE;
    if (buf[p] != '$') return BAD;
    int64_t children;
    int attribute;
    int64_t next = element(buf, len, p, &children, &attribute);
    if (next <= 0) return next;
    size_t eol = (size_t)line(buf, len, p + 1);
    if (eol - (p + 1) == 2 && buf[p + 1] == '-') return BAD; /* a null blob */
    *at = eol + 2;
    *n = (size_t)next - 2 - *at;
    return next;
}

/* message recognises a pub/sub message: an array or push of 3 blobs, "message" or
 * "smessage", the channel, the data. Returns its end, NEED_MORE, or BAD when the frame is
 * something else (not an error: the caller frames it as a reply). */
static int64_t message(const uint8_t *buf, size_t len, size_t p, lmw_bus_item *item) {
    if (buf[p] != '*' && buf[p] != '>') return BAD;
    if (len - p < 4) return NEED_MORE; /* any complete array is at least "*0\r\n" */
    if (memcmp(buf + p + 1, "3\r\n", 3)) return BAD;
    size_t at, n;
    int64_t next = blob(buf, len, p + 4, &at, &n);
    if (next <= 0) return next;
    if (!((n == 7 && !memcmp(buf + at, "message", 7)) ||
          (n == 8 && !memcmp(buf + at, "smessage", 8))))
        return BAD;
    next = blob(buf, len, (size_t)next, &item->channel_at, &item->channel_len);
    if (next <= 0) return next;
    return blob(buf, len, (size_t)next, &item->data_at, &item->data_len);
}

int64_t lmw_bus_filter_scan(lmw_bus_filter *f, lmw_server *hub, const uint8_t *buf, size_t len,
                            size_t start, lmw_bus_item *items, size_t cap, size_t *used,
                            lmw_bus_counts *counts) {
    size_t p = start, n = 0;
    while (p < len && n < cap) {
        lmw_bus_item *item = &items[n];
        int64_t end = message(buf, len, p, item);
        if (end == NEED_MORE) break;
        if (end > 0) {
            item->kind = lmw_bus_filter_judge(f, hub, buf + item->channel_at, item->channel_len,
                                              buf + item->data_at, item->data_len, counts);
            if (item->kind != LMW_BUS_DROP) n++;
        } else {
            end = frame_end(buf, len, p);
            if (end == BAD) {
                *used = n;
                return -1;
            }
            if (end == NEED_MORE) break;
            item->kind = LMW_BUS_REPLY;
            item->data_at = p;
            item->data_len = (size_t)end - p;
            n++;
        }
        p = (size_t)end;
    }
    *used = n;
    return (int64_t)p;
}
