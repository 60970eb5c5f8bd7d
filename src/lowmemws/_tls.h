/* _tls.h - private TLS structures shared by the TLS files and the read/write path. Not part
 * of the cffi interface; no OpenSSL type appears here (the SSL object is a void pointer), so
 * the runtime's other files build without OpenSSL's headers.
 *
 * Files (layers as in _runtime.h):
 *   _tls_keys.c    the TLS 1.3 key schedule pieces a record layer needs (RFC 8446 7.1, 7.3)
 *   _tls_record.c  the TLS 1.3 record layer (RFC 8446 section 5): pure, bytes in and out
 *   _tls_pages.c   the pages every lmw_tls_conn lives in
 *   _tls_conn.c    the handshake with OpenSSL over memory BIOs, what a connection keeps
 *                  afterwards, and sealing output (storage/output level)
 *   _tls_input.c   reading a TLS connection: records to plaintext for _input.c
 *   _tls_off.c     the stand-ins when lowmemws was built without OpenSSL
 */
#ifndef LMW_TLS_H
#define LMW_TLS_H

#include <stddef.h>
#include <stdint.h>

/* Record sizes (RFC 8446 section 5.1, 5.2). */
#define TLS_HEADER 5
#define TLS_MAX_PLAIN 16384                  /* 2^14 bytes of plaintext per record */
#define TLS_MAX_CIPHER (TLS_MAX_PLAIN + 256) /* 2^14 + 256 bytes of ciphertext */
#define TLS_MAX_RECORD (TLS_HEADER + TLS_MAX_CIPHER)
#define TLS_TAG 16 /* every suite lowmemws accepts has a 16-byte tag */
#define TLS_NONCE 12
/* bytes a record adds to its plaintext: header, inner content type, tag */
#define TLS_RECORD_OVERHEAD (TLS_HEADER + 1 + TLS_TAG)

/* Content types (RFC 8446 section 5.1). */
enum {
    TLS_CT_CHANGE_CIPHER_SPEC = 20,
    TLS_CT_ALERT = 21,
    TLS_CT_HANDSHAKE = 22,
    TLS_CT_APPLICATION_DATA = 23,
};

/* Alert descriptions sent (RFC 8446 section 6). */
enum {
    TLS_ALERT_CLOSE_NOTIFY = 0,
    TLS_ALERT_UNEXPECTED_MESSAGE = 10,
    TLS_ALERT_BAD_RECORD_MAC = 20,
    TLS_ALERT_RECORD_OVERFLOW = 22,
    TLS_ALERT_ILLEGAL_PARAMETER = 47,
    TLS_ALERT_DECODE_ERROR = 50,
    TLS_ALERT_USER_CANCELED = 90,
};

/* Handshake message types seen after the handshake (RFC 8446 section 4). */
enum { TLS_HS_NEW_SESSION_TICKET = 4, TLS_HS_KEY_UPDATE = 24 };

/* Cipher suites of the record layer (RFC 8446 appendix B.4); CCM is not offered. */
enum { TLS_SUITE_AES128_GCM = 1, TLS_SUITE_AES256_GCM = 2, TLS_SUITE_CHACHA20 = 3 };

/* lmw_tls_dir is one direction of a TLS 1.3 connection: its current traffic secret (for its
 * key, derived per use, and for KeyUpdate, RFC 8446 7.2), the IV derived from it (7.3) and the
 * sequence number of the next record (5.3). */
typedef struct __attribute__((packed)) {
    uint64_t seq;
    uint8_t secret[48];
    uint8_t iv[TLS_NONCE];
} lmw_tls_dir; /* 68 bytes: no padding inside lmw_tls_conn */

/* Phases of a TLS connection. */
enum {
    TLS_HANDSHAKE = 0, /* OpenSSL's SSL object runs the handshake; nothing else is written */
    TLS_RECORDS,       /* TLS 1.3 done: the SSL object is freed, lowmemws's record layer */
    TLS_OPENSSL,       /* TLS 1.2 done: the SSL object stays and protects the records */
    TLS_DEAD,          /* a fatal alert or our close_notify went out: nothing more is written */
};

/* lmw_tls_conn is what a TLS connection keeps besides its slot: during the handshake the SSL
 * object (and its memory BIOs), afterwards only the record layer's state. rec holds a record
 * that has partly arrived (like a spill, only while it is partial). */
typedef struct lmw_tls_conn {
    void *ssl;
    uint8_t *rec;
    uint16_t rec_len;
    uint8_t phase;
    uint8_t suite;
    uint8_t hash_len;    /* 32 (SHA-256) or 48 (SHA-384) */
    uint8_t got_secrets; /* bit 0: client, bit 1: server traffic secret 0 seen */
    uint8_t peer_closed; /* the peer's close_notify arrived */
    uint8_t close_sent;  /* our close_notify (or a fatal alert) went out */
    lmw_tls_dir rd, wr;
} lmw_tls_conn;

/* lmw_tls_server: the server's TLS context (SSL_CTX), a table of lmw_tls_conn pointers by fd
 * (calloc'd: untouched pages cost nothing) and scratch memory for sealing, reused by every
 * write. */
typedef struct lmw_tls_server {
    void *ctx;
    lmw_tls_conn **conns;
    struct tls_page *pages; /* where the lmw_tls_conn live (_tls_pages.c) */
    uint8_t *scratch;
    size_t scratch_cap;
    uint32_t freed_openssl; /* TLS 1.2 connections freed since the heap was last trimmed */
} lmw_tls_server;

/* Kinds of TLS output that lmw_out.control carries (bits 2-3): a record queued as plaintext is
 * sealed when it reaches the head of the queue, so the sequence numbers follow the wire order. */
enum { TLS_OUT_DATA = 0, TLS_OUT_ALERT = 1, TLS_OUT_KEY_UPDATE = 2 };

/* _tls_pages.c */
lmw_tls_conn *lmw__tls_conn_new(lmw_tls_server *t);
void lmw__tls_conn_free(lmw_tls_server *t, lmw_tls_conn *tc);
void lmw__tls_pages_free(lmw_tls_server *t);
/* _tls_keys.c */
int lmw__tls_hash_len(int suite);
int lmw__tls_dir_set(lmw_tls_dir *d, int suite, const uint8_t *secret);
int lmw__tls_dir_key(const lmw_tls_dir *d, int suite, uint8_t *key);
int lmw__tls_dir_update(lmw_tls_dir *d, int suite);
/* _tls_record.c */
size_t lmw__tls_sealed_size(size_t n);
int lmw__tls_open(int suite, lmw_tls_dir *d, uint8_t *rec, size_t len, uint8_t *type,
                  size_t *plain_len);
size_t lmw__tls_seal(int suite, lmw_tls_dir *d, uint8_t type, const uint8_t *a, size_t alen,
                     const uint8_t *b, size_t blen, uint8_t *out);

#endif
