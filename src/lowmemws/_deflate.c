/* _deflate.c - permessage-deflate (RFC 7692): compressing and decompressing messages with no
 * state per connection.
 *
 * The server accepts an offer only with no context takeover in both directions (it answers
 * server_no_context_takeover and client_no_context_takeover to every offer, section 7.1.1),
 * so every message is compressed, and decompressed, on its own: a zlib stream is needed only
 * during one call here and is reset after it. All calls run with the server lock held, one
 * at a time, so the pool is one deflater per server window size asked for (at most 8, and
 * only one in practice: browsers ask for none) and one inflater, made on first use. An idle
 * connection holds nothing: its slot remembers the window size in 4 bits.
 *
 * A compressed message that arrives in fragments is assembled compressed (like any
 * fragmented message: bounded by max_message and the spill budget) and decompressed once
 * its last fragment is in, so it holds no inflater between reads either. Decompression
 * counts its output against max_message as it goes (1009 as soon as it passes, never an
 * allocation past max_message + 1), and its buffer against the spill budget (1013) while it
 * grows and while it is lent to Python (until the next poll): however many small compressed
 * messages arrive in one batch, what they decompress to stays within the budget.
 *
 * Storage level: nothing here writes to a socket or changes a connection's state.
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "_runtime.h"

/* The empty stored block the sender removes from the end of each message (section 7.2.1)
 * and the receiver appends again (section 7.2.2). */
static const uint8_t SYNC_TAIL[4] = {0x00, 0x00, 0xff, 0xff};

#define HEADER_ROOM 10 /* the longest server frame header */

/* ---------------------------------------------------------------- the pool */

/* deflater returns the deflater for server window class cls (1-8: 8-15 bits), made on first
 * use. zlib refuses an 8-bit raw window; at 9 bits its matches reach at most 2^9 - 262 = 250
 * bytes back, within the 256 bytes a client asking for 8 keeps, so 9 serves both. */
static z_stream *deflater(lmw_server *s, int cls) {
    z_stream **at = (z_stream **)&s->deflaters[cls - 1];
    if (*at) return *at;
    z_stream *z = calloc(1, sizeof *z);
    if (!z) return NULL;
    int bits = cls + 7 < 9 ? 9 : cls + 7;
    if (deflateInit2(z, s->cfg.deflate_level, Z_DEFLATED, -bits, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        free(z);
        return NULL;
    }
    s->stats->deflate_streams++;
    return *at = z;
}

/* inflater returns the one inflater, made on first use: a 15-bit window reads whatever
 * window the client compressed with (client_max_window_bits needs no answer). */
static z_stream *inflater(lmw_server *s) {
    if (s->inflater) return s->inflater;
    z_stream *z = calloc(1, sizeof *z);
    if (!z) return NULL;
    if (inflateInit2(z, -15) != Z_OK) {
        free(z);
        return NULL;
    }
    s->stats->deflate_streams++;
    return s->inflater = z;
}

void lmw__deflate_free(lmw_server *s) {
    for (int i = 0; i < 8; i++) {
        if (!s->deflaters[i]) continue;
        deflateEnd(s->deflaters[i]);
        free(s->deflaters[i]);
        s->deflaters[i] = NULL;
    }
    if (s->inflater) {
        inflateEnd(s->inflater);
        free(s->inflater);
        s->inflater = NULL;
    }
}

/* ---------------------------------------------------------------- sending */

/* lmw__deflate_frame builds the compressed frame of one message (RSV1 set, section 6) for
 * connections of window class cls, at stack (DEFLATE_STACK bytes) when it fits, else in an
 * allocation; free it with lmw__deflate_frame_free. Returns NULL when the message is better
 * sent as it is: compression saved nothing, or a stream or memory was missing (the caller
 * then sends the plain frame, which the RFC allows for any message). */
uint8_t *lmw__deflate_frame(lmw_server *s, int cls, int opcode, const uint8_t *data, size_t len,
                            uint8_t *stack, size_t *flen) {
    z_stream *z = deflater(s, cls);
    if (!z || len > UINT32_MAX) return NULL;
    size_t cap = HEADER_ROOM + deflateBound(z, (uLong)len) + 16;
    uint8_t *f = stack && cap <= DEFLATE_STACK ? stack : malloc(cap);
    if (!f) return NULL;
    z->next_in = (Bytef *)data;
    z->avail_in = (uInt)len;
    z->next_out = f + HEADER_ROOM;
    z->avail_out = (uInt)(cap - HEADER_ROOM);
    int r = deflate(z, Z_SYNC_FLUSH);
    size_t zlen = cap - HEADER_ROOM - z->avail_out;
    deflateReset(z);
    int whole = r == Z_OK && z->avail_in == 0 && zlen >= 4 &&
                memcmp(f + HEADER_ROOM + zlen - 4, SYNC_TAIL, 4) == 0;
    if (!whole || zlen - 4 >= len) {
        lmw__deflate_frame_free(stack, f);
        return NULL;
    }
    zlen -= 4;
    uint8_t header[HEADER_ROOM];
    int hl = lmw_build_header(header, 1, opcode, zlen);
    header[0] |= 0x40; /* RSV1: this message is compressed */
    memmove(f + hl, f + HEADER_ROOM, zlen);
    memcpy(f, header, (size_t)hl);
    *flen = (size_t)hl + zlen;
    s->stats->messages_deflated_total++;
    s->stats->deflate_in_bytes_total += len;
    s->stats->deflate_out_bytes_total += zlen;
    return f;
}

void lmw__deflate_frame_free(uint8_t *stack, uint8_t *frame) {
    if (frame != stack) free(frame);
}

/* ---------------------------------------------------------------- receiving */

/* inflate_fits: an output buffer may grow by more bytes within the spill budget, shared
 * with the spills and the decompressed messages lent this batch. */
static int inflate_fits(const lmw_server *s, uint64_t more) {
    return s->stats->spill_bytes + s->inflated_lent + more <= s->cfg.spill_budget;
}

/* grow_output gives the inflater room past its full output buffer: doubling, up to
 * max_message + 1 (one byte more than a message may have, so passing it is seen), charged
 * to the spill budget. Returns 0, or the close code. */
static int grow_output(lmw_server *s, z_stream *z, uint8_t **buf, uint64_t *cap) {
    uint64_t max = s->cfg.max_message, produced = (uint64_t)(z->next_out - *buf);
    if (*cap > max) return 1009; /* max_message + 1 bytes came out: too big */
    uint64_t want = *cap * 2 > max + 1 ? max + 1 : *cap * 2;
    if (!inflate_fits(s, want - *cap)) return 1013;
    uint8_t *m = realloc(*buf, want);
    if (!m) {
        s->stats->errors[LMW_ERR_NOMEM]++;
        return 1011;
    }
    s->stats->spill_bytes += want - *cap;
    *buf = m;
    *cap = want;
    z->next_out = m + produced;
    uint64_t room = want - produced;
    z->avail_out = room > UINT32_MAX ? UINT32_MAX : (uInt)room;
    return 0;
}

/* run_inflate decompresses in (and the tail of section 7.2.2) into *buf. Returns 0 or the
 * close code: 1007 for data that is not deflate, or that goes on past a final block. */
static int run_inflate(lmw_server *s, z_stream *z, const uint8_t *in, size_t n, uint8_t **buf,
                       uint64_t *cap) {
    int tail = 0;
    z->next_in = (Bytef *)in;
    z->avail_in = (uInt)n;
    for (;;) {
        if (z->avail_out == 0) {
            int code = grow_output(s, z, buf, cap);
            if (code) return code;
        }
        int r = inflate(z, Z_SYNC_FLUSH);
        if (r == Z_STREAM_END) return !tail && z->avail_in ? 1007 : 0;
        if (r == Z_MEM_ERROR) return 1011;
        if (r != Z_OK && r != Z_BUF_ERROR) return 1007;
        if (z->avail_out == 0) continue; /* more may come out: grow */
        if (z->avail_in) return 1007;    /* stuck with input left and room: never valid */
        if (tail) return 0;
        tail = 1;
        z->next_in = (Bytef *)SYNC_TAIL;
        z->avail_in = sizeof SYNC_TAIL;
    }
}

/* lmw__inflate_message decompresses a whole compressed message (the payloads of its frames,
 * in order) into a buffer lent until the next poll (*out, *out_len). A text message is
 * checked as UTF-8 once decompressed. Returns 0, or the close code: 1009 the output passed
 * max_message, 1007 bad compressed data or invalid UTF-8, 1013 the spill budget is spent,
 * 1011 no memory. */
int lmw__inflate_message(lmw_server *s, const uint8_t *in, size_t n, int text, const uint8_t **out,
                         uint64_t *out_len) {
    z_stream *z = inflater(s);
    if (!z || n > UINT32_MAX) return z ? 1009 : 1011;
    uint64_t max = s->cfg.max_message;
    uint64_t cap = (uint64_t)n * 4 < 1024 ? 1024 : (uint64_t)n * 4;
    if (cap > max + 1) cap = max + 1;
    if (!inflate_fits(s, cap)) return 1013;
    uint8_t *buf = malloc(cap ? cap : 1);
    if (!buf) return 1011;
    s->stats->spill_bytes += cap;
    z->next_out = buf;
    z->avail_out = cap > UINT32_MAX ? UINT32_MAX : (uInt)cap;
    int code = run_inflate(s, z, in, n, &buf, &cap);
    uint64_t produced = (uint64_t)(z->next_out - buf);
    inflateReset(z);
    s->stats->spill_bytes -= cap;
    if (!code && produced > max) code = 1009;
    if (!code && text) {
        uint32_t state = LMW_UTF8_ACCEPT;
        if (lmw_utf8_check(&state, buf, produced) >= 0 || state != LMW_UTF8_ACCEPT) code = 1007;
    }
    if (code) {
        free(buf);
        return code;
    }
    s->stats->messages_inflated_total++;
    s->inflated_lent += cap;
    lmw__lend(s, buf);
    *out = buf;
    *out_len = produced;
    return 0;
}
