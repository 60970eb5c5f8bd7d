/* _tls_keys.c - the pieces of the TLS 1.3 key schedule a record layer needs after the
 * handshake (RFC 8446 section 7): HKDF-Expand-Label (7.1), the traffic key and IV of a
 * traffic secret (7.3), and the next-generation secret of a KeyUpdate (7.2). The handshake's
 * own schedule is OpenSSL's; it hands over the application traffic secrets (_tls_conn.c).
 * Pure: no socket, no connection.
 */
#include <pthread.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>

#include "_tls.h"
#include "lmw.h"

#define LABEL_PREFIX "tls13 "
#define MAX_HASH 48

/* HMAC contexts, one per hash and thread, made once: the digest is fetched once, not per call
 * (the key of each record is derived when it is sealed or opened, see lmw__tls_dir_key). */
static EVP_MAC *hmac;
static pthread_once_t hmac_once = PTHREAD_ONCE_INIT;
static __thread EVP_MAC_CTX *hmac_ctx[2];

static void fetch_hmac(void) { hmac = EVP_MAC_fetch(NULL, "HMAC", NULL); }

static EVP_MAC_CTX *hmac_of(int sha384) {
    if (hmac_ctx[sha384]) return hmac_ctx[sha384];
    pthread_once(&hmac_once, fetch_hmac);
    EVP_MAC_CTX *c = hmac ? EVP_MAC_CTX_new(hmac) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, sha384 ? "SHA384" : "SHA256", 0),
        OSSL_PARAM_construct_end()};
    if (c && EVP_MAC_CTX_set_params(c, params) != 1) {
        EVP_MAC_CTX_free(c);
        c = NULL;
    }
    return hmac_ctx[sha384] = c;
}

/* hkdf_expand is HKDF-Expand (RFC 5869 section 2.3) with SHA-256, or SHA-384 when sha384. */
static int hkdf_expand(int sha384, const uint8_t *prk, size_t prk_len, const uint8_t *info,
                       size_t info_len, uint8_t *out, size_t out_len) {
    EVP_MAC_CTX *c = hmac_of(sha384);
    size_t hl = sha384 ? 48 : 32;
    if (!c || out_len > 255 * hl) return LMW_ERROR;
    uint8_t t[MAX_HASH], counter;
    size_t t_len = 0;
    for (counter = 1; out_len; counter++) { /* T(i) = HMAC(PRK, T(i-1) | info | i) */
        if (EVP_MAC_init(c, prk, prk_len, NULL) != 1 || EVP_MAC_update(c, t, t_len) != 1 ||
            EVP_MAC_update(c, info, info_len) != 1 || EVP_MAC_update(c, &counter, 1) != 1 ||
            EVP_MAC_final(c, t, &t_len, sizeof t) != 1)
            return LMW_ERROR;
        size_t take = out_len < t_len ? out_len : t_len;
        memcpy(out, t, take);
        out += take;
        out_len -= take;
    }
    return 0;
}

int lmw_tls_expand_label(int sha384, const uint8_t *secret, size_t secret_len, const char *label,
                         const uint8_t *context, size_t context_len, uint8_t *out, size_t out_len) {
    size_t label_len = strlen(label), prefix = sizeof LABEL_PREFIX - 1;
    if (out_len > 0xffff || prefix + label_len > 255 || context_len > 255) return LMW_ERROR;
    uint8_t info[2 + 1 + 255 + 1 + 255]; /* struct HkdfLabel, RFC 8446 section 7.1 */
    size_t n = 0;
    info[n++] = (uint8_t)(out_len >> 8);
    info[n++] = (uint8_t)out_len;
    info[n++] = (uint8_t)(prefix + label_len);
    memcpy(info + n, LABEL_PREFIX, prefix);
    n += prefix;
    memcpy(info + n, label, label_len);
    n += label_len;
    info[n++] = (uint8_t)context_len;
    if (context_len) memcpy(info + n, context, context_len);
    n += context_len;
    return hkdf_expand(sha384 != 0, secret, secret_len, info, n, out, out_len);
}

/* lmw__tls_hash_len is the hash length of a suite: SHA-384 for AES-256-GCM, else SHA-256. */
int lmw__tls_hash_len(int suite) { return suite == TLS_SUITE_AES256_GCM ? 48 : 32; }

static size_t key_len(int suite) { return suite == TLS_SUITE_AES128_GCM ? 16 : 32; }

/* lmw__tls_dir_set makes secret the direction's traffic secret and derives its IV (RFC 8446
 * section 7.3); the sequence number starts again at 0 (section 5.3). The key is not kept: it is
 * derived again for each seal or open (lmw__tls_dir_key), CPU while a connection works instead
 * of 32 bytes per direction of every idle one. */
int lmw__tls_dir_set(lmw_tls_dir *d, int suite, const uint8_t *secret) {
    int hl = lmw__tls_hash_len(suite);
    uint8_t iv[TLS_NONCE];
    if (lmw_tls_expand_label(hl == 48, secret, (size_t)hl, "iv", NULL, 0, iv, TLS_NONCE) < 0)
        return LMW_ERROR;
    memset(d, 0, sizeof *d);
    memcpy(d->secret, secret, (size_t)hl);
    memcpy(d->iv, iv, sizeof iv);
    return 0;
}

/* lmw__tls_dir_key derives the direction's write key (RFC 8446 section 7.3) into key (32 bytes
 * of room; 16 are used for AES-128-GCM). */
int lmw__tls_dir_key(const lmw_tls_dir *d, int suite, uint8_t *key) {
    int hl = lmw__tls_hash_len(suite);
    return lmw_tls_expand_label(hl == 48, d->secret, (size_t)hl, "key", NULL, 0, key,
                                key_len(suite));
}

/* lmw__tls_dir_update moves the direction to its next traffic secret (RFC 8446 section 7.2:
 * application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length)),
 * as a KeyUpdate asks. */
int lmw__tls_dir_update(lmw_tls_dir *d, int suite) {
    int hl = lmw__tls_hash_len(suite);
    uint8_t next[MAX_HASH];
    if (lmw_tls_expand_label(hl == 48, d->secret, (size_t)hl, "traffic upd", NULL, 0, next,
                             (size_t)hl) < 0)
        return LMW_ERROR;
    return lmw__tls_dir_set(d, suite, next);
}
