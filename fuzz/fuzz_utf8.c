/* fuzz_utf8 - libFuzzer target for lmw_utf8_check. Invariants: the result is -1 or an
 * offset inside the input; a byte-at-a-time pass and a split pass agree with one pass;
 * the answer matches a direct reading of RFC 3629 written independently below. */
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/lmw.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

/* reference decodes code points and returns the offset of the first byte at which the
 * input can no longer be valid, -1 if valid, -2 if it ends inside a character. */
static int64_t reference(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        int need;
        uint32_t cp, min;
        if ((b & 0xE0) == 0xC0) {
            need = 1, cp = b & 0x1F, min = 0x80;
        } else if ((b & 0xF0) == 0xE0) {
            need = 2, cp = b & 0x0F, min = 0x800;
        } else if ((b & 0xF8) == 0xF0) {
            need = 3, cp = b & 0x07, min = 0x10000;
        } else {
            return (int64_t)i;
        }
        size_t start = i++;
        uint32_t lo0 = cp << (6 * need), hi0 = lo0 | ((1u << (6 * need)) - 1);
        if (hi0 < min || lo0 > 0x10FFFF)
            return (int64_t)start; /* no continuation can save this lead byte */
        for (int k = 0; k < need; k++, i++) {
            if (i == n) return -2;
            if ((s[i] & 0xC0) != 0x80) return (int64_t)i;
            cp = cp << 6 | (s[i] & 0x3F);
            /* decide as early as the prefix allows, as the validator must */
            int left = need - k - 1;
            uint32_t lo = cp << (6 * left), hi = lo | ((1u << (6 * left)) - 1);
            if (hi < min || lo > 0x10FFFF || (lo >= 0xD800 && hi <= 0xDFFF)) return (int64_t)i;
        }
    }
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint32_t st = LMW_UTF8_ACCEPT;
    int64_t whole = lmw_utf8_check(&st, data, size);
    CHECK(whole == -1 || (whole >= 0 && (size_t)whole < size));
    int64_t want = reference(data, size);
    if (want == -2)
        CHECK(whole == -1 && st != LMW_UTF8_ACCEPT);
    else if (want == -1)
        CHECK(whole == -1 && st == LMW_UTF8_ACCEPT);
    else
        CHECK(whole == want);

    uint32_t bs = LMW_UTF8_ACCEPT;
    int64_t bytewise = -1;
    for (size_t i = 0; i < size && bytewise < 0; i++)
        if (lmw_utf8_check(&bs, data + i, 1) == 0) bytewise = (int64_t)i;
    CHECK(bytewise == whole);
    if (whole < 0) CHECK(bs == st);

    size_t cut = size ? data[0] % (size + 1) : 0;
    uint32_t ss = LMW_UTF8_ACCEPT;
    int64_t a = lmw_utf8_check(&ss, data, cut), split = a;
    if (a < 0) {
        int64_t b = lmw_utf8_check(&ss, data + cut, size - cut);
        split = b < 0 ? -1 : (int64_t)cut + b;
    }
    CHECK(split == whole);
    return 0;
}
