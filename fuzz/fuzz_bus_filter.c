/* fuzz_bus_filter - libFuzzer target for lmw_bus_filter_scan (RedisBus's subscriber-side
 * framing, _bus_filter.c). Invariants: the result is -1 or an offset inside the input;
 * every item lies inside the input; the bytes fed in two reads (the first cut where the
 * input's first byte says, the unread rest carried over as a link does) and scanned a few
 * items at a time give the same items as one scan of the whole. */
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/lmw.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

#define MAX_ITEMS 4096

/* The hub, as the filter sees it: odd user tags are held here. */
int lmw_user_held(lmw_server *s, uint64_t user_tag) { return (int)(user_tag & 1); }

static const uint8_t node_id[16] = "0123456789abcdef";
static const uint8_t answers[] = "lowmemws:answers:x";

typedef struct seen {
    size_t kind;
    const uint8_t *channel, *data;
    size_t channel_len, data_len;
} seen;

/* run scans input as a link would: a read of cut bytes, then the rest; cap items per call.
 * Fills out (pointers into the read buffers, freed by the caller from keep); returns 0 or
 * -1 (not RESP). */
static int64_t run(const uint8_t *input, size_t size, size_t cut, size_t cap, seen *out,
                   size_t *count, uint8_t **keep) {
    lmw_bus_filter *f = lmw_bus_filter_new(node_id, answers, sizeof answers - 1);
    CHECK(f);
    lmw_bus_item items[8];
    lmw_bus_counts counts = {0};
    lmw_server *hub = (lmw_server *)&counts; /* any non-NULL pointer: the stub ignores it */
    uint8_t *buf = NULL;
    size_t have = 0, at = 0, fed = 0, n = 0;
    int64_t result = 0;
    for (int read = 0; read < 2 && result >= 0; read++) {
        size_t more = read == 0 ? cut : size - cut;
        /* the unread rest of the last read goes first, in a new buffer: the items taken
         * so far keep pointing into the old one */
        uint8_t *grown = malloc(have - at + more + 1);
        CHECK(grown);
        if (have > at) memcpy(grown, buf + at, have - at);
        memcpy(grown + have - at, input + fed, more);
        buf = grown;
        keep[read] = grown;
        have = have - at + more;
        fed += more;
        at = 0;
        size_t used = 0;
        do {
            int64_t end = lmw_bus_filter_scan(f, hub, buf, have, at, items, cap, &used, &counts);
            if (end < 0) {
                result = -1;
                break;
            }
            CHECK((size_t)end >= at && (size_t)end <= have && used <= cap);
            for (size_t i = 0; i < used; i++) {
                lmw_bus_item *it = &items[i];
                CHECK(it->data_at + it->data_len <= (size_t)end);
                CHECK(it->kind == LMW_BUS_REPLY || it->channel_at + it->channel_len <= (size_t)end);
                CHECK(it->kind != LMW_BUS_DROP);
                CHECK(n < MAX_ITEMS);
                out[n++] = (seen){it->kind, buf + it->channel_at, buf + it->data_at,
                                  it->kind == LMW_BUS_REPLY ? 0 : it->channel_len, it->data_len};
            }
            at = (size_t)end;
        } while (used == cap);
    }
    *count = n;
    lmw_bus_filter_free(f);
    return result;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 16) return 0;
    static seen whole[MAX_ITEMS], split[MAX_ITEMS];
    uint8_t *keep_whole[2] = {0}, *keep_split[2] = {0};
    size_t n_whole, n_split;
    int64_t a = run(data, size, size, 8, whole, &n_whole, keep_whole);
    size_t cut = size ? data[0] % (size + 1) : 0;
    int64_t b =
        run(data, size, cut, 1 + (size ? data[size - 1] % 7 : 0), split, &n_split, keep_split);
    CHECK((a < 0) == (b < 0));
    if (a >= 0) {
        CHECK(n_whole == n_split);
        for (size_t i = 0; i < n_whole; i++) {
            CHECK(whole[i].kind == split[i].kind);
            CHECK(whole[i].channel_len == split[i].channel_len);
            CHECK(whole[i].data_len == split[i].data_len);
            CHECK(!memcmp(whole[i].channel, split[i].channel, whole[i].channel_len));
            CHECK(!memcmp(whole[i].data, split[i].data, whole[i].data_len));
        }
    }
    for (int i = 0; i < 2; i++) {
        free(keep_whole[i]);
        free(keep_split[i]);
    }
    return 0;
}
