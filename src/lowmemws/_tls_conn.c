/* _tls_conn.c - the server's TLS context and what a TLS connection keeps (storage level, like
 * _slot.c), and sealing its output (for _output.c).
 *
 * During the handshake a connection holds an OpenSSL SSL object over two memory BIOs (the
 * loop feeds it records, _tls_input.c). When a TLS 1.3 handshake ends, OpenSSL has handed the
 * two application traffic secrets to the keylog callback; the IV of each direction is derived
 * (_tls_keys.c), the SSL object and its buffers are freed, and from then on the connection
 * keeps only its lmw_tls_conn (160 bytes, _tls_pages.c) for lowmemws's own record layer
 * (_tls_record.c). A TLS 1.2 connection keeps its SSL object, which protects its records.
 *
 * Session tickets: none (SSL_CTX_set_num_tickets 0, no session cache): a ticket would be a
 * second copy of secrets to protect, rotate and expire, and the server's first flight would
 * be followed by tickets the record layer takes over; a full handshake costs the client one
 * round trip more on reconnect, which a notification socket that stays open pays rarely.
 */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "_runtime.h"

#define TLS13_SUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
/* TLS 1.2: forward secrecy and AEAD only */
#define TLS12_CIPHERS "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
/* a read block must hold pending plaintext, a partial record and room to read */
#define TLS_MIN_READ_BUFFER (2 * TLS_MAX_RECORD + MIN_READ_SPACE)
#define SCRATCH_KEEP (4 * TLS_MAX_RECORD) /* sealing memory kept between writes */
#define TRIM_AFTER 1024                   /* TLS 1.2 connections freed between heap trims */

int lmw_tls_available(void) { return 1; }

/* ---------------------------------------------------------------- secrets from OpenSSL */

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* hex_decode reads up to cap bytes of hex at s; returns the bytes read, -1 if malformed. */
static int hex_decode(const char *s, uint8_t *out, size_t cap) {
    size_t n = 0;
    for (; s[0] && s[0] != ' '; s += 2) {
        int hi = hex_value(s[0]), lo = s[1] ? hex_value(s[1]) : -1;
        if (hi < 0 || lo < 0 || n == cap) return -1;
        out[n++] = (uint8_t)(hi << 4 | lo);
    }
    return (int)n;
}

/* keylog takes the application traffic secrets (OpenSSL's NSS key log line: LABEL
 * client_random secret) into the connection: the only way OpenSSL 3.0 hands them out. Nothing
 * is logged anywhere. */
static void keylog(const SSL *ssl, const char *line) {
    static const char client[] = "CLIENT_TRAFFIC_SECRET_0 ", server[] = "SERVER_TRAFFIC_SECRET_0 ";
    lmw_tls_conn *tc = SSL_get_app_data(ssl);
    if (!tc) return;
    int which = !strncmp(line, client, sizeof client - 1)   ? 1
                : !strncmp(line, server, sizeof server - 1) ? 2
                                                            : 0;
    if (!which) return;
    const char *secret = strchr(line + sizeof client - 1, ' ');
    if (!secret) return;
    lmw_tls_dir *d = which == 1 ? &tc->rd : &tc->wr;
    int n = hex_decode(secret + 1, d->secret, sizeof d->secret);
    if (n != 32 && n != 48) return;
    tc->hash_len = (uint8_t)n;
    tc->got_secrets |= (uint8_t)which;
}

/* ---------------------------------------------------------------- the context */

static void openssl_error(const char *what, const char *path, char *err, size_t err_len) {
    char reason[200];
    ERR_error_string_n(ERR_get_error(), reason, sizeof reason);
    ERR_clear_error();
    snprintf(err, err_len, "%s %s: %s", what, path, reason);
}

static SSL_CTX *context_new(const char *certfile, const char *keyfile, char *err, size_t err_len) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        openssl_error("TLS context", "", err, err_len);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION | SSL_OP_NO_TICKET |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_max_early_data(ctx, 0); /* no 0-RTT */
    SSL_CTX_set_recv_max_early_data(ctx, 0);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_keylog_callback(ctx, keylog);
    if (SSL_CTX_set_ciphersuites(ctx, TLS13_SUITES) != 1 ||
        SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS) != 1) {
        openssl_error("TLS cipher suites", "", err, err_len);
    } else if (SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1) {
        openssl_error("certificate", certfile, err, err_len);
    } else if (SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM) != 1) {
        openssl_error("private key", keyfile, err, err_len);
    } else if (SSL_CTX_check_private_key(ctx) != 1) {
        openssl_error("private key (does not match the certificate)", keyfile, err, err_len);
    } else {
        return ctx;
    }
    SSL_CTX_free(ctx);
    return NULL;
}

int lmw_tls_configure(lmw_server *s, const char *certfile, const char *keyfile, char *err,
                      size_t err_len) {
    if (s->cfg.read_buffer_size < TLS_MIN_READ_BUFFER) {
        snprintf(err, err_len, "TLS needs read_buffer_size >= %d", TLS_MIN_READ_BUFFER);
        return LMW_ERROR;
    }
    SSL_CTX *ctx = context_new(certfile, keyfile, err, err_len);
    if (!ctx) return LMW_ERROR;
    pthread_mutex_lock(&s->lock);
    if (!s->tls) {
        lmw_tls_server *t = calloc(1, sizeof *t);
        if (t) t->conns = calloc(s->nslots, sizeof(lmw_tls_conn *)); /* untouched: free */
        if (!t || !t->conns) {
            free(t);
            pthread_mutex_unlock(&s->lock);
            SSL_CTX_free(ctx);
            snprintf(err, err_len, "out of memory");
            return LMW_ERROR;
        }
        s->tls = t;
    }
    SSL_CTX *old = s->tls->ctx;
    s->tls->ctx = ctx;
    pthread_mutex_unlock(&s->lock);
    SSL_CTX_free(old); /* handshakes in flight hold their own reference */
    return 0;
}

void lmw__tls_server_free(lmw_server *s) {
    if (!s->tls) return;
    SSL_CTX_free(s->tls->ctx);
    lmw__tls_pages_free(s->tls);
    free(s->tls->conns);
    free(s->tls->scratch);
    free(s->tls);
    s->tls = NULL;
}

/* ---------------------------------------------------------------- per connection */

/* lmw__tls_start gives a connection just accepted its TLS state and an SSL object for the
 * handshake (freed when it ends). Returns 0 or LMW_ERROR (out of memory). */
int lmw__tls_start(lmw_server *s, int fd) {
    lmw_tls_conn *tc = lmw__tls_conn_new(s->tls);
    SSL *ssl = tc ? SSL_new(s->tls->ctx) : NULL;
    BIO *rb = ssl ? BIO_new(BIO_s_mem()) : NULL, *wb = rb ? BIO_new(BIO_s_mem()) : NULL;
    if (!wb) {
        BIO_free(rb);
        SSL_free(ssl);
        if (tc) lmw__tls_conn_free(s->tls, tc);
        s->stats->errors[LMW_ERR_NOMEM]++;
        return LMW_ERROR;
    }
    SSL_set_bio(ssl, rb, wb);
    SSL_set_accept_state(ssl);
    SSL_set_app_data(ssl, tc);
    tc->ssl = ssl;
    s->tls->conns[fd] = tc;
    return 0;
}

void lmw__tls_drop_partial(lmw_server *s, lmw_tls_conn *tc) {
    if (!tc->rec) return;
    free(tc->rec);
    s->stats->spill_bytes -= tc->rec_len;
    tc->rec = NULL;
    tc->rec_len = 0;
}

/* lmw__tls_keep_partial keeps a record that has partly arrived (n <= TLS_MAX_RECORD bytes),
 * under the spill budget like any partial input. Returns 0 or LMW_ERROR. */
int lmw__tls_keep_partial(lmw_server *s, lmw_tls_conn *tc, const uint8_t *p, size_t n) {
    lmw__tls_drop_partial(s, tc);
    if (!n) return 0;
    if (n > TLS_MAX_RECORD || s->stats->spill_bytes + n > s->cfg.spill_budget) return LMW_ERROR;
    tc->rec = malloc(n);
    if (!tc->rec) return LMW_ERROR;
    memcpy(tc->rec, p, n);
    tc->rec_len = (uint16_t)n;
    s->stats->spill_bytes += n;
    return 0;
}

/* lmw__tls_forget frees fd's TLS state (the connection is being freed). The SSL objects of TLS
 * 1.2 connections are scattered through the heap among longer-lived allocations, so after every
 * TRIM_AFTER of them the heap's free pages are given back (malloc_trim), else RSS would stay
 * at its peak after a crowd of them leaves. */
void lmw__tls_forget(lmw_server *s, int fd) {
    lmw_tls_conn *tc = s->tls->conns[fd];
    if (!tc) return;
    lmw__tls_drop_partial(s, tc);
    int kept_ssl = tc->ssl && tc->phase != TLS_HANDSHAKE; /* TLS 1.2, maybe closed (DEAD) */
    SSL_free(tc->ssl);
    if (kept_ssl && ++s->tls->freed_openssl >= TRIM_AFTER) {
        s->tls->freed_openssl = 0;
        malloc_trim(0);
    }
    lmw__tls_conn_free(s->tls, tc); /* wiped there */
    s->tls->conns[fd] = NULL;
}

/* ---------------------------------------------------------------- sealing output */

static int scratch_reserve(lmw_server *s, size_t need) {
    lmw_tls_server *t = s->tls;
    if (need <= t->scratch_cap) return 0;
    uint8_t *m = realloc(t->scratch, need);
    if (!m) return LMW_ERROR;
    t->scratch = m;
    t->scratch_cap = need;
    return 0;
}

/* lmw__tls_scratch_done gives back sealing memory grown for a large message. */
void lmw__tls_scratch_done(lmw_server *s) {
    if (s->tls->scratch_cap <= SCRATCH_KEEP) return;
    free(s->tls->scratch);
    s->tls->scratch = NULL;
    s->tls->scratch_cap = 0;
}

/* take_written moves what OpenSSL wrote into its memory BIO to the scratch memory. */
static int take_written(lmw_server *s, SSL *ssl, uint8_t **out, size_t *out_len) {
    BIO *wb = SSL_get_wbio(ssl);
    size_t n = BIO_ctrl_pending(wb);
    if (scratch_reserve(s, n ? n : 1) < 0) return LMW_ERROR;
    if (n && BIO_read(wb, s->tls->scratch, (int)n) != (int)n) return LMW_ERROR;
    *out = s->tls->scratch;
    *out_len = n;
    return n ? 1 : 0;
}

/* seal_openssl protects output of a TLS 1.2 connection with its SSL object. */
static int seal_openssl(lmw_server *s, lmw_tls_conn *tc, int kind, const uint8_t *a, size_t alen,
                        const uint8_t *b, size_t blen, uint8_t **out, size_t *out_len) {
    SSL *ssl = tc->ssl;
    if (kind == TLS_OUT_ALERT) { /* only close_notify: OpenSSL sends its own fatal alerts */
        SSL_shutdown(ssl);
        tc->phase = TLS_DEAD;
    } else if (kind == TLS_OUT_DATA) {
        if ((alen && SSL_write(ssl, a, (int)alen) <= 0) ||
            (blen && SSL_write(ssl, b, (int)blen) <= 0))
            return LMW_ERROR;
    }
    return take_written(s, ssl, out, out_len);
}

/* lmw__tls_seal_out protects one piece of output (a followed by b; the kind says what it is)
 * into the server's scratch memory, valid until the next seal: 1 and *out, *out_len; 0 when
 * the connection writes nothing (handshake not done, or closed); LMW_ERROR on failure. A
 * KeyUpdate is sealed with the current key, which is then replaced (RFC 8446 section 4.6.3);
 * after an alert nothing more is sealed. */
int lmw__tls_seal_out(lmw_server *s, lmw_tls_conn *tc, int kind, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t **out, size_t *out_len) {
    static const uint8_t key_update[5] = {TLS_HS_KEY_UPDATE, 0, 0, 1, 0}; /* update_not_requested */
    if (tc->phase == TLS_OPENSSL) return seal_openssl(s, tc, kind, a, alen, b, blen, out, out_len);
    if (tc->phase != TLS_RECORDS) return 0;
    uint8_t type = TLS_CT_APPLICATION_DATA;
    if (kind == TLS_OUT_ALERT) type = TLS_CT_ALERT;
    if (kind == TLS_OUT_KEY_UPDATE) {
        type = TLS_CT_HANDSHAKE;
        a = key_update;
        alen = sizeof key_update;
        blen = 0;
    }
    if (scratch_reserve(s, lmw__tls_sealed_size(alen + blen)) < 0) return LMW_ERROR;
    size_t n = lmw__tls_seal(tc->suite, &tc->wr, type, a, alen, b, blen, s->tls->scratch);
    if (!n) return LMW_ERROR;
    if (kind == TLS_OUT_KEY_UPDATE && lmw__tls_dir_update(&tc->wr, tc->suite) < 0) return LMW_ERROR;
    if (kind == TLS_OUT_ALERT) tc->phase = TLS_DEAD;
    *out = s->tls->scratch;
    *out_len = n;
    return 1;
}
