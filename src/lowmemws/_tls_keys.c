/* _tls_keys.c - the pieces of the TLS 1.3 key schedule a record layer needs after the
 * handshake (RFC 8446 section 7): HKDF-Expand-Label (7.1), the traffic key and IV of a
 * traffic secret (7.3), and the next-generation secret of a KeyUpdate (7.2). The handshake's
 * own schedule is OpenSSL's; it hands over the application traffic secrets (_tls_conn.c).
 * Pure: no socket, no connection.
 */
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "_tls.h"
#include "lmw.h"

#define LABEL_PREFIX "tls13 "
#define MAX_HASH 48

static const EVP_MD *hash_of(int sha384) { return sha384 ? EVP_sha384() : EVP_sha256(); }

/* hkdf_expand is HKDF-Expand (RFC 5869 section 2.3) with the given hash. */
static int hkdf_expand(const EVP_MD *md, const uint8_t *prk, size_t prk_len, const uint8_t *info,
                       size_t info_len, uint8_t *out, size_t out_len) {
    size_t hl = (size_t)EVP_MD_get_size(md);
    if (out_len > 255 * hl || info_len > 512) return LMW_ERROR;
    uint8_t block[MAX_HASH + 512 + 1], t[MAX_HASH];
    size_t t_len = 0;
    for (uint8_t i = 1; out_len; i++) {
        memcpy(block, t, t_len);
        memcpy(block + t_len, info, info_len);
        block[t_len + info_len] = i;
        unsigned int n = 0;
        if (!HMAC(md, prk, (int)prk_len, block, t_len + info_len + 1, t, &n)) return LMW_ERROR;
        t_len = n;
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
    return hkdf_expand(hash_of(sha384), secret, secret_len, info, n, out, out_len);
}

/* lmw__tls_hash_len is the hash length of a suite: SHA-384 for AES-256-GCM, else SHA-256. */
int lmw__tls_hash_len(int suite) { return suite == TLS_SUITE_AES256_GCM ? 48 : 32; }

static size_t key_len(int suite) { return suite == TLS_SUITE_AES128_GCM ? 16 : 32; }

/* lmw__tls_dir_set makes secret the direction's traffic secret and derives its key and IV
 * (RFC 8446 section 7.3); the sequence number starts again at 0 (section 5.3). */
int lmw__tls_dir_set(lmw_tls_dir *d, int suite, const uint8_t *secret) {
    int hl = lmw__tls_hash_len(suite), sha384 = hl == 48;
    uint8_t key[32], iv[TLS_NONCE];
    if (lmw_tls_expand_label(sha384, secret, (size_t)hl, "key", NULL, 0, key, key_len(suite)) < 0 ||
        lmw_tls_expand_label(sha384, secret, (size_t)hl, "iv", NULL, 0, iv, TLS_NONCE) < 0)
        return LMW_ERROR;
    memset(d, 0, sizeof *d);
    memcpy(d->secret, secret, (size_t)hl);
    memcpy(d->key, key, sizeof key);
    memcpy(d->iv, iv, sizeof iv);
    return 0;
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
