/* fuzz_tls_record - libFuzzer target for the TLS 1.3 record layer (_tls_record.c) and the key
 * schedule pieces it uses (_tls_keys.c). Input: a suite byte, a 48-byte traffic secret, a byte
 * choosing where to damage a record, then bytes that are both records to open and plaintext
 * to seal. Invariants: opening any bytes gives 0 or one of the three alerts of RFC 8446 5.2
 * and advances the sequence number only on success; what is sealed opens again under the
 * same secret to the same content type and plaintext, in exactly lmw__tls_sealed_size bytes;
 * a sealed record with one byte of its body changed never opens (bad_record_mac). */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/_tls.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

static void open_all(int suite, const uint8_t *secret, const uint8_t *data, size_t size) {
    lmw_tls_dir rd;
    CHECK(lmw__tls_dir_set(&rd, suite, secret) == 0);
    size_t off = 0;
    while (size - off >= TLS_HEADER) {
        size_t len = TLS_HEADER + ((size_t)data[off + 3] << 8 | data[off + 4]);
        if (len > size - off) len = size - off; /* a short record: its header says more */
        uint8_t *rec = malloc(len);             /* exact size: ASan sees any overread */
        CHECK(rec != NULL);
        memcpy(rec, data + off, len);
        uint64_t seq = rd.seq;
        uint8_t type = 0;
        size_t n = 0;
        int alert = lmw__tls_open(suite, &rd, rec, len, &type, &n);
        CHECK(alert == 0 || alert == TLS_ALERT_BAD_RECORD_MAC ||
              alert == TLS_ALERT_RECORD_OVERFLOW || alert == TLS_ALERT_UNEXPECTED_MESSAGE);
        CHECK(rd.seq ==
              seq + (alert == 0 || alert == TLS_ALERT_UNEXPECTED_MESSAGE ||
                     (alert == TLS_ALERT_RECORD_OVERFLOW && len - TLS_HEADER <= TLS_MAX_CIPHER)));
        if (!alert) CHECK(n <= TLS_MAX_PLAIN && n + 1 + TLS_TAG <= len - TLS_HEADER && type);
        free(rec);
        off += len;
    }
}

static void round_trip(int suite, const uint8_t *secret, uint8_t damage, const uint8_t *data,
                       size_t size) {
    lmw_tls_dir wr, rd;
    CHECK(lmw__tls_dir_set(&wr, suite, secret) == 0 && lmw__tls_dir_set(&rd, suite, secret) == 0);
    uint8_t type = size ? (uint8_t)(data[0] % 3 + TLS_CT_ALERT) : TLS_CT_APPLICATION_DATA;
    size_t cap = lmw__tls_sealed_size(size);
    uint8_t *out = malloc(cap);
    CHECK(out != NULL);
    size_t half = size / 2; /* sealed from two pieces, as a frame header and its payload */
    size_t n = lmw__tls_seal(suite, &wr, type, data, half, data + half, size - half, out);
    CHECK(n == cap);
    size_t off = 0, got = 0;
    while (off < n) {
        size_t len = TLS_HEADER + ((size_t)out[off + 3] << 8 | out[off + 4]);
        CHECK(out[off] == TLS_CT_APPLICATION_DATA && len <= n - off);
        if (off == 0 && damage) { /* one byte of the body changed: never opens */
            lmw_tls_dir copy = rd;
            uint8_t *bad = malloc(len);
            CHECK(bad != NULL);
            memcpy(bad, out, len);
            bad[TLS_HEADER + damage % (len - TLS_HEADER)] ^= 0x5a;
            uint8_t t;
            size_t m;
            CHECK(lmw__tls_open(suite, &copy, bad, len, &t, &m) == TLS_ALERT_BAD_RECORD_MAC);
            free(bad);
        }
        uint8_t t = 0;
        size_t m = 0;
        CHECK(lmw__tls_open(suite, &rd, out + off, len, &t, &m) == 0 && t == type);
        CHECK(got + m <= size && memcmp(out + off + TLS_HEADER, data + got, m) == 0);
        got += m;
        off += len;
    }
    CHECK(got == size && rd.seq == wr.seq);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 50) return 0;
    int suite = data[0] % 3 + TLS_SUITE_AES128_GCM;
    const uint8_t *secret = data + 1;
    uint8_t damage = data[49];
    data += 50;
    size -= 50;
    open_all(suite, secret, data, size);
    round_trip(suite, secret, damage, data, size < 40000 ? size : 40000);
    uint8_t next[48];
    lmw_tls_dir d;
    CHECK(lmw__tls_dir_set(&d, suite, secret) == 0 && lmw__tls_dir_update(&d, suite) == 0);
    memcpy(next, d.secret, sizeof next);
    round_trip(suite, next, damage, data, size < 2000 ? size : 2000); /* after a KeyUpdate */
    return 0;
}
