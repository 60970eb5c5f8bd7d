/* _tls_record.c - the TLS 1.3 record layer (RFC 8446 section 5) over OpenSSL's AEAD
 * primitives (EVP): one record opened in place, plaintext sealed into records. Pure: bytes in,
 * bytes out, the caller's lmw_tls_dir advanced; no socket, no allocation per record.
 *
 * Nonces (section 5.3): the direction's 64-bit sequence number, big-endian and left-padded to
 * 12 bytes, XORed with its IV. The number goes up by one per record, is reset only with a new
 * key (KeyUpdate), and a direction whose number would wrap refuses to seal or open: so no
 * (key, nonce) pair is ever used twice.
 */
#include <pthread.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "_tls.h"
#include "lmw.h"

static EVP_CIPHER *ciphers[4]; /* by suite, fetched once (an implicit fetch per record is slow) */
static pthread_once_t ciphers_once = PTHREAD_ONCE_INIT;
static __thread EVP_CIPHER_CTX *aead; /* one context per thread, re-keyed per record */

static void fetch_ciphers(void) {
    ciphers[TLS_SUITE_AES128_GCM] = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    ciphers[TLS_SUITE_AES256_GCM] = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    ciphers[TLS_SUITE_CHACHA20] = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
}

/* start readies the thread's context for one record of the direction (enc: seal) under key. */
static EVP_CIPHER_CTX *start(int suite, const lmw_tls_dir *d, const uint8_t *key, int enc) {
    if (suite < TLS_SUITE_AES128_GCM || suite > TLS_SUITE_CHACHA20) return NULL;
    pthread_once(&ciphers_once, fetch_ciphers);
    if (!ciphers[suite]) return NULL;
    if (!aead && !(aead = EVP_CIPHER_CTX_new())) return NULL;
    uint8_t nonce[TLS_NONCE];
    memcpy(nonce, d->iv, TLS_NONCE);
    for (int i = 0; i < 8; i++) nonce[TLS_NONCE - 1 - i] ^= (uint8_t)(d->seq >> (8 * i));
    if (EVP_CipherInit_ex(aead, ciphers[suite], NULL, key, nonce, enc) != 1) return NULL;
    return aead;
}

static void put_header(uint8_t *h, uint8_t type, size_t len) {
    h[0] = type;
    h[1] = 3; /* legacy_record_version 0x0303 */
    h[2] = 3;
    h[3] = (uint8_t)(len >> 8);
    h[4] = (uint8_t)len;
}

/* lmw__tls_open authenticates and decrypts the complete record at rec (header included, len
 * bytes) in place: its content is left at rec + TLS_HEADER, *plain_len bytes of it, the real
 * content type in *type (section 5.2: the padding zeros are stripped). Returns 0, or the alert
 * the peer gets: bad_record_mac, record_overflow, unexpected_message (no content type). */
int lmw__tls_open(int suite, lmw_tls_dir *d, uint8_t *rec, size_t len, uint8_t *type,
                  size_t *plain_len) {
    size_t clen = len - TLS_HEADER;
    if (clen > TLS_MAX_CIPHER) return TLS_ALERT_RECORD_OVERFLOW;
    if (clen < TLS_TAG + 1 || d->seq == UINT64_MAX) return TLS_ALERT_BAD_RECORD_MAC;
    uint8_t key[32];
    EVP_CIPHER_CTX *c = lmw__tls_dir_key(d, suite, key) == 0 ? start(suite, d, key, 0) : NULL;
    OPENSSL_cleanse(key, sizeof key);
    if (!c) return TLS_ALERT_BAD_RECORD_MAC;
    uint8_t *p = rec + TLS_HEADER;
    size_t n = clen - TLS_TAG;
    int out = 0, fin = 0;
    if (EVP_CipherUpdate(c, NULL, &out, rec, TLS_HEADER) != 1 ||
        EVP_CipherUpdate(c, p, &out, p, (int)n) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, TLS_TAG, p + n) != 1 ||
        EVP_CipherFinal_ex(c, p + out, &fin) != 1)
        return TLS_ALERT_BAD_RECORD_MAC;
    d->seq++;
    while (n && p[n - 1] == 0) n--; /* TLSInnerPlaintext: content, type, zeros */
    if (!n) return TLS_ALERT_UNEXPECTED_MESSAGE;
    if (n - 1 > TLS_MAX_PLAIN) return TLS_ALERT_RECORD_OVERFLOW;
    *type = p[n - 1];
    *plain_len = n - 1;
    return 0;
}

/* lmw__tls_sealed_size is the room lmw__tls_seal needs for n bytes of plaintext. */
size_t lmw__tls_sealed_size(size_t n) {
    size_t records = n ? (n + TLS_MAX_PLAIN - 1) / TLS_MAX_PLAIN : 1;
    return n + records * TLS_RECORD_OVERHEAD;
}

/* update_span encrypts the bytes [from, from + n) of a followed by b. */
static int update_span(EVP_CIPHER_CTX *c, const uint8_t *a, size_t alen, const uint8_t *b,
                       size_t from, size_t n, uint8_t *out) {
    int got = 0;
    if (from < alen) {
        size_t take = alen - from < n ? alen - from : n;
        if (EVP_CipherUpdate(c, out, &got, a + from, (int)take) != 1) return -1;
        out += take;
        n -= take;
        from = alen;
    }
    if (n && EVP_CipherUpdate(c, out, &got, b + (from - alen), (int)n) != 1) return -1;
    return 0;
}

/* lmw__tls_seal protects a followed by b as records of content type type (at most 2^14 bytes of
 * plaintext each, no padding) into out, which has lmw__tls_sealed_size(alen + blen) bytes.
 * Returns the bytes written, 0 when the direction may not seal (its sequence number is spent,
 * or OpenSSL failed). */
size_t lmw__tls_seal(int suite, lmw_tls_dir *d, uint8_t type, const uint8_t *a, size_t alen,
                     const uint8_t *b, size_t blen, uint8_t *out) {
    size_t total = alen + blen, done = 0, w = 0;
    uint8_t key[32];
    if (lmw__tls_dir_key(d, suite, key) < 0) return 0;
    do {
        size_t n = total - done < TLS_MAX_PLAIN ? total - done : TLS_MAX_PLAIN;
        EVP_CIPHER_CTX *c = d->seq == UINT64_MAX ? NULL : start(suite, d, key, 1);
        if (!c) {
            w = 0;
            break;
        }
        uint8_t *h = out + w;
        put_header(h, TLS_CT_APPLICATION_DATA, n + 1 + TLS_TAG);
        uint8_t *p = h + TLS_HEADER;
        int got = 0;
        if (EVP_CipherUpdate(c, NULL, &got, h, TLS_HEADER) != 1 ||
            update_span(c, a, alen, b, done, n, p) < 0 ||
            EVP_CipherUpdate(c, p + n, &got, &type, 1) != 1 ||
            EVP_CipherFinal_ex(c, p + n + 1, &got) != 1 ||
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, TLS_TAG, p + n + 1) != 1) {
            w = 0;
            break;
        }
        d->seq++;
        done += n;
        w += TLS_HEADER + n + 1 + TLS_TAG;
    } while (done < total);
    OPENSSL_cleanse(key, sizeof key);
    return w;
}
