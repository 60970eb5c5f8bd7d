/* _tls_input.c - reading a TLS connection: the handshake fed to OpenSSL, then records opened
 * into plaintext that _input.c parses exactly as it parses a plain connection's bytes.
 *
 * It sits below _input.c, which parses the plaintext (lmw__tls_read, lmw__tls_read_done).
 * Read space is borrowed as for a plain connection: pending plaintext (a partial head or
 * frame, the ext's spill) is copied to its start, then a partial record kept from the last
 * read, then what the kernel holds. Records are opened in place and their plaintext moved
 * down behind the pending plaintext, so the parsers see one contiguous run; a record that
 * has partly arrived is kept (lmw_tls_conn.rec) like a spill. A frame larger than half a read
 * block grows in its spill, as _input.c's read_into_spill does.
 *
 * The handshake is fed one record at a time: OpenSSL never holds bytes past the record that
 * completes it (a client often sends its HTTP Upgrade right behind its Finished), and what
 * follows is opened here with the keys OpenSSL agreed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "_runtime.h"

#define TLS_MAX_HANDSHAKE_RECORD (TLS_MAX_PLAIN + 2048) /* what OpenSSL accepts before 1.3 */

static const char PLAINTEXT_ANSWER[] = "HTTP/1.1 400 Bad Request\r\n"
                                       "Content-Type: text/plain\r\n"
                                       "Content-Length: 44\r\n"
                                       "Connection: close\r\n"
                                       "\r\n"
                                       "This port speaks TLS: use https:// or wss://";

static ssize_t recv_some(int fd, uint8_t *p, size_t n) {
    ssize_t r;
    do r = recv(fd, p, n, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    return r ? r : -1;
}

static void input_seen(lmw_server *s, lmw_slot *sl) {
    if (sl->state != ST_OPEN) return;
    sl->tick = s->now;
    sl->flags &= ~F_PING_OUT;
}

static size_t record_len(const uint8_t *h) { return TLS_HEADER + ((size_t)h[3] << 8 | h[4]); }

/* fail sends alert (when the record layer runs) and ends the connection; counted. */
static void fail(lmw_server *s, int fd, lmw_slot *sl, int alert, int counter) {
    s->stats->tls[counter]++;
    if (alert >= 0) lmw__tls_send_alert(s, fd, sl, alert);
    lmw__conn_abandon(s, fd, sl);
}

/* ---------------------------------------------------------------- handshake */

/* flush_handshake writes what OpenSSL produced (a flight, or its alert) as it is. */
static int flush_handshake(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc) {
    BIO *wb = SSL_get_wbio(tc->ssl);
    char *data;
    long n = BIO_get_mem_data(wb, &data);
    if (n <= 0) return 0;
    int r = lmw__write_clear(s, fd, sl, (const uint8_t *)data, (size_t)n, NULL, 0, OUT_SEALED, 0);
    (void)BIO_reset(wb);
    return r < 0 ? -1 : 0;
}

/* establish takes over a finished handshake: for TLS 1.3 the record layer gets the traffic
 * secrets and the SSL object is freed; a TLS 1.2 connection keeps it. */
static int establish(lmw_server *s, lmw_tls_conn *tc) {
    SSL *ssl = tc->ssl;
    s->stats->tls[LMW_TLS_HANDSHAKES]++;
    if (SSL_version(ssl) != TLS1_3_VERSION) {
        s->stats->tls[LMW_TLS_VERSION_1_2]++;
        tc->phase = TLS_OPENSSL;
        return 0;
    }
    uint16_t id = SSL_CIPHER_get_protocol_id(SSL_get_current_cipher(ssl));
    int suite = id == 0x1301   ? TLS_SUITE_AES128_GCM
                : id == 0x1302 ? TLS_SUITE_AES256_GCM
                : id == 0x1303 ? TLS_SUITE_CHACHA20
                               : 0;
    if (!suite || tc->got_secrets != 3 || tc->hash_len != lmw__tls_hash_len(suite)) return -1;
    uint8_t client[48], server[48];
    memcpy(client, tc->rd.secret, sizeof client);
    memcpy(server, tc->wr.secret, sizeof server);
    int r = lmw__tls_dir_set(&tc->rd, suite, client) | lmw__tls_dir_set(&tc->wr, suite, server);
    OPENSSL_cleanse(client, sizeof client);
    OPENSSL_cleanse(server, sizeof server);
    if (r) return -1;
    tc->suite = (uint8_t)suite;
    SSL_free(ssl); /* its buffers, certificates and handshake state: gone for good */
    tc->ssl = NULL;
    tc->phase = TLS_RECORDS;
    return 0;
}

/* looks_like_http: the first bytes of a connection are an HTTP method, not a TLS record. */
static int looks_like_http(const uint8_t *p, size_t n) { return n && p[0] >= 'A' && p[0] <= 'Z'; }

/* handshake feeds the complete records at p to OpenSSL, one at a time, until the handshake is
 * done. Returns the bytes used (the rest are records of the new keys), or -1 when the
 * connection ended. A partial record is kept for the next read. */
static long handshake(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, const uint8_t *p,
                      size_t n) {
    SSL *ssl = tc->ssl;
    size_t off = 0;
    if (SSL_in_before(ssl) && looks_like_http(p, n)) {
        s->stats->tls[LMW_TLS_PLAINTEXT]++;
        tc->phase = TLS_DEAD;
        lmw__write_clear(s, fd, sl, (const uint8_t *)PLAINTEXT_ANSWER, sizeof PLAINTEXT_ANSWER - 1,
                         NULL, 0, OUT_SEALED, 0);
        lmw__conn_abandon(s, fd, sl);
        return -1;
    }
    while (n - off >= TLS_HEADER) {
        const uint8_t *h = p + off;
        size_t len = record_len(h);
        /* not a record OpenSSL could take: it gets the bytes and answers with its alert */
        int malformed = h[1] != 3 || len - TLS_HEADER > TLS_MAX_HANDSHAKE_RECORD;
        if (malformed) len = n - off;
        if (len > n - off) break;
        BIO_write(SSL_get_rbio(ssl), h, (int)len);
        off += len;
        int r = SSL_do_handshake(ssl);
        if (flush_handshake(s, fd, sl, tc) < 0) {
            lmw__conn_free(s, fd, 0);
            return -1;
        }
        if (r == 1) {
            if (establish(s, tc) == 0) return (long)off;
            r = 0;
        }
        if (r <= 0 && SSL_get_error(ssl, r) != SSL_ERROR_WANT_READ) {
            ERR_clear_error();
            tc->phase = TLS_DEAD;
            s->stats->tls[LMW_TLS_HANDSHAKE_FAILED]++;
            lmw__conn_abandon(s, fd, sl);
            return -1;
        }
    }
    if (lmw__tls_keep_partial(s, tc, p + off, n - off) < 0) {
        lmw__conn_reject(s, fd, sl, 503);
        return -1;
    }
    return (long)n;
}

/* ---------------------------------------------------------------- records */

/* on_handshake_message handles a handshake record after the handshake: only a whole KeyUpdate
 * (RFC 8446 section 4.6.3) is allowed. Returns 0, or the alert. */
static int on_handshake_message(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc,
                                const uint8_t *m, size_t n) {
    if (n < 4 || m[0] != TLS_HS_KEY_UPDATE) return TLS_ALERT_UNEXPECTED_MESSAGE;
    size_t body = (size_t)m[1] << 16 | (size_t)m[2] << 8 | m[3];
    if (body != 1 || n != 5) return TLS_ALERT_DECODE_ERROR; /* also: more after it (4.6.3) */
    if (m[4] > 1) return TLS_ALERT_ILLEGAL_PARAMETER;
    s->stats->tls[LMW_TLS_KEY_UPDATES]++;
    if (lmw__tls_dir_update(&tc->rd, tc->suite) < 0) return TLS_ALERT_DECODE_ERROR;
    if (m[4] == 1 && lmw__tls_send_key_update(s, fd, sl) < 0) return TLS_ALERT_DECODE_ERROR;
    return 0;
}

/* on_alert handles an alert from the peer: close_notify is noted (answered once the data
 * before it is handled), user_canceled ignored, any other ends the connection. Returns 0, or
 * -1 when the connection ended. */
static int on_alert(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, const uint8_t *m,
                    size_t n) {
    if (n != 2) {
        fail(s, fd, sl, TLS_ALERT_DECODE_ERROR, LMW_TLS_DECODE_ERROR);
        return -1;
    }
    if (m[1] == TLS_ALERT_CLOSE_NOTIFY) {
        s->stats->tls[LMW_TLS_CLOSE_NOTIFY]++;
        tc->peer_closed = 1;
        return 0;
    }
    if (m[1] == TLS_ALERT_USER_CANCELED) return 0;
    s->stats->tls[LMW_TLS_ALERT_RECEIVED]++;
    tc->close_sent = 1; /* a fatal alert: nothing is answered (RFC 8446 section 6.2) */
    lmw__conn_abandon(s, fd, sl);
    return -1;
}

static int alert_counter(int alert) {
    switch (alert) {
    case TLS_ALERT_BAD_RECORD_MAC:
        return LMW_TLS_BAD_RECORD_MAC;
    case TLS_ALERT_RECORD_OVERFLOW:
        return LMW_TLS_RECORD_OVERFLOW;
    case TLS_ALERT_UNEXPECTED_MESSAGE:
        return LMW_TLS_UNEXPECTED_MESSAGE;
    default:
        return LMW_TLS_DECODE_ERROR;
    }
}

/* open_one opens the record at p (len bytes, complete) and moves its application data to
 * *w. Returns 0, or -1 when the connection ended. */
static int open_one(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, uint8_t *p, size_t len,
                    uint8_t *base, size_t *w) {
    if (p[0] != TLS_CT_APPLICATION_DATA) { /* every protected record says application_data */
        fail(s, fd, sl, TLS_ALERT_UNEXPECTED_MESSAGE, LMW_TLS_UNEXPECTED_MESSAGE);
        return -1;
    }
    uint8_t type = 0;
    size_t n = 0;
    int alert = lmw__tls_open(tc->suite, &tc->rd, p, len, &type, &n);
    const uint8_t *m = p + TLS_HEADER;
    if (!alert && type == TLS_CT_APPLICATION_DATA) {
        memmove(base + *w, m, n);
        *w += n;
        return 0;
    }
    if (!alert && type == TLS_CT_ALERT) return on_alert(s, fd, sl, tc, m, n);
    if (!alert && type == TLS_CT_HANDSHAKE)
        alert = on_handshake_message(s, fd, sl, tc, m, n);
    else if (!alert)
        alert = TLS_ALERT_UNEXPECTED_MESSAGE;
    if (!alert) return 0;
    fail(s, fd, sl, alert, alert_counter(alert));
    return -1;
}

/* open_openssl hands a TLS 1.2 connection's complete records to its SSL object and reads their
 * plaintext into p (it never outgrows them); a partial record is kept like a TLS 1.3 one.
 * Returns 0, or -1 when the connection ended. */
static int open_openssl(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, uint8_t *p, size_t n,
                        size_t *plain_len) {
    SSL *ssl = tc->ssl;
    size_t off = 0, w = 0;
    while (n - off >= TLS_HEADER && record_len(p + off) <= n - off) off += record_len(p + off);
    if (n - off >= TLS_HEADER && record_len(p + off) - TLS_HEADER > TLS_MAX_HANDSHAKE_RECORD)
        off = n; /* OpenSSL answers an impossible record with its alert */
    if (lmw__tls_keep_partial(s, tc, p + off, n - off) < 0) {
        lmw__conn_fail(s, fd, 1013);
        lmw__conn_abandon(s, fd, sl);
        return -1;
    }
    BIO_write(SSL_get_rbio(ssl), p, (int)off);
    while (w < off) {
        int r = SSL_read(ssl, p + w, (int)(off - w));
        if (r > 0) {
            w += (size_t)r;
            continue;
        }
        int e = SSL_get_error(ssl, r);
        if (flush_handshake(s, fd, sl, tc) < 0) e = SSL_ERROR_SSL;
        if (e == SSL_ERROR_WANT_READ) break;
        if (e == SSL_ERROR_ZERO_RETURN) {
            s->stats->tls[LMW_TLS_CLOSE_NOTIFY]++;
            tc->peer_closed = 1;
            break;
        }
        ERR_clear_error();
        tc->close_sent = 1; /* OpenSSL wrote its alert */
        fail(s, fd, sl, -1, LMW_TLS_ALERT_RECEIVED);
        return -1;
    }
    *plain_len = w;
    return 0;
}

/* open_records opens the complete records at p[0, n) into plaintext at p[0, *plain_len) and
 * keeps a partial record for later. Returns 0, or -1 when the connection ended. */
static int open_records(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, uint8_t *p, size_t n,
                        size_t *plain_len) {
    if (tc->phase == TLS_OPENSSL) return open_openssl(s, fd, sl, tc, p, n, plain_len);
    size_t off = 0, w = 0;
    while (n - off >= TLS_HEADER) {
        size_t len = record_len(p + off);
        if (tc->peer_closed) { /* nothing counts after close_notify (RFC 8446 6.1) */
            s->stats->tls[LMW_TLS_AFTER_CLOSE]++;
            off = n;
            break;
        }
        if (len - TLS_HEADER > TLS_MAX_CIPHER) {
            fail(s, fd, sl, TLS_ALERT_RECORD_OVERFLOW, LMW_TLS_RECORD_OVERFLOW);
            return -1;
        }
        if (len > n - off) break;
        if (open_one(s, fd, sl, tc, p + off, len, p, &w) < 0) return -1;
        off += len;
    }
    if (lmw__tls_keep_partial(s, tc, p + off, n - off) < 0) {
        lmw__conn_fail(s, fd, 1013);
        lmw__conn_abandon(s, fd, sl);
        return -1;
    }
    *plain_len = w;
    return 0;
}

/* ---------------------------------------------------------------- reading */

/* lmw__tls_read_done answers the peer's close_notify with ours, once the plaintext read before
 * it was parsed (a WebSocket close in it may already have ended the connection). */
void lmw__tls_read_done(lmw_server *s, int fd, uint32_t gen, lmw_tls_conn *tc) {
    lmw_slot *sl = lmw__slot(s, fd, gen);
    if (!sl || lmw__tls_of(s, fd) != tc || !tc->peer_closed || sl->state == ST_DEFERRED) return;
    lmw__conn_abandon(s, fd, sl);
}

/* read_large reads while a frame larger than half a read block is pending: records are
 * opened in read space and their plaintext appended to the frame's spill, which is then
 * parsed (as _input.c's read_into_spill does). */
static int read_large(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, lmw_ext *x,
                      lmw_tls_plain *out) {
    if (x->in_want > s->cfg.spill_budget) return lmw__conn_fail(s, fd, 1013), 0;
    uint8_t *buf;
    size_t cap, kept = tc->rec_len;
    if (lmw__take_read_space(s, kept + MIN_READ_SPACE, &buf, &cap) < 0) return 0;
    if (kept) memcpy(buf, tc->rec, kept);
    ssize_t n = recv_some(fd, buf + kept, cap - kept);
    if (n == 0) return 0;
    if (n < 0) return lmw__conn_free(s, fd, 0), 0;
    lmw__commit_read_space(s, kept + (size_t)n);
    input_seen(s, sl);
    size_t plain = 0;
    if (open_records(s, fd, sl, tc, buf, kept + (size_t)n, &plain) < 0) return 0;
    uint64_t need = x->in_len + plain;
    if (need > x->in_cap) {
        uint64_t ncap = x->in_cap * 2 < x->in_want ? x->in_cap * 2 : x->in_want;
        if (ncap < need) ncap = need;
        uint8_t *m = s->stats->spill_bytes + (ncap - x->in_cap) <= s->cfg.spill_budget
                         ? realloc(x->in, ncap)
                         : NULL;
        if (!m) return lmw__conn_fail(s, fd, 1013), 0;
        s->stats->spill_bytes += ncap - x->in_cap;
        x->in = m;
        x->in_cap = ncap;
    }
    memcpy(x->in + x->in_len, buf, plain);
    x->in_len = need;
    if (x->in_len < x->in_want) { /* parsed in place: the checked part is not checked again */
        *out = (lmw_tls_plain){
            x->in, x->in_len, {.checked = x->in_checked, .begun = x->in_frame_begun}};
    } else {
        lmw_pending p = lmw__take_spill(s, x);
        *out = (lmw_tls_plain){p.buf, p.len, p.progress};
    }
    return 1;
}

/* lmw__tls_read reads a TLS connection (the checks of lmw__on_readable passed) and opens what
 * arrived. Returns 1 with the plaintext to parse in *out (its len may be 0; then call
 * lmw__tls_read_done), or 0 when there is nothing to parse (nothing arrived, the handshake
 * goes on, or the connection ended). */
int lmw__tls_read(lmw_server *s, int fd, lmw_slot *sl, lmw_tls_conn *tc, lmw_tls_plain *out) {
    lmw_ext *x = lmw__ext_of(s, sl);
    if (x && x->in && lmw__spill_is_large(s, x) && !lmw__is_handshake_state(sl->state))
        return read_large(s, fd, sl, tc, x, out);
    size_t pending = x && x->in ? (size_t)x->in_len : 0, kept = tc->rec_len;
    uint8_t *buf;
    size_t cap;
    if (pending + kept + MIN_READ_SPACE > s->cfg.read_buffer_size) {
        if (lmw__is_handshake_state(sl->state)) return lmw__conn_reject(s, fd, sl, 431), 0;
        return lmw__conn_fail(s, fd, 1009), 0;
    }
    if (lmw__take_read_space(s, pending + kept + MIN_READ_SPACE, &buf, &cap) < 0) return 0;
    size_t room = cap - pending - kept;
    if (room > TLS_MAX_RECORD * 2) room = TLS_MAX_RECORD * 2; /* leave the block to others */
    ssize_t n = recv_some(fd, buf + pending + kept, room);
    if (n == 0) return 0;
    if (n < 0) return lmw__conn_free(s, fd, 0), 0;
    if (pending) memcpy(buf, x->in, pending);
    if (kept) memcpy(buf + pending, tc->rec, kept);
    lmw__commit_read_space(s, pending + kept + (size_t)n);
    input_seen(s, sl);
    lmw_progress done = {0};
    if (pending) {
        done = (lmw_progress){.checked = x->in_checked, .begun = x->in_frame_begun};
        lmw__in_free(s, x);
    }
    lmw__tls_drop_partial(s, tc);
    uint8_t *p = buf + pending;
    size_t len = kept + (size_t)n;
    if (tc->phase == TLS_HANDSHAKE) {
        long used = handshake(s, fd, sl, tc, p, len);
        if (used < 0 || tc->phase == TLS_HANDSHAKE) return 0;
        p += used; /* pending is 0 during the handshake: the plaintext starts at p */
        len -= (size_t)used;
    }
    size_t plain = 0;
    if (open_records(s, fd, sl, tc, p, len, &plain) < 0) return 0;
    *out = (lmw_tls_plain){pending ? buf : p, pending + plain, done};
    return 1;
}
