/* _frame.c - the pure codec of lowmemws: HTTP/1.1 request heads (RFC 7230), the
 * WebSocket opening handshake (RFC 6455 section 4) and frames (RFC 6455 section 5).
 *
 * Theory of operation
 *   Every function takes bytes owned by the caller and returns offsets, lengths and a
 *   status. Nothing here allocates, keeps a pointer after returning, or touches a
 *   socket; the only globals are read-only tables and the reject responses, which are
 *   string literals assembled by the compiler.
 *
 *   The request parser reads a head that arrives whole in a single pass: each line's
 *   end is found while the line is parsed (SSE2 scans sixteen bytes at a time where the
 *   target has it, with a portable fallback), and known header names are recognised by
 *   length and whole-word compares. When that pass stops short of the blank line, and on
 *   every later call, the search for the blank line takes over; it is resumable
 *   (lmw_request.scanned), so a client that trickles its head a byte at a time costs one
 *   pass over its bytes, not one pass per byte, and the structured parse then runs once,
 *   over a head known to be complete. Both routes give the same outcome.
 *
 *   Frames are parsed one header at a time; payloads are unmasked in place eight bytes
 *   per step and validated as UTF-8 by an incremental validator whose whole state fits
 *   in a uint32, so a text message split across frames and reads is checked as it
 *   arrives and rejected at its first bad byte.
 */
#include "lmw.h"

#include <string.h>

#define LMW_LIKELY(x) __builtin_expect(!!(x), 1)
#define LMW_UNLIKELY(x) __builtin_expect(!!(x), 0)

#if !defined(__SSE2__)
static const uint64_t ONES = 0x0101010101010101ULL;
#endif
static const uint64_t HIGHS = 0x8080808080808080ULL;

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void store64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ------------------------------------------------------------------------------------
 * Character classes (RFC 7230 section 3.2.6)
 * ---------------------------------------------------------------------------------- */

#define C_TCHAR 1  /* token character */
#define C_VALUE 2  /* field-value character: VCHAR, obs-text, SP, HTAB */
#define C_TARGET 4 /* request-target character: VCHAR */

/* The table keeps one row per run of the ASCII chart: easier to check than one per line. */
/* clang-format off */
static const uint8_t char_class[256] = {
    ['\t'] = C_VALUE,
    [' '] = C_VALUE,
    ['!'] = 7, ['"'] = 6, ['#'] = 7, ['$'] = 7, ['%'] = 7, ['&'] = 7, ['\''] = 7,
    ['('] = 6, [')'] = 6, ['*'] = 7, ['+'] = 7, [','] = 6, ['-'] = 7, ['.'] = 7,
    ['/'] = 6,
    ['0'] = 7, ['1'] = 7, ['2'] = 7, ['3'] = 7, ['4'] = 7, ['5'] = 7, ['6'] = 7,
    ['7'] = 7, ['8'] = 7, ['9'] = 7,
    [':'] = 6, [';'] = 6, ['<'] = 6, ['='] = 6, ['>'] = 6, ['?'] = 6, ['@'] = 6,
    ['A'] = 7, ['B'] = 7, ['C'] = 7, ['D'] = 7, ['E'] = 7, ['F'] = 7, ['G'] = 7,
    ['H'] = 7, ['I'] = 7, ['J'] = 7, ['K'] = 7, ['L'] = 7, ['M'] = 7, ['N'] = 7,
    ['O'] = 7, ['P'] = 7, ['Q'] = 7, ['R'] = 7, ['S'] = 7, ['T'] = 7, ['U'] = 7,
    ['V'] = 7, ['W'] = 7, ['X'] = 7, ['Y'] = 7, ['Z'] = 7,
    ['['] = 6, ['\\'] = 6, [']'] = 6, ['^'] = 7, ['_'] = 7, ['`'] = 7,
    ['a'] = 7, ['b'] = 7, ['c'] = 7, ['d'] = 7, ['e'] = 7, ['f'] = 7, ['g'] = 7,
    ['h'] = 7, ['i'] = 7, ['j'] = 7, ['k'] = 7, ['l'] = 7, ['m'] = 7, ['n'] = 7,
    ['o'] = 7, ['p'] = 7, ['q'] = 7, ['r'] = 7, ['s'] = 7, ['t'] = 7, ['u'] = 7,
    ['v'] = 7, ['w'] = 7, ['x'] = 7, ['y'] = 7, ['z'] = 7,
    ['{'] = 6, ['|'] = 7, ['}'] = 6, ['~'] = 7,
    [0x80 ... 0xFF] = C_VALUE,
};
/* clang-format on */

static inline int is_ows(uint8_t c) { return c == ' ' || c == '\t'; }

static inline uint8_t lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* find_lf returns the index of the first LF in s[i..end), or end. Sixteen bytes per
 * step where SSE2 exists; never reads at or past end. */
static inline size_t find_lf(const uint8_t *s, size_t i, size_t end) {
#if defined(__SSE2__)
    const __m128i lf = _mm_set1_epi8('\n');
    for (; i + 16 <= end; i += 16) {
        unsigned m = (unsigned)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i)), lf));
        if (m) return i + (size_t)__builtin_ctz(m);
    }
#endif
    const uint8_t *p = memchr(s + i, '\n', end - i);
    return p ? (size_t)(p - s) : end;
}

/* find_ctl returns the index of the first byte in s[i..end) that is a control
 * character (below 0x20, or DEL), or end. In a field value the first one must be the
 * CR of the line's CRLF (or a tab); anything else makes the line invalid. */
static inline size_t find_ctl(const uint8_t *s, size_t i, size_t end) {
#if defined(__SSE2__)
    const __m128i below = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F);
    const __m128i zero = _mm_setzero_si128();
    for (; i + 16 <= end; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i ctl =
            _mm_or_si128(_mm_cmpeq_epi8(_mm_subs_epu8(x, below), zero), _mm_cmpeq_epi8(x, del));
        unsigned m = (unsigned)_mm_movemask_epi8(ctl);
        if (m) return i + (size_t)__builtin_ctz(m);
    }
#else
    for (; i + 8 <= end; i += 8) {
        uint64_t w = load64(s + i);
        uint64_t low = (w - ONES * 0x20) & ~w & HIGHS;
        uint64_t d = w ^ (ONES * 0x7F);
        d = (d - ONES) & ~d & HIGHS;
        if (low | d) break;
    }
#endif
    for (; i < end; i++)
        if (s[i] < 0x20 || s[i] == 0x7F) return i;
    return end;
}

static int span_of_class(const uint8_t *s, size_t n, uint8_t cls) {
    for (size_t i = 0; i < n; i++)
        if (!(char_class[s[i]] & cls)) return 0;
    return 1;
}

/* scan_name returns the index of the first byte in s[i..end) that is not a token
 * character, or end. Header names are letters, digits and '-' nearly always: where
 * SSE2 exists, sixteen bytes per step are checked against those three ranges and only
 * a byte outside them is looked up in char_class. */
static inline size_t scan_name(const uint8_t *s, size_t i, size_t end) {
#if defined(__SSE2__)
    const __m128i case_bit = _mm_set1_epi8(0x20), dash = _mm_set1_epi8('-');
    const __m128i a_1 = _mm_set1_epi8('a' - 1), z_1 = _mm_set1_epi8('z' + 1);
    const __m128i d0_1 = _mm_set1_epi8('0' - 1), d9_1 = _mm_set1_epi8('9' + 1);
    while (i + 16 <= end) {
        __m128i x = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i l = _mm_or_si128(x, case_bit); /* bytes >= 0x80 stay negative */
        __m128i ok = _mm_and_si128(_mm_cmpgt_epi8(l, a_1), _mm_cmplt_epi8(l, z_1));
        ok = _mm_or_si128(ok, _mm_and_si128(_mm_cmpgt_epi8(x, d0_1), _mm_cmplt_epi8(x, d9_1)));
        ok = _mm_or_si128(ok, _mm_cmpeq_epi8(x, dash));
        unsigned m = ~(unsigned)_mm_movemask_epi8(ok) & 0xFFFF;
        if (m == 0) {
            i += 16;
            continue;
        }
        i += (size_t)__builtin_ctz(m);
        if (LMW_LIKELY(s[i] == ':') || !(char_class[s[i]] & C_TCHAR)) return i;
        i++; /* a rarer token character such as '_' */
    }
#endif
    while (i < end && (char_class[s[i]] & C_TCHAR)) i++;
    return i;
}

/* scan_vchar returns the index of the first byte in s[i..end) that is not a VCHAR
 * (0x21..0x7E), or end: the end of a request-target. */
static inline size_t scan_vchar(const uint8_t *s, size_t i, size_t end) {
#if defined(__SSE2__)
    const __m128i sp = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7F);
    for (; i + 16 <= end; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i ok = _mm_and_si128(_mm_cmpgt_epi8(x, sp), _mm_cmplt_epi8(x, del));
        unsigned m = ~(unsigned)_mm_movemask_epi8(ok) & 0xFFFF;
        if (m) return i + (size_t)__builtin_ctz(m);
    }
#endif
    while (i < end && (char_class[s[i]] & C_TARGET)) i++;
    return i;
}

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Case folding a word at a time: OR-ing 0x20 into every byte maps 'A'..'Z' to
 * 'a'..'z'. Among token characters (a header name) and for a literal of lowercase
 * letters and '-', it maps nothing else onto a letter or '-', so comparing folded words
 * with the literal is an exact case-insensitive comparison. */
#define FOLD32 0x20202020u
#define FOLD64 0x2020202020202020ULL

static inline uint32_t lit32(const char *s) {
    uint32_t v;
    memcpy(&v, s, 4);
    return v;
}

static inline uint64_t lit64(const char *s) {
    uint64_t v;
    memcpy(&v, s, 8);
    return v;
}

/* folded_is reports whether the n bytes at p (n >= 4, the length of lit) equal the
 * lowercase literal lit, ignoring case: whole words, the last one overlapping. */
static inline int folded_is(const uint8_t *p, size_t n, const char *lit) {
    if (n < 8)
        return (((load32(p) | FOLD32) ^ lit32(lit)) |
                ((load32(p + n - 4) | FOLD32) ^ lit32(lit + n - 4))) == 0;
    uint64_t d = (load64(p + n - 8) | FOLD64) ^ lit64(lit + n - 8);
    for (size_t k = 0; k + 8 < n; k += 8) d |= (load64(p + k) | FOLD64) ^ lit64(lit + k);
    return d == 0;
}

/* ------------------------------------------------------------------------------------
 * Request head
 * ---------------------------------------------------------------------------------- */

/* find_head_end continues the search for CRLF CRLF from req->scanned up to limit.
 * Every LF must follow a CR (bare LF is refused, see lmw.h). Returns the head length,
 * 0 when not found yet, or -1 on a bare LF. */
static int64_t find_head_end(const uint8_t *buf, size_t limit, lmw_request *req) {
    size_t i = req->scanned <= limit ? req->scanned : limit;
    while (i < limit) {
        size_t at = find_lf(buf, i, limit);
        if (at == limit) break;
        if (at == 0 || buf[at - 1] != '\r') return -1;
        if (at >= 3 && buf[at - 2] == '\n' && buf[at - 3] == '\r') return (int64_t)(at + 1);
        if (at == 1) /* a head that starts with an empty line */
            return -1;
        i = at + 1;
    }
    req->scanned = (uint32_t)limit;
    return 0;
}

static int fail(lmw_request *req, int status) {
    req->status = (uint16_t)status;
    return LMW_ERROR;
}

/* known_header maps a header name (token characters) to LMW_H_*, or -1: its length
 * picks at most two candidates, folded word compares settle it. */
static inline int known_header(const uint8_t *p, size_t n) {
    switch (n) {
    case 4:
        return folded_is(p, 4, "host") ? LMW_H_HOST : -1;
    case 6:
        if ((p[0] | 0x20) == 'c') return folded_is(p, 6, "cookie") ? LMW_H_COOKIE : -1;
        return folded_is(p, 6, "origin") ? LMW_H_ORIGIN : -1;
    case 7:
        return folded_is(p, 7, "upgrade") ? LMW_H_UPGRADE : -1;
    case 10:
        return folded_is(p, 10, "connection") ? LMW_H_CONNECTION : -1;
    case 13:
        return folded_is(p, 13, "authorization") ? LMW_H_AUTHORIZATION : -1;
    case 14:
        return folded_is(p, 14, "content-length") ? LMW_H_CONTENT_LENGTH : -1;
    case 17:
        if ((p[0] | 0x20) == 's')
            return folded_is(p, 17, "sec-websocket-key") ? LMW_H_SEC_WEBSOCKET_KEY : -1;
        return folded_is(p, 17, "transfer-encoding") ? LMW_H_TRANSFER_ENCODING : -1;
    case 21:
        return folded_is(p, 21, "sec-websocket-version") ? LMW_H_SEC_WEBSOCKET_VERSION : -1;
    case 22:
        return folded_is(p, 22, "sec-websocket-protocol") ? LMW_H_SEC_WEBSOCKET_PROTOCOL : -1;
    case 24:
        return folded_is(p, 24, "sec-websocket-extensions") ? LMW_H_SEC_WEBSOCKET_EXTENSIONS : -1;
    default:
        return -1;
    }
}

/* Headers that may appear only once (RFC 7230 3.2.2, RFC 6455 4.1); the others keep
 * the span of their first occurrence. */
#define SINGLETONS                                                                                 \
    ((1u << LMW_H_HOST) | (1u << LMW_H_CONTENT_LENGTH) | (1u << LMW_H_SEC_WEBSOCKET_KEY) |         \
     (1u << LMW_H_SEC_WEBSOCKET_VERSION))

static int parse_content_length(const uint8_t *s, size_t n, uint64_t *out) {
    uint64_t v = 0;
    if (n == 0 || n > 19) return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 1;
}

#if !defined(__SSE2__)
/* The base64 alphabet (RFC 4648 section 4). */
static const uint8_t base64_char[256] = {
    ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1, ['0' ... '9'] = 1, ['+'] = 1, ['/'] = 1,
};
#endif

/* key_ok: RFC 6455 4.2.1 item 5, base64 (RFC 4648 section 4) of exactly 16 bytes,
 * which is 22 alphabet characters and "==". */
static int key_ok(const uint8_t *s, size_t n) {
    if (n != 24 || s[22] != '=' || s[23] != '=') return 0;
#if defined(__SSE2__)
    /* bytes 0..15 and 6..21: letters, digits, '+' and '/' (signed compares: bytes
     * from 0x80 on are negative and fall outside every range) */
    const __m128i case_bit = _mm_set1_epi8(0x20);
    const __m128i a_1 = _mm_set1_epi8('a' - 1), z_1 = _mm_set1_epi8('z' + 1);
    const __m128i d0_1 = _mm_set1_epi8('0' - 1), d9_1 = _mm_set1_epi8('9' + 1);
    const __m128i plus = _mm_set1_epi8('+'), slash = _mm_set1_epi8('/');
    unsigned bad = 0;
    for (int at = 0; at <= 6; at += 6) {
        __m128i x = _mm_loadu_si128((const __m128i *)(s + at));
        __m128i l = _mm_or_si128(x, case_bit);
        __m128i ok = _mm_and_si128(_mm_cmpgt_epi8(l, a_1), _mm_cmplt_epi8(l, z_1));
        ok = _mm_or_si128(ok, _mm_and_si128(_mm_cmpgt_epi8(x, d0_1), _mm_cmplt_epi8(x, d9_1)));
        ok = _mm_or_si128(ok, _mm_or_si128(_mm_cmpeq_epi8(x, plus), _mm_cmpeq_epi8(x, slash)));
        bad |= ~(unsigned)_mm_movemask_epi8(ok) & 0xFFFF;
    }
    return bad == 0;
#else
    unsigned ok = 1;
    for (size_t i = 0; i < 22; i++) ok &= base64_char[s[i]];
    return (int)ok;
#endif
}

/* token_has is lmw_token_list_has for a lowercase letters-only token (at least 4) in a
 * trimmed value, with shortcuts for the usual places of the token: the whole value
 * ("Upgrade"), or its last item ("keep-alive, Upgrade"). */
static inline int token_has(const uint8_t *v, size_t n, const char *token, size_t token_len) {
    if (n >= token_len && folded_is(v + n - token_len, token_len, token)) {
        size_t j = n - token_len;
        while (j > 0 && is_ows(v[j - 1])) j--;
        if (j == 0 || v[j - 1] == ',') return 1;
    }
    return lmw_token_list_has(v, n, (const uint8_t *)token, token_len);
}

/* parse_request_line parses the request line at the start of buf[0..end) and returns
 * the index just past its CRLF, or 0 with *status set (400 or 505) when the line is not
 * valid or not complete within end. */
static inline size_t parse_request_line(const uint8_t *buf, size_t end, lmw_request *req,
                                        int *status) {
    *status = 400;
    size_t i;
    if (LMW_LIKELY(end >= 4 && load32(buf) == lit32("GET ")))
        i = 3;
    else {
        i = 0;
        while (i < end && (char_class[buf[i]] & C_TCHAR)) i++;
        if (i == 0 || i >= end || buf[i] != ' ') return 0;
    }
    req->method = (lmw_span){0, (uint32_t)i};
    size_t t = ++i;
    i = scan_vchar(buf, i, end);
    if (i == t || i >= end || buf[i] != ' ') return 0;
    req->target = (lmw_span){(uint32_t)t, (uint32_t)(i - t)};
    const uint8_t *q = memchr(buf + t, '?', i - t);
    size_t path_end = q ? (size_t)(q - buf) : i;
    req->path = (lmw_span){(uint32_t)t, (uint32_t)(path_end - t)};
    req->query = q ? (lmw_span){(uint32_t)(path_end + 1), (uint32_t)(i - path_end - 1)}
                   : (lmw_span){(uint32_t)i, 0};
    /* "HTTP/" DIGIT "." DIGIT CRLF */
    const uint8_t *v = buf + i + 1;
    if (end - i - 1 < 10 || memcmp(v, "HTTP/", 5) != 0 || v[6] != '.' ||
        (uint8_t)(v[5] - '0') > 9 || (uint8_t)(v[7] - '0') > 9 || v[8] != '\r' || v[9] != '\n')
        return 0;
    if (v[5] != '1' || v[7] > '1') {
        *status = 505;
        return 0;
    }
    req->minor_version = (uint8_t)(v[7] - '0');
    return i + 11;
}

/* parse_lines parses a head in one pass over buf[0..end): the request line, then one
 * header line after another, each line's end found while its value is scanned, up to
 * the empty line. Returns the head length, or 0 with *status set (400 or 505) and *stop
 * at the start of the first line that is not valid or not complete within end. Every
 * line before *stop ends in CRLF and is not empty. */
static size_t parse_lines(const uint8_t *buf, size_t end, lmw_request *req, int *status,
                          size_t *stop, uint8_t *tokens) {
    *stop = 0;
    size_t s = parse_request_line(buf, end, req, status);
    if (s == 0) return 0;
    *status = 400;
    for (;;) {
        *stop = s;
        if (s + 1 >= end) return 0;
        if (buf[s] == '\r') return buf[s + 1] == '\n' ? s + 2 : 0;
        /* name: a token then ':' (no whitespace before the colon; a leading SP or HTAB
         * is obs-fold, RFC 7230 3.2.4) */
        size_t c = scan_name(buf, s, end);
        if (c == s || c >= end || buf[c] != ':') return 0;
        size_t vs = c + 1;
        while (vs < end && is_ows(buf[vs])) vs++;
        /* value: up to the first control character but HTAB, which must be CR LF */
        size_t ve = vs;
        for (;;) {
            ve = find_ctl(buf, ve, end);
            if (ve >= end || buf[ve] != '\t') break;
            ve++;
        }
        if (ve + 1 >= end || buf[ve] != '\r' || buf[ve + 1] != '\n') return 0;
        size_t next = ve + 2;
        while (ve > vs && is_ows(buf[ve - 1])) ve--;
        req->header_count++;
        int h = known_header(buf + s, c - s);
        if (h >= 0) {
            uint32_t bit = 1u << h;
            if (req->present & bit & SINGLETONS) return 0;
            if (h == LMW_H_UPGRADE && token_has(buf + vs, ve - vs, "websocket", 9))
                *tokens |= 1;
            else if (h == LMW_H_CONNECTION && token_has(buf + vs, ve - vs, "upgrade", 7))
                *tokens |= 2;
            else if (h == LMW_H_CONTENT_LENGTH &&
                     !parse_content_length(buf + vs, ve - vs, &req->content_length))
                return 0;
            if (!(req->present & bit))
                req->headers[h] = (lmw_span){(uint32_t)vs, (uint32_t)(ve - vs)};
            req->present |= bit;
        }
        s = next;
    }
}

/* check_upgrade applies RFC 6455 4.2.1 to a request that asked for websocket. */
static int check_upgrade(const uint8_t *buf, const lmw_request *req, uint8_t tokens) {
    if (req->method.len != 3 || memcmp(buf + req->method.off, "GET", 3) != 0) return 405;
    if (req->minor_version != 1) return 505;
    if (!(tokens & 2)) return 400;
    const lmw_span *v = &req->headers[LMW_H_SEC_WEBSOCKET_VERSION];
    if (!(req->present & (1u << LMW_H_SEC_WEBSOCKET_VERSION)) || v->len != 2 ||
        memcmp(buf + v->off, "13", 2) != 0)
        return 426;
    const lmw_span *k = &req->headers[LMW_H_SEC_WEBSOCKET_KEY];
    if (!(req->present & (1u << LMW_H_SEC_WEBSOCKET_KEY)) || !key_ok(buf + k->off, k->len))
        return 400;
    return 0;
}

/* finish_head applies the checks that need the whole head and sets req->kind.
 * Returns 0 or a status. */
static int finish_head(const uint8_t *buf, lmw_request *req, uint8_t tokens) {
    if (req->present & (1u << LMW_H_TRANSFER_ENCODING)) return 501;
    if (req->minor_version == 1 && !(req->present & (1u << LMW_H_HOST))) return 400;
    if (!(tokens & 1)) {
        req->kind = LMW_KIND_HTTP;
        return 0;
    }
    int status = check_upgrade(buf, req, tokens);
    if (status) return status;
    req->kind = LMW_KIND_UPGRADE;
    return 0;
}

/* lmw_parse_request has two routes to the same outcome.
 *   First call (scanned == 0), the usual case of a head that arrives whole: parse_lines
 *   runs over everything received, finding each line end while it parses the line, so
 *   the bytes are read once. If it stops before the empty line (a bad line, or the head
 *   is not complete yet), the search for CRLF CRLF takes over at the start of the line
 *   where it stopped (the lines before it are known to end in CRLF) and decides between
 *   400 (bare LF), 431, LMW_INCOMPLETE, and the line's own status.
 *   Later calls (scanned > 0): the search resumes at scanned, and once the head is
 *   complete parse_lines runs over it exactly once.
 * Either way a line's status depends only on its bytes up to its LF, so both routes
 * (and every split of the input) end the same way. */
int lmw_parse_request(const uint8_t *buf, size_t len, size_t max_head, lmw_request *req) {
    if (max_head > UINT32_MAX - 1) max_head = UINT32_MAX - 1;
    size_t limit = len < max_head ? len : max_head;
    uint32_t scanned = req->scanned, resume = scanned;
    int status = 400;
    uint8_t tokens = 0;
    size_t stop, head_len;
    memset(req, 0, sizeof *req);
    if (scanned == 0) {
        head_len = parse_lines(buf, limit, req, &status, &stop, &tokens);
        if (LMW_LIKELY(head_len > 0)) goto complete;
        memset(req, 0, sizeof *req);
        resume = (uint32_t)stop;
    }
    req->scanned = resume;
    int64_t found = find_head_end(buf, limit, req);
    if (found == 0) return len >= max_head ? fail(req, 431) : LMW_INCOMPLETE;
    req->scanned = scanned;
    if (found < 0) return fail(req, 400);
    /* complete: parse it once (again, on the cold path where the first pass stopped) */
    req->head_len = (uint32_t)found;
    tokens = 0;
    head_len = parse_lines(buf, (size_t)found, req, &status, &stop, &tokens);
    if (head_len != (size_t)found) return fail(req, status);
complete:
    req->head_len = (uint32_t)head_len;
    status = finish_head(buf, req, tokens);
    if (status) {
        req->kind = 0;
        return fail(req, status);
    }
    return (int)head_len;
}

int lmw_header_next(const uint8_t *buf, size_t head_len, uint32_t *pos, lmw_span *name,
                    lmw_span *value) {
    size_t s = *pos;
    if (s == 0) {
        const uint8_t *lf = memchr(buf, '\n', head_len);
        if (lf == NULL) return 0;
        s = (size_t)(lf - buf) + 1;
    }
    if (s + 2 > head_len || buf[s] == '\r') return 0;
    const uint8_t *lf = memchr(buf + s, '\n', head_len - s);
    const uint8_t *colon = memchr(buf + s, ':', head_len - s);
    if (lf == NULL || colon == NULL || colon > lf) return 0;
    size_t c = (size_t)(colon - buf), vs = c + 1, ve = (size_t)(lf - buf);
    if (ve > vs && buf[ve - 1] == '\r') ve--;
    while (vs < ve && is_ows(buf[vs])) vs++;
    while (ve > vs && is_ows(buf[ve - 1])) ve--;
    *name = (lmw_span){(uint32_t)s, (uint32_t)(c - s)};
    *value = (lmw_span){(uint32_t)vs, (uint32_t)(ve - vs)};
    *pos = (uint32_t)(lf - buf) + 1;
    return 1;
}

int lmw_token_list_has(const uint8_t *list, size_t list_len, const uint8_t *token,
                       size_t token_len) {
    size_t i = 0;
    while (i < list_len) {
        while (i < list_len && (is_ows(list[i]) || list[i] == ',')) i++;
        size_t s = i;
        while (i < list_len && list[i] != ',') i++;
        size_t e = i;
        while (e > s && is_ows(list[e - 1])) e--;
        if (e - s == token_len) {
            size_t k = 0;
            while (k < token_len && lower(list[s + k]) == lower(token[k])) k++;
            if (k == token_len) return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------
 * Sec-WebSocket-Accept: SHA-1 (RFC 3174 / FIPS 180-4) and base64 (RFC 4648)
 * ---------------------------------------------------------------------------------- */

typedef struct {
    uint32_t h[5];
    uint64_t total;
    uint8_t block[64];
    size_t used;
} sha1_ctx;

static inline uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static inline uint32_t load_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The four round functions and constants of FIPS 180-4 section 4.1.1; F1 and F3 in
 * forms that need fewer operations than the textbook ones (same values). */
#define SHA1_F1(b, c, d) ((d) ^ ((b) & ((c) ^ (d))))
#define SHA1_F2(b, c, d) ((b) ^ (c) ^ (d))
#define SHA1_F3(b, c, d) (((b) & (c)) | ((d) & ((b) | (c))))
#define SHA1_K1 0x5A827999u
#define SHA1_K2 0x6ED9EBA1u
#define SHA1_K3 0x8F1BBCDCu
#define SHA1_K4 0xCA62C1D6u

/* The message schedule lives in a 16-word ring: W(t) for t >= 16 replaces w[t % 16]. */
#define SHA1_W(t)                                                                                  \
    (w[(t)&15] = rol32(w[((t) + 13) & 15] ^ w[((t) + 8) & 15] ^ w[((t) + 2) & 15] ^ w[(t)&15], 1))

/* One round with the variables renamed instead of moved: the caller rotates the
 * argument order, so five consecutive rounds bring the names back to a, b, c, d, e. */
#define SHA1_R(a, b, c, d, e, f, k, wt)                                                            \
    do {                                                                                           \
        e += rol32(a, 5) + f(b, c, d) + (k) + (wt);                                                \
        b = rol32(b, 30);                                                                          \
    } while (0)

#define SHA1_R5(t, f, k, W)                                                                        \
    SHA1_R(a, b, c, d, e, f, k, W(t));                                                             \
    SHA1_R(e, a, b, c, d, f, k, W((t) + 1));                                                       \
    SHA1_R(d, e, a, b, c, f, k, W((t) + 2));                                                       \
    SHA1_R(c, d, e, a, b, f, k, W((t) + 3));                                                       \
    SHA1_R(b, c, d, e, a, f, k, W((t) + 4))

#define SHA1_W0(t) w[t]

/* sha1_compress runs the 80 rounds, fully unrolled, on the 16 message words w (which
 * it overwrites with the schedule) and adds the result into h. */
static inline void sha1_compress(uint32_t h[5], uint32_t w[16]) {
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    SHA1_R5(0, SHA1_F1, SHA1_K1, SHA1_W0);
    SHA1_R5(5, SHA1_F1, SHA1_K1, SHA1_W0);
    SHA1_R5(10, SHA1_F1, SHA1_K1, SHA1_W0);
    SHA1_R(a, b, c, d, e, SHA1_F1, SHA1_K1, w[15]);
    SHA1_R(e, a, b, c, d, SHA1_F1, SHA1_K1, SHA1_W(16));
    SHA1_R(d, e, a, b, c, SHA1_F1, SHA1_K1, SHA1_W(17));
    SHA1_R(c, d, e, a, b, SHA1_F1, SHA1_K1, SHA1_W(18));
    SHA1_R(b, c, d, e, a, SHA1_F1, SHA1_K1, SHA1_W(19));
    SHA1_R5(20, SHA1_F2, SHA1_K2, SHA1_W);
    SHA1_R5(25, SHA1_F2, SHA1_K2, SHA1_W);
    SHA1_R5(30, SHA1_F2, SHA1_K2, SHA1_W);
    SHA1_R5(35, SHA1_F2, SHA1_K2, SHA1_W);
    SHA1_R5(40, SHA1_F3, SHA1_K3, SHA1_W);
    SHA1_R5(45, SHA1_F3, SHA1_K3, SHA1_W);
    SHA1_R5(50, SHA1_F3, SHA1_K3, SHA1_W);
    SHA1_R5(55, SHA1_F3, SHA1_K3, SHA1_W);
    SHA1_R5(60, SHA1_F2, SHA1_K4, SHA1_W);
    SHA1_R5(65, SHA1_F2, SHA1_K4, SHA1_W);
    SHA1_R5(70, SHA1_F2, SHA1_K4, SHA1_W);
    SHA1_R5(75, SHA1_F2, SHA1_K4, SHA1_W);
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[16];
    for (int t = 0; t < 16; t++) w[t] = load_be32(p + 4 * t);
    sha1_compress(h, w);
}

static void sha1_init(sha1_ctx *c) {
    static const uint32_t iv[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

static void sha1_update(sha1_ctx *c, const uint8_t *p, size_t n) {
    c->total += n;
    while (n > 0) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used == 64) {
            sha1_block(c->h, c->block);
            c->used = 0;
        }
    }
}

static void sha1_final(sha1_ctx *c, uint8_t out[20]) {
    uint64_t bits = c->total * 8;
    uint8_t pad[72] = {0x80};
    size_t pad_len = (c->used < 56 ? 56 : 120) - c->used;
    for (int i = 0; i < 8; i++) pad[pad_len + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(c, pad, pad_len + 8);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64_encode writes 4 * ceil(n / 3) characters, padded with '='. */
static void base64_encode(const uint8_t *in, size_t n, uint8_t *out) {
    size_t i = 0;
    for (; i + 3 <= n; i += 3, out += 4) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[0] = (uint8_t)b64_alphabet[v >> 18];
        out[1] = (uint8_t)b64_alphabet[(v >> 12) & 63];
        out[2] = (uint8_t)b64_alphabet[(v >> 6) & 63];
        out[3] = (uint8_t)b64_alphabet[v & 63];
    }
    if (n - i == 1) {
        out[0] = (uint8_t)b64_alphabet[in[i] >> 2];
        out[1] = (uint8_t)b64_alphabet[(in[i] & 3) << 4];
        out[2] = out[3] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 8 | in[i + 1];
        out[0] = (uint8_t)b64_alphabet[v >> 10];
        out[1] = (uint8_t)b64_alphabet[(v >> 4) & 63];
        out[2] = (uint8_t)b64_alphabet[(v << 2) & 63];
        out[3] = '=';
    }
}

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* The GUID as big-endian words: bytes 24..59 of the message when the key has the usual
 * 24 characters. */
static const uint32_t ws_guid_words[9] = {0x32353845, 0x41464135, 0x2D453931,
                                          0x342D3437, 0x44412D39, 0x3543412D,
                                          0x43354142, 0x30444338, 0x35423131};

void lmw_accept_key(const uint8_t *key, size_t key_len, uint8_t *out28) {
    if (LMW_LIKELY(key_len == 24)) {
        /* 24 + 36 = 60 bytes: the first block is the key, the GUID and the 0x80 that
         * starts the padding; the second holds only the length, 480 bits. */
        uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
        uint32_t w[16];
        for (int t = 0; t < 6; t++) w[t] = load_be32(key + 4 * t);
        for (int t = 0; t < 9; t++) w[6 + t] = ws_guid_words[t];
        w[15] = 0x80000000u;
        sha1_compress(h, w);
        memset(w, 0, sizeof w);
        w[15] = 60 * 8;
        sha1_compress(h, w);
        uint8_t digest[20];
        for (int i = 0; i < 5; i++) {
            digest[4 * i] = (uint8_t)(h[i] >> 24);
            digest[4 * i + 1] = (uint8_t)(h[i] >> 16);
            digest[4 * i + 2] = (uint8_t)(h[i] >> 8);
            digest[4 * i + 3] = (uint8_t)h[i];
        }
        base64_encode(digest, 20, out28);
        return;
    }
    sha1_ctx c;
    uint8_t digest[20];
    sha1_init(&c);
    sha1_update(&c, key, key_len);
    sha1_update(&c, (const uint8_t *)ws_guid, sizeof ws_guid - 1);
    sha1_final(&c, digest);
    base64_encode(digest, 20, out28);
}

#define LIT(s) s, sizeof(s) - 1

static uint8_t *put(uint8_t *p, const char *s, size_t n) {
    memcpy(p, s, n);
    return p + n;
}

int lmw_build_101(const uint8_t *key, size_t key_len, const uint8_t *protocol, size_t protocol_len,
                  int pmd, uint8_t *out, size_t cap) {
    static const char head[] = "HTTP/1.1 101 Switching Protocols\r\n"
                               "Upgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Accept: ";
    static const char proto[] = "\r\nSec-WebSocket-Protocol: ";
    static const char deflate[] = "\r\nSec-WebSocket-Extensions: permessage-deflate; "
                                  "server_no_context_takeover; client_no_context_takeover";
    static const char bits[] = "; server_max_window_bits=";
    int server_bits = pmd & 15;
    size_t need = sizeof head - 1 + 28 + 4;
    if (protocol_len > 0) {
        if (!span_of_class(protocol, protocol_len, C_TCHAR))
            return LMW_ERROR; /* never let a protocol name inject a header */
        need += sizeof proto - 1 + protocol_len;
    }
    if (pmd) need += sizeof deflate - 1 + (server_bits ? sizeof bits - 1 + 2 : 0);
    if (need > cap || need > INT32_MAX) return LMW_ERROR;
    uint8_t *p = put(out, LIT(head));
    lmw_accept_key(key, key_len, p);
    p += 28;
    if (protocol_len > 0) {
        p = put(p, LIT(proto));
        p = put(p, (const char *)protocol, protocol_len);
    }
    if (pmd) {
        p = put(p, LIT(deflate));
        if (server_bits) {
            p = put(p, LIT(bits));
            if (server_bits >= 10) *p++ = '1';
            *p++ = (uint8_t)('0' + server_bits % 10);
        }
    }
    p = put(p, LIT("\r\n\r\n"));
    return (int)(p - out);
}

/* ------------------------------------------------------------------------------------
 * permessage-deflate offers (RFC 7692 section 7.1, the list syntax of RFC 6455 9.1)
 * ---------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p, *end;
} cursor;

static void skip_ows(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t')) c->p++;
}

static size_t take_token(cursor *c, const uint8_t **tok) {
    skip_ows(c);
    *tok = c->p;
    while (c->p < c->end && (char_class[*c->p] & C_TCHAR)) c->p++;
    return (size_t)(c->p - *tok);
}

/* take_value reads a parameter value, a token or a quoted string (section 7.1: its
 * unescaped text must be a token), into out (at most 3 bytes kept: longer is invalid
 * anyway). Returns its length, or -1 for a syntax error. */
static int take_value(cursor *c, uint8_t out[3]) {
    skip_ows(c);
    size_t n = 0;
    if (c->p < c->end && *c->p == '"') {
        for (c->p++;; c->p++) {
            if (c->p >= c->end) return -1;
            if (*c->p == '"') break;
            if (*c->p == '\\' && ++c->p >= c->end) return -1;
            if (n < 3) out[n] = *c->p;
            n++;
        }
        c->p++;
    } else {
        const uint8_t *tok;
        n = take_token(c, &tok);
        if (!n) return -1;
        memcpy(out, tok, n < 3 ? n : 3);
    }
    return n > 3 ? 3 : (int)n;
}

/* window_bits reads 8-15 (no leading zero, section 7.1.2), or returns 0. */
static int window_bits(const uint8_t *v, int n) {
    if (n == 1 && (v[0] == '8' || v[0] == '9')) return v[0] - '0';
    if (n == 2 && v[0] == '1' && v[1] >= '0' && v[1] <= '5') return 10 + v[1] - '0';
    return 0;
}

static int name_is(const uint8_t *tok, size_t n, const char *name) {
    return n == strlen(name) && memcmp(tok, name, n) == 0;
}

enum { P_SERVER_NCT = 1, P_CLIENT_NCT = 2, P_SERVER_BITS = 4, P_CLIENT_BITS = 8 };

/* offer_param judges one parameter of a permessage-deflate offer: the bit it sets in
 * *seen, or 0 when it makes the offer one to decline. */
static int offer_param(const uint8_t *name, size_t n, const uint8_t *v, int vlen,
                       int *server_bits) {
    if (name_is(name, n, "server_no_context_takeover")) return vlen < 0 ? P_SERVER_NCT : 0;
    if (name_is(name, n, "client_no_context_takeover")) return vlen < 0 ? P_CLIENT_NCT : 0;
    if (name_is(name, n, "server_max_window_bits")) {
        *server_bits = vlen < 0 ? 0 : window_bits(v, vlen);
        return *server_bits ? P_SERVER_BITS : 0;
    }
    if (name_is(name, n, "client_max_window_bits"))
        return vlen < 0 || window_bits(v, vlen) ? P_CLIENT_BITS : 0;
    return 0;
}

/* take_offer reads one element of the list (an extension and its parameters) up to the
 * next ',' or the end. Returns -1 for a syntax error, else the lmw_pmd_negotiate result
 * for it (0: another extension, or an offer declined). */
static int take_offer(cursor *c) {
    const uint8_t *name;
    size_t n = take_token(c, &name);
    if (!n) return -1;
    int ok = name_is(name, n, "permessage-deflate"), seen = 0, server_bits = 0;
    for (;;) {
        skip_ows(c);
        if (c->p >= c->end || *c->p == ',') break;
        if (*c->p != ';') return -1;
        c->p++;
        const uint8_t *param;
        size_t pn = take_token(c, &param);
        if (!pn) return -1;
        skip_ows(c);
        uint8_t v[3];
        int vlen = -1; /* no value */
        if (c->p < c->end && *c->p == '=') {
            c->p++;
            vlen = take_value(c, v);
            if (vlen < 0) return -1;
        }
        int bit = ok ? offer_param(param, pn, v, vlen, &server_bits) : 0;
        if (!bit || (seen & bit)) ok = 0;
        seen |= bit;
    }
    return ok ? LMW_PMD_ACCEPT | server_bits : 0;
}

int lmw_pmd_negotiate(const uint8_t *value, size_t len) {
    cursor c = {value, value + len};
    for (;;) {
        skip_ows(&c);
        while (c.p < c.end && (*c.p == ',' || *c.p == ' ' || *c.p == '\t')) c.p++; /* empty */
        if (c.p >= c.end) return 0;
        int r = take_offer(&c);
        if (r) return r < 0 ? 0 : r;
        if (c.p < c.end) c.p++; /* the ',' */
    }
}

/* Reject responses: X(status, reason, extra header lines, body length). Each body is
 * the reason and a newline; the static assertions below keep Content-Length honest. */
#define LMW_REJECTS(X)                                                                             \
    X(400, "Bad Request", "", 12)                                                                  \
    X(401, "Unauthorized", "", 13)                                                                 \
    X(403, "Forbidden", "", 10)                                                                    \
    X(404, "Not Found", "", 10)                                                                    \
    X(405, "Method Not Allowed", "Allow: GET\r\n", 19)                                             \
    X(408, "Request Timeout", "", 16)                                                              \
    X(413, "Content Too Large", "", 18)                                                            \
    X(426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n", 17)          \
    X(429, "Too Many Requests", "Retry-After: 1\r\n", 18)                                          \
    X(431, "Request Header Fields Too Large", "", 32)                                              \
    X(500, "Internal Server Error", "", 22)                                                        \
    X(501, "Not Implemented", "", 16)                                                              \
    X(503, "Service Unavailable", "Retry-After: 1\r\n", 20)                                        \
    X(505, "HTTP Version Not Supported", "", 27)

/* The status line, RFC 7230 section 3.1.2. */
#define STATUS_LINE(status, reason) "HTTP/1.1 " #status " " reason "\r\n"

/* 426 names Upgrade, so its Connection lists "Upgrade" after "close" (RFC 7230 6.7). */
#define REJECT_TEXT(status, reason, extra, n)                                                      \
    static const char reject_##status[] = STATUS_LINE(status, reason) extra                        \
        "Content-Type: text/plain; charset=utf-8\r\n"                                              \
        "Content-Length: " #n "\r\n"                                                               \
        "Connection: close" ADD_UPGRADE_##status "\r\n\r\n" reason "\n";                           \
    _Static_assert(sizeof(reason "\n") - 1 == n, "Content-Length of " #status);

#define ADD_UPGRADE_400 ""
#define ADD_UPGRADE_401 ""
#define ADD_UPGRADE_403 ""
#define ADD_UPGRADE_404 ""
#define ADD_UPGRADE_405 ""
#define ADD_UPGRADE_408 ""
#define ADD_UPGRADE_413 ""
#define ADD_UPGRADE_426 ", Upgrade"
#define ADD_UPGRADE_429 ""
#define ADD_UPGRADE_431 ""
#define ADD_UPGRADE_500 ""
#define ADD_UPGRADE_501 ""
#define ADD_UPGRADE_503 ""
#define ADD_UPGRADE_505 ""

LMW_REJECTS(REJECT_TEXT)

#define REJECT_CASE(status, reason, extra, n)                                                      \
    case status:                                                                                   \
        *len = sizeof reject_##status - 1;                                                         \
        return (const uint8_t *)reject_##status;

const uint8_t *lmw_reject_response(int status, size_t *len) {
    switch (status) {
        LMW_REJECTS(REJECT_CASE)
    default:
        *len = 0;
        return NULL;
    }
}

/* ------------------------------------------------------------------------------------
 * Frames (RFC 6455 section 5.2)
 * ---------------------------------------------------------------------------------- */

static int frame_error(lmw_frame *f) {
    f->close_code = 1002;
    return LMW_ERROR;
}

/* Opcodes defined by RFC 6455 section 5.2: 0-2 and 8-10. */
#define KNOWN_OPCODES 0x0707u

int lmw_parse_frame(const uint8_t *buf, size_t len, uint8_t rsv_allowed, int require_mask,
                    lmw_frame *f) {
    memset(f, 0, sizeof *f);
    if (len < 1) return LMW_INCOMPLETE;
    uint8_t b0 = buf[0];
    f->fin = b0 >> 7;
    f->rsv = (b0 >> 4) & 7;
    f->opcode = b0 & 15;
    if ((f->rsv & ~rsv_allowed) || !((KNOWN_OPCODES >> f->opcode) & 1)) return frame_error(f);
    if ((f->opcode & 8) && !f->fin) return frame_error(f);
    if (len < 2) return LMW_INCOMPLETE;
    uint8_t b1 = buf[1], len7 = b1 & 127;
    f->masked = b1 >> 7;
    if (((f->opcode & 8) && len7 > LMW_CONTROL_PAYLOAD_MAX) || (require_mask && !f->masked))
        return frame_error(f);
    size_t ext = len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
    size_t header_len = 2 + ext + (f->masked ? 4 : 0);
    if (len < 2 + ext) /* fail fast on the length before the mask arrives */
        return LMW_INCOMPLETE;
    uint64_t plen = len7;
    if (ext == 2) {
        plen = (uint64_t)buf[2] << 8 | buf[3];
    } else if (ext == 8) {
        plen = 0;
        for (int i = 0; i < 8; i++) plen = plen << 8 | buf[2 + i];
        if (plen >> 63) return frame_error(f);
    }
    if (len < header_len) return LMW_INCOMPLETE;
    if (f->masked) memcpy(f->mask, buf + 2 + ext, 4);
    f->payload_len = plen;
    f->header_len = (uint32_t)header_len;
    return (int)header_len;
}

void lmw_unmask(uint8_t *p, size_t n, const uint8_t *mask, size_t phase) {
    uint8_t rot[12];
    for (int i = 0; i < 12; i++) rot[i] = mask[(phase + (size_t)i) & 3];
    size_t i = 0;
    /* Head: reach an 8-byte boundary so the word stores never straddle cache lines. */
    while (i < n && ((uintptr_t)(p + i) & 7)) p[i] ^= rot[i & 3], i++;
    uint64_t key = load64(rot + (i & 3));
    for (; i + 32 <= n; i += 32) {
        store64(p + i, load64(p + i) ^ key);
        store64(p + i + 8, load64(p + i + 8) ^ key);
        store64(p + i + 16, load64(p + i + 16) ^ key);
        store64(p + i + 24, load64(p + i + 24) ^ key);
    }
    for (; i + 8 <= n; i += 8) store64(p + i, load64(p + i) ^ key);
    for (; i < n; i++) p[i] ^= rot[i & 3];
}

/* ------------------------------------------------------------------------------------
 * UTF-8 (RFC 3629 section 4; Unicode table 3-7, "well-formed byte sequences")
 *
 * The state is 0 between characters. Inside a character it packs what the next byte
 * must be: bits 16-17 the continuation bytes still missing, bits 8-15 the lowest and
 * bits 0-7 the highest allowed value of the next byte. The lead byte alone decides the
 * first range (that is where overlongs, surrogates and values above U+10FFFF are
 * excluded); every later continuation byte is 0x80-0xBF. After an error the state
 * stays UTF8_DEAD, so feeding more bytes keeps failing at offset 0.
 * ---------------------------------------------------------------------------------- */

#define UTF8_STATE(need, lo, hi) (((uint32_t)(need) << 16) | ((lo) << 8) | (hi))
#define UTF8_DEAD 0xFFFFFFFFu

/* utf8_lead maps a byte that starts a character to the state after it: 0 for ASCII,
 * UTF8_DEAD for bytes that never start a character. */
static uint32_t utf8_lead(uint8_t b) {
    if (b < 0x80) return 0;
    if (b < 0xC2) return UTF8_DEAD; /* continuation, or C0/C1 (overlong 2-byte forms) */
    if (b < 0xE0) return UTF8_STATE(1, 0x80, 0xBF);
    if (b == 0xE0) return UTF8_STATE(2, 0xA0, 0xBF); /* excludes overlong 3-byte forms */
    if (b == 0xED) return UTF8_STATE(2, 0x80, 0x9F); /* excludes surrogates */
    if (b < 0xF0) return UTF8_STATE(2, 0x80, 0xBF);
    if (b == 0xF0) return UTF8_STATE(3, 0x90, 0xBF); /* excludes overlong 4-byte forms */
    if (b < 0xF4) return UTF8_STATE(3, 0x80, 0xBF);
    if (b == 0xF4) return UTF8_STATE(3, 0x80, 0x8F); /* stays at or below U+10FFFF */
    return UTF8_DEAD;
}

/* utf8_step returns the state after byte b, or UTF8_DEAD. */
static inline uint32_t utf8_step(uint32_t st, uint8_t b) {
    if (st == 0) return utf8_lead(b);
    if (b < ((st >> 8) & 0xFF) || b > (st & 0xFF)) return UTF8_DEAD;
    uint32_t need = (st >> 16) - 1;
    return need ? UTF8_STATE(need, 0x80, 0xBF) : 0;
}

/* ascii_run returns how many bytes from s[i] on are ASCII, checking eight at a time. */
static inline size_t ascii_end(const uint8_t *s, size_t i, size_t n) {
    for (; i + 32 <= n; i += 32) {
        uint64_t any =
            (load64(s + i) | load64(s + i + 8) | load64(s + i + 16) | load64(s + i + 24)) & HIGHS;
        if (any) break;
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t hi = load64(s + i) & HIGHS;
        if (hi) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            return i + ((size_t)__builtin_ctzll(hi) >> 3);
#else
            break;
#endif
        }
    }
    while (i < n && s[i] < 0x80) i++;
    return i;
}

int64_t lmw_utf8_check(uint32_t *state, const uint8_t *s, size_t n) {
    uint32_t st = *state;
    size_t i = 0;
    if (st == UTF8_DEAD) return n > 0 ? 0 : -1;
    while (i < n) {
        if (st == 0) {
            i = ascii_end(s, i, n);
            if (i == n) break;
        }
        st = utf8_step(st, s[i]);
        if (LMW_UNLIKELY(st == UTF8_DEAD)) {
            *state = UTF8_DEAD;
            return (int64_t)i;
        }
        i++;
    }
    *state = st;
    return -1;
}

/* ------------------------------------------------------------------------------------
 * Messages (RFC 6455 sections 5.4 and 8.1)
 * ---------------------------------------------------------------------------------- */

int lmw_message_frame(lmw_message_state *m, const lmw_frame *f, uint64_t max_message) {
    if (f->opcode & 8) return 0;
    if (f->opcode == LMW_OP_CONTINUATION) {
        if (m->opcode == 0 || (f->rsv & 4)) return 1002;
    } else {
        if (m->opcode != 0) return 1002;
        m->opcode = f->opcode;
        m->length = 0;
        m->utf8 = LMW_UTF8_ACCEPT;
        m->compressed = (f->rsv & 4) != 0;
    }
    if (m->length > max_message || f->payload_len > max_message - m->length) return 1009;
    m->length += f->payload_len;
    return 0;
}

int lmw_message_payload(lmw_message_state *m, const uint8_t *p, size_t n) {
    if (m->opcode != LMW_OP_TEXT || m->compressed) return 0;
    return lmw_utf8_check(&m->utf8, p, n) >= 0 ? 1007 : 0;
}

int lmw_message_frame_end(lmw_message_state *m, int fin) {
    if (!fin) return 0;
    int code = (m->opcode == LMW_OP_TEXT && m->utf8 != LMW_UTF8_ACCEPT) ? 1007 : 0;
    memset(m, 0, sizeof *m);
    return code;
}

int lmw_build_header(uint8_t *out, int fin, int opcode, uint64_t len) {
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 15));
    if (len < 126) {
        out[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        return 4;
    }
    out[1] = 127;
    for (int i = 0; i < 8; i++) out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    return 10;
}

int lmw_close_code_valid(int code) {
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
           (code >= 3000 && code <= 4999);
}

int lmw_parse_close(const uint8_t *p, size_t n, uint16_t *code) {
    if (n == 0) {
        *code = 1005;
        return 0;
    }
    if (n == 1) return 1002;
    int c = p[0] << 8 | p[1];
    if (!lmw_close_code_valid(c)) return 1002;
    uint32_t st = LMW_UTF8_ACCEPT;
    if (lmw_utf8_check(&st, p + 2, n - 2) >= 0 || st != LMW_UTF8_ACCEPT) return 1007;
    *code = (uint16_t)c;
    return 0;
}

int lmw_build_close_payload(uint8_t *out, int code, const uint8_t *reason, size_t reason_len) {
    if (!lmw_close_code_valid(code) || reason_len > LMW_CLOSE_REASON_MAX) return LMW_ERROR;
    uint32_t st = LMW_UTF8_ACCEPT;
    if (lmw_utf8_check(&st, reason, reason_len) >= 0 || st != LMW_UTF8_ACCEPT) return LMW_ERROR;
    out[0] = (uint8_t)(code >> 8);
    out[1] = (uint8_t)code;
    if (reason_len) memcpy(out + 2, reason, reason_len);
    return (int)(reason_len + 2);
}
