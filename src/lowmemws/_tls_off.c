/* _tls_off.c - the TLS entry points of a build without OpenSSL (libssl-dev was not found when
 * lowmemws was compiled): plain TCP works as always; asking for TLS gets a clear error. No
 * server of this build has TLS state, so the internal hooks are never reached. */
#include <stdio.h>

#include "_runtime.h"

int lmw_tls_available(void) { return 0; }

int lmw_tls_configure(lmw_server *s, const char *certfile, const char *keyfile, char *err,
                      size_t err_len) {
    snprintf(err, err_len,
             "lowmemws was built without OpenSSL: install libssl-dev (Debian/Ubuntu) or "
             "openssl-devel, then reinstall lowmemws");
    return LMW_ERROR;
}

int lmw_tls_expand_label(int sha384, const uint8_t *secret, size_t secret_len, const char *label,
                         const uint8_t *context, size_t context_len, uint8_t *out, size_t out_len) {
    return LMW_ERROR;
}

int lmw__tls_start(lmw_server *s, int fd) { return LMW_ERROR; }
void lmw__tls_forget(lmw_server *s, int fd) {}
void lmw__tls_server_free(lmw_server *s) {}
int lmw__tls_seal_out(lmw_server *s, lmw_tls_conn *tc, int kind, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t **out, size_t *out_len) {
    return LMW_ERROR;
}
void lmw__tls_scratch_done(lmw_server *s) {}
int lmw__tls_keep_partial(lmw_server *s, lmw_tls_conn *tc, const uint8_t *p, size_t n) {
    return LMW_ERROR;
}
void lmw__tls_drop_partial(lmw_server *s, lmw_tls_conn *tc) {}
int lmw__tls_read(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, lmw_tls_plain *out) {
    return 0;
}
void lmw__tls_read_done(lmw_server *s, int fd, uint32_t gen, lmw_tls_conn *tc) {}
