/* lmw.h - the C interface of lowmemws.
 *
 * Two parts, one prefix (lmw_):
 *   _frame.c   the pure codec: HTTP/1.1 request heads (RFC 7230) and WebSocket frames
 *              (RFC 6455). Bytes in, offsets and status out; never allocates, never
 *              touches a socket.
 *   runtime    the socket-facing part, one concern per file (layers in _runtime.h):
 *              _server.c (the epoll loop, accept, the sweep, this API), _input.c
 *              (reading, heads, frames, the spill budget), _conn.c (the connection state
 *              machine), _output.c (sends, queues, write bounds), _fanout.c (one frame to
 *              many), _paced.c (one frame to many, over time), _hub.c (topic and user
 *              membership), _presence.c (a user's connections: count, close), _slot.c
 *              (per-connection memory).
 *
 * Locking: every public runtime function takes the server's one mutex, so any thread may
 * call any of them; lmw_poll drops it only while it waits in epoll_wait. The trade-off:
 * a fan-out sends to all its recipients under the lock (one non-blocking send each, so a
 * fan-out to 19,000 takes ~0.1 s during which other threads' sends wait), in exchange
 * for no per-connection lock and no cross-thread queue on the common path.
 *
 * This file is also the cffi cdef: _build_native.py drops the lines starting with '#'
 * except '#define NAME <integer>', so keep to plain declarations here.
 */
#ifndef LMW_H
#define LMW_H
#include <stddef.h>
#include <stdint.h>

/* Results shared by the parsers. */
#define LMW_ERROR -1
#define LMW_INCOMPLETE -2

/* ------------------------------------------------------------------------------------
 * HTTP request head (RFC 7230 section 3) and the WebSocket opening handshake
 * (RFC 6455 section 4.2.1).
 * ---------------------------------------------------------------------------------- */

/* lmw_span is a zero-copy view: off and len into the caller's buffer. */
typedef struct {
    uint32_t off;
    uint32_t len;
} lmw_span;

/* Headers a gateway needs, found once during the parse (index into lmw_request.headers). */
#define LMW_H_HOST 0
#define LMW_H_UPGRADE 1
#define LMW_H_CONNECTION 2
#define LMW_H_SEC_WEBSOCKET_KEY 3
#define LMW_H_SEC_WEBSOCKET_VERSION 4
#define LMW_H_SEC_WEBSOCKET_PROTOCOL 5
#define LMW_H_SEC_WEBSOCKET_EXTENSIONS 6
#define LMW_H_ORIGIN 7
#define LMW_H_COOKIE 8
#define LMW_H_AUTHORIZATION 9
#define LMW_H_CONTENT_LENGTH 10
#define LMW_H_TRANSFER_ENCODING 11
#define LMW_H_COUNT 12

/* lmw_request.kind once a head is complete. */
#define LMW_KIND_HTTP 1    /* a plain HTTP request: for the application's HTTP hook */
#define LMW_KIND_UPGRADE 2 /* a valid WebSocket upgrade (RFC 6455 section 4.2.1) */

/* lmw_request holds the result of lmw_parse_request: offsets only, no strings.
 * Zero it before the first call for a new request; pass it back unchanged on later
 * calls with more bytes so the search for the end of the head resumes where it stopped. */
typedef struct {
    uint32_t scanned;        /* internal: bytes already searched for the blank line */
    uint32_t head_len;       /* bytes of the head including the final CRLF CRLF */
    uint16_t status;         /* on LMW_ERROR: the HTTP status the client should get */
    uint8_t kind;            /* LMW_KIND_* when complete */
    uint8_t minor_version;   /* HTTP/1.<minor_version> */
    uint32_t header_count;   /* all header fields, known or not */
    uint32_t present;        /* bit (1 << LMW_H_x) set when header x was seen */
    uint64_t content_length; /* value of Content-Length, 0 when absent */
    lmw_span method;
    lmw_span target;               /* request-target as sent */
    lmw_span path;                 /* target up to '?' */
    lmw_span query;                /* after '?', without it; len 0 when absent */
    lmw_span headers[LMW_H_COUNT]; /* values of the LMW_H_* headers, whitespace trimmed */
} lmw_request;

/* lmw_parse_request parses an HTTP/1.x request head in place.
 * Returns head_len (> 0) when the head is complete and acceptable, LMW_INCOMPLETE when
 * more bytes are needed (len < max_head), LMW_ERROR with req->status set otherwise:
 *   400 malformed line or header, obs-fold, bare LF, an empty line before the request
 *       line (RFC 7230 3.5 allows skipping it; we do not), a request-target with a byte
 *       outside VCHAR (space, control or non-ASCII: percent-encode it), missing Host
 *       (HTTP/1.1), duplicate Host / Content-Length / Sec-WebSocket-Key /
 *       Sec-WebSocket-Version, bad Content-Length (it must be 1 to 19 ASCII digits: no
 *       sign, no inner whitespace, no comma list), Sec-WebSocket-Key that does not
 *       decode to 16 bytes, websocket Upgrade without an "upgrade" token in Connection;
 *   405 a WebSocket upgrade whose method is not GET;
 *   426 a WebSocket upgrade with a missing or unsupported Sec-WebSocket-Version;
 *   431 no complete head within max_head bytes;
 *   501 Transfer-Encoding on a request (bodies must use Content-Length);
 *   505 a version other than HTTP/1.0 or HTTP/1.1 (a WebSocket upgrade needs 1.1).
 * Line endings must be CRLF (RFC 7230 section 3.5 allows, but does not require,
 * accepting a bare LF; we refuse it with 400 to leave no room for request smuggling).
 * Repeated header fields: a duplicate of the four above is 400; any other known header
 * keeps the span of its first occurrence in req->headers (all occurrences count in
 * header_count and are seen by lmw_header_next). The "websocket" token of Upgrade and
 * the "upgrade" token of Connection are looked for in every occurrence of the field,
 * as if they were one comma-separated list (RFC 7230 3.2.2).
 * Errors are reported only once they are certain: a bad line in a head that is not
 * complete yet gives LMW_INCOMPLETE until the blank line (then its status) or a bare LF
 * (400) arrives, or 431; so any split of the same bytes over calls ends the same way.
 * On the first call (scanned == 0) the head is parsed in the same pass that finds its
 * end; on later calls the search resumes at scanned and the parse runs once when the
 * head is complete, so no byte is searched twice however the head is split. */
int lmw_parse_request(const uint8_t *buf, size_t len, size_t max_head, lmw_request *req);

/* lmw_header_next iterates the header fields of a head accepted by lmw_parse_request.
 * Start with *pos = 0; returns 1 and fills name/value (value trimmed), 0 at the end. */
int lmw_header_next(const uint8_t *buf, size_t head_len, uint32_t *pos, lmw_span *name,
                    lmw_span *value);

/* lmw_token_list_has reports whether a comma-separated token list (Connection, Upgrade,
 * Sec-WebSocket-Protocol) contains token, compared case-insensitively (RFC 7230 7). */
int lmw_token_list_has(const uint8_t *list, size_t list_len, const uint8_t *token,
                       size_t token_len);

/* lmw_accept_key writes Sec-WebSocket-Accept (28 base64 characters) for key:
 * base64(SHA-1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")), RFC 6455 section 4.2.2. */
void lmw_accept_key(const uint8_t *key, size_t key_len, uint8_t *out28);

/* lmw_build_101 writes the 101 Switching Protocols response for key into out, with a
 * Sec-WebSocket-Protocol header when protocol_len > 0 and a Sec-WebSocket-Extensions
 * header accepting permessage-deflate when pmd is an lmw_pmd_negotiate result other than 0.
 * Returns its length, or LMW_ERROR when cap is too small. */
int lmw_build_101(const uint8_t *key, size_t key_len, const uint8_t *protocol, size_t protocol_len,
                  int pmd, uint8_t *out, size_t cap);

/* permessage-deflate negotiation (RFC 7692 section 7.1). The server accepts an offer only
 * with no context takeover in both directions: its response always carries
 * server_no_context_takeover and client_no_context_takeover (section 7.1.1), so each
 * message is compressed and decompressed on its own and no connection keeps a zlib stream.
 * LMW_PMD_ACCEPT is set in an accepted result; its low 4 bits are the
 * server_max_window_bits the client asked for (8-15, echoed in the response, section
 * 7.1.2.1), or 0 when it asked for none (then 15). */
#define LMW_PMD_ACCEPT 128

/* lmw_pmd_negotiate reads one Sec-WebSocket-Extensions field value (a comma-separated list
 * of offers, RFC 6455 section 9.1) and returns the result for the first permessage-deflate
 * offer that can be accepted, or 0. An offer is declined (section 5) when it has a
 * parameter not defined for offers, a parameter twice, or an invalid value
 * (server_max_window_bits needs 8-15, client_max_window_bits takes none or 8-15; a value
 * may be a quoted string); a value that breaks the list's syntax declines every offer
 * after it. Never fails the handshake. */
int lmw_pmd_negotiate(const uint8_t *value, size_t len);

/* lmw_reject_response returns a response built once at start-up for status (400, 401,
 * 403, 404, 405, 408, 413, 426, 429, 431, 500, 501, 503, 505), with Connection: close, or
 * NULL for another status. Each has Content-Type: text/plain; charset=utf-8, a
 * Content-Length and a body of the reason phrase and a newline. Extra headers:
 *   405 Allow: GET;
 *   426 Sec-WebSocket-Version: 13 and Upgrade: websocket, with "Connection: close,
 *       Upgrade" (RFC 6455 4.4, RFC 7230 6.7);
 *   503 Retry-After: 1. */
const uint8_t *lmw_reject_response(int status, size_t *len);

/* ------------------------------------------------------------------------------------
 * Frames (RFC 6455 section 5)
 * ---------------------------------------------------------------------------------- */

#define LMW_OP_CONTINUATION 0
#define LMW_OP_TEXT 1
#define LMW_OP_BINARY 2
#define LMW_OP_CLOSE 8
#define LMW_OP_PING 9
#define LMW_OP_PONG 10

/* lmw_frame is one parsed frame header. */
typedef struct {
    uint64_t payload_len;
    uint32_t header_len; /* 2 to 14 bytes */
    uint8_t fin;
    uint8_t rsv; /* RSV1..RSV3 as bits 0x4, 0x2, 0x1 */
    uint8_t opcode;
    uint8_t masked;
    uint8_t mask[4];
    uint16_t close_code; /* on LMW_ERROR: the close code to send */
    uint16_t pad;
} lmw_frame;

/* lmw_parse_frame parses one frame header at buf. Returns header_len (> 0) when the
 * header is complete (the payload may not be: check header_len + payload_len <= len),
 * LMW_INCOMPLETE, or LMW_ERROR with close_code 1002 for: reserved bits not in
 * rsv_allowed, an unknown opcode, a control frame that is fragmented or longer than
 * 125 bytes (section 5.5), an unmasked frame when require_mask (section 5.1), a 64-bit
 * length with the most significant bit set (section 5.2). */
int lmw_parse_frame(const uint8_t *buf, size_t len, uint8_t rsv_allowed, int require_mask,
                    lmw_frame *f);

/* lmw_unmask XORs n payload bytes with mask, a machine word at a time. phase is the
 * offset of p within the frame payload, so a payload can be unmasked in pieces. */
void lmw_unmask(uint8_t *p, size_t n, const uint8_t *mask, size_t phase);

/* UTF-8 validation (RFC 3629), incremental: state 0 is "between characters". */
#define LMW_UTF8_ACCEPT 0

/* lmw_utf8_check validates n bytes continuing from *state. Returns -1 when every byte
 * is valid so far (the message may still end inside a character: check *state ==
 * LMW_UTF8_ACCEPT at the end), or the offset of the first invalid byte. Overlong forms,
 * surrogates (U+D800..U+DFFF) and code points above U+10FFFF are invalid.
 * The error is sticky: after an invalid byte *state is 0xFFFFFFFF and stays so, every
 * later call with n > 0 returns 0 (n == 0 returns -1 but the state is still not
 * LMW_UTF8_ACCEPT); set *state = 0 to start over. */
int64_t lmw_utf8_check(uint32_t *state, const uint8_t *s, size_t n);

/* lmw_message_state follows one connection's message across frames: fragmentation
 * (section 5.4), size limit and UTF-8 of text messages (section 8.1). */
typedef struct {
    uint64_t length;    /* payload bytes of the message so far */
    uint32_t utf8;      /* lmw_utf8_check state for a text message */
    uint8_t opcode;     /* LMW_OP_TEXT/BINARY of the message in progress, 0 if none */
    uint8_t compressed; /* its first frame had RSV1 (permessage-deflate, RFC 7692 6.1) */
    uint8_t pad[2];
} lmw_message_state;

/* lmw_message_frame checks a data or control frame header against the message in
 * progress. Returns 0, or the close code: 1002 for a continuation with no message in
 * progress, a new text/binary frame inside a fragmented message or RSV1 on a
 * continuation (RFC 7692 section 6.1: only the first frame of a compressed message
 * carries it), 1009 when the message would exceed max_message bytes. RSV1 on a first
 * frame (allowed by lmw_parse_frame only when permessage-deflate was negotiated) marks
 * the message compressed: its payload is then not checked as UTF-8 (the caller checks
 * the decompressed text). Control frames never change the state. */
int lmw_message_frame(lmw_message_state *m, const lmw_frame *f, uint64_t max_message);

/* lmw_message_payload validates n unmasked payload bytes of the current data frame.
 * Returns 0 or 1007 (invalid UTF-8 in a text message, at the first bad byte).
 * Data frames only (opcode 0-2): the payload of a control frame that arrives between
 * two fragments must not be passed here, or it would be checked as part of the text. */
int lmw_message_payload(lmw_message_state *m, const uint8_t *p, size_t n);

/* lmw_message_frame_end is called after the whole payload of a data frame.
 * With fin set it returns 1007 if the text ends inside a character, else 0, and resets
 * the state for the next message. Data frames only: a control frame always has fin
 * set, so calling this for one would end a fragmented message in progress. */
int lmw_message_frame_end(lmw_message_state *m, int fin);

/* lmw_build_header writes an unmasked server frame header (2, 4 or 10 bytes) for a
 * payload of len bytes to out (at least 10 bytes) and returns its length. The payload is
 * not copied: put the header in headroom before it, or send both with writev. */
int lmw_build_header(uint8_t *out, int fin, int opcode, uint64_t len);

/* lmw_close_code_valid reports whether code may appear in a close frame on the wire:
 * 1000-1003, 1007-1011, 3000-4999 (section 7.4; 1004-1006 and 1015 never may). */
int lmw_close_code_valid(int code);

/* lmw_parse_close parses a received close payload. Returns 0 with *code set (1005 when
 * the payload is empty), 1002 for a 1-byte payload or an invalid code, 1007 for a
 * reason that is not UTF-8 (section 5.5.1). */
int lmw_parse_close(const uint8_t *p, size_t n, uint16_t *code);

/* lmw_build_close_payload writes code and reason (at most 123 bytes of UTF-8) to out
 * (at least 125 bytes) and returns the payload length, or LMW_ERROR for an invalid code
 * or reason. */
int lmw_build_close_payload(uint8_t *out, int code, const uint8_t *reason, size_t reason_len);

/* ------------------------------------------------------------------------------------
 * Runtime: slots, loop, buffers, sends.
 * ---------------------------------------------------------------------------------- */

#define LMW_POLICY_DROP 0   /* a frame that would pass the write limit is not queued */
#define LMW_POLICY_CLOSE 1  /* the client is closed with 1008 */
#define LMW_POLICY_LATEST 2 /* keep only the newest pending frame of that topic */

/* lmw_config: every cap and timeout of a server; filled by lowmemws.config. */
typedef struct {
    uint32_t max_connections;  /* slots: fds at or above this are refused */
    uint32_t max_handshakes;   /* concurrent heads being read; at the cap, stop accepting */
    uint32_t max_head;         /* HTTP head cap (431) */
    uint32_t max_http_body;    /* plain HTTP request body cap (413) */
    uint64_t max_message;      /* WebSocket message cap (1009) */
    uint32_t read_buffer_size; /* bytes per pooled read buffer */
    uint32_t read_buffers;     /* pooled read buffers */
    uint64_t spill_budget;     /* all spill allocations together */
    uint64_t write_limit;      /* pending output per connection */
    uint64_t write_budget;     /* pending output of all connections together */
    uint32_t handshake_timeout_ms;
    uint32_t ping_interval_ms; /* 0 disables pings */
    uint32_t ping_timeout_ms;
    uint32_t close_timeout_ms;
    uint32_t message_timeout_ms; /* a begun message must be complete by then (1008); 0: off */
    uint32_t accept_batch;       /* accept4 calls per readable listener */
    uint32_t max_per_ip;         /* connections + handshakes per client address; 0 = no cap */
    uint8_t write_policy;        /* LMW_POLICY_DROP or LMW_POLICY_CLOSE for conn.send */
    uint8_t auto_upgrade;        /* 1: complete upgrades in C, no UPGRADE event */
    uint8_t deflate;             /* 1: accept permessage-deflate offers (RFC 7692) */
    uint8_t deflate_level;       /* zlib level 1-9 for messages sent compressed */
    uint32_t deflate_min_size;   /* messages shorter than this are sent uncompressed */
    uint32_t pad;
} lmw_config;

/* TLS outcomes counted in lmw_stats.tls (docs/tls.md). */
#define LMW_TLS_HANDSHAKES 0         /* TLS handshakes completed */
#define LMW_TLS_HANDSHAKE_FAILED 1   /* handshakes OpenSSL refused (its alert was sent) */
#define LMW_TLS_PLAINTEXT 2          /* plain HTTP on the TLS port: answered 400, closed */
#define LMW_TLS_BAD_RECORD_MAC 3     /* a record failed authentication: bad_record_mac */
#define LMW_TLS_RECORD_OVERFLOW 4    /* an oversized record: record_overflow */
#define LMW_TLS_UNEXPECTED_MESSAGE 5 /* a record or handshake message not allowed now */
#define LMW_TLS_DECODE_ERROR 6       /* a malformed KeyUpdate: decode_error, illegal_parameter */
#define LMW_TLS_ALERT_RECEIVED 7     /* a fatal alert from the peer */
#define LMW_TLS_CLOSE_NOTIFY 8       /* close_notify received (answered with ours) */
#define LMW_TLS_AFTER_CLOSE 9        /* records that came after the peer's close_notify */
#define LMW_TLS_KEY_UPDATES 10       /* KeyUpdate messages received */
#define LMW_TLS_VERSION_1_2 11       /* handshakes that chose TLS 1.2 (OpenSSL keeps the records) */
#define LMW_TLS_COUNTERS 12

/* Counters, in a struct so several worker processes can keep theirs in one shared
 * mapping and any of them can sum all for /metrics. */
#define LMW_CLOSE_CODES 12 /* closes[i] counts LMW_CLOSE_CODE_LIST[i]; last = other */
#define LMW_DROP_REASONS 4
#define LMW_DROP_WRITE_LIMIT 0
#define LMW_DROP_CLOSED 1
#define LMW_DROP_LATEST 2
#define LMW_DROP_WORKER_QUEUE 3
#define LMW_ERRORS 2
#define LMW_ERR_EPOLL 0 /* epoll_ctl refused a change */
#define LMW_ERR_NOMEM 1 /* an allocation failed: a connection was closed (1011, 503) */
typedef struct {
    uint64_t connections;      /* open WebSocket connections */
    uint64_t handshakes;       /* heads being read now */
    uint64_t handshakes_total; /* completed upgrades */
    uint64_t rejects_total;    /* heads answered with an HTTP error */
    uint64_t http_requests_total;
    uint64_t frames_sent_total;
    uint64_t messages_received_total;
    uint64_t buffer_pool_in_use;
    uint64_t spill_bytes;
    uint64_t pending_write_bytes;
    uint64_t accept_paused;            /* 1 while the listeners are not polled */
    uint64_t hooks_in_flight;          /* kept by Python: hook calls off the loop thread */
    uint64_t handshakes_parked;        /* requests waiting for an off-loop hook (lmw_park) */
    uint64_t loop_lag_us;              /* longest loop lag of about the last 10 s (issue 17) */
    uint64_t loop_lag_max_us;          /* longest loop lag since start */
    uint64_t handshake_timeouts_total; /* heads answered 408 by the sweep */
    uint64_t ping_timeouts_total;      /* connections dropped for a missed pong (1006) */
    uint64_t deflate_in_bytes_total;   /* payload bytes of the messages sent compressed */
    uint64_t deflate_out_bytes_total;  /* the same messages' compressed payload bytes */
    uint64_t messages_deflated_total;  /* messages compressed (once per publish) */
    uint64_t messages_inflated_total;  /* compressed messages received */
    uint64_t deflate_streams;          /* zlib streams held by the pool (bounded) */
    uint64_t paced_in_flight;          /* paced sends not finished (_paced.c) */
    uint64_t paced_deliveries_total;   /* members that took a paced send's frame */
    uint64_t paced_dropped_total;      /* members a paced send had not reached at shutdown */
    uint64_t paced_cancelled_total;    /* members a cancelled paced send had not reached */
    uint64_t paced_rate;               /* members reached per second, over the last second */
    uint64_t closes[LMW_CLOSE_CODES];
    uint64_t dropped[LMW_DROP_REASONS];
    uint64_t errors[LMW_ERRORS]; /* LMW_ERR_*: failures handled, counted so none is silent */
    uint64_t pid;
    uint64_t tls[LMW_TLS_COUNTERS]; /* LMW_TLS_*: TLS handshakes and every bad-input outcome */
    uint64_t user_names;            /* long str user ids online here, by name (_user_names.c) */
    uint64_t user_name_bytes;       /* the bytes their entries and table take */
} lmw_stats;

/* lmw_close_code_index maps a close code to its slot in lmw_stats.closes. */
int lmw_close_code_index(int code);

/* Events lmw_poll hands to Python. */
#define LMW_EV_UPGRADE 1 /* a valid upgrade waits: answer with lmw_upgrade_accept/lmw_reject */
#define LMW_EV_HTTP 2    /* a plain HTTP request (head + body) waits: answer with lmw_respond */
#define LMW_EV_MESSAGE 3 /* a complete message: opcode, data, len */
#define LMW_EV_CLOSED 4  /* an open connection ended: code; len 1: it holds the user's name */
#define LMW_EV_WAKE 5    /* lmw_wake was called */

/* lmw_event: data and request are borrowed; valid only until the next lmw_poll (copy them
 * to keep them longer: lmw_park keeps the request itself waiting, not its bytes). */
typedef struct {
    uint8_t type;
    uint8_t opcode;
    uint16_t code;
    int32_t fd;
    uint32_t gen;
    uint32_t pad;
    uint64_t user_tag;
    uint64_t len;
    const uint8_t *data;
    const lmw_request *request;
} lmw_event;

typedef struct lmw_server lmw_server;

/* lmw_server_new makes a server; stats may point into shared memory, or be NULL. */
lmw_server *lmw_server_new(const lmw_config *cfg, lmw_stats *stats);
void lmw_server_free(lmw_server *s);

/* lmw_listen_add takes a bound, listening, non-blocking socket fd (at most
 * LMW_MAX_LISTENERS); LMW_ERROR when there is no room or epoll refuses it. */
#define LMW_MAX_LISTENERS 8
int lmw_listen_add(lmw_server *s, int fd);

/* lmw_adopt takes an already connected, non-blocking stream socket as a new connection
 * whose request head is still to be read, as if accepted (for socketpairs: tests, fuzzing,
 * hand-offs). Returns 0, or LMW_ERROR (fd out of range or in use). */
int lmw_adopt(lmw_server *s, int fd);

/* lmw_listen_stop stops accepting for good (shutdown). */
void lmw_listen_stop(lmw_server *s);

/* lmw_poll waits up to timeout_ms, does the WebSocket work it can do in C (accept,
 * handshakes without hooks, frames, pongs, closes, pending sends, the sweep) and
 * returns the number of events for Python, stored at *out (owned by the server, valid
 * until the next call). At most max UPGRADE/HTTP/MESSAGE events are made per call (the
 * rest of the input waits, parsed on the next call); CLOSED and WAKE events are never
 * held back. It first releases what the previous call lent, and answers an upgrade or
 * HTTP request that Python left unanswered with 500. The steps of paced sends are taken
 * within the wait, without returning; when the next step would fall after timeout_ms the
 * call returns at the last one before it (a little early), so the caller's turn shares
 * that wake-up. */
int lmw_poll(lmw_server *s, int timeout_ms, lmw_event **out, int max);

/* lmw_wake makes a concurrent or the next lmw_poll return LMW_EV_WAKE. Thread-safe. */
int lmw_wake(lmw_server *s);

/* Answers to events, and sends. All are thread-safe and check (fd, gen): a stale handle
 * gets LMW_ERROR and never touches a reused fd. */
/* lmw_park keeps an UPGRADE or HTTP event of the current batch waiting for its answer
 * beyond the next lmw_poll (a hook that answers from another thread or a coroutine). Call
 * it before the next lmw_poll. The request stays a handshake: counted against
 * max_handshakes, answered 408 by the sweep once handshake_timeout has passed since the
 * connection was accepted, 503 by lmw_close_all; its socket is not read meanwhile, and a
 * client that hangs up is freed at once (a later answer then gets LMW_ERROR, like any
 * answer to a handle that is stale). Returns 0, or LMW_ERROR when (fd, gen) does not await
 * an answer of this batch or there was no memory (then it is answered with 503). */
int lmw_park(lmw_server *s, int fd, uint32_t gen);

/* lmw_park_waiting parks (as lmw_park) every UPGRADE and HTTP event of the current batch
 * still waiting for its answer: one call per batch instead of one per event (each call
 * lets other Python threads take the GIL). Returns how many were parked. */
int lmw_park_waiting(lmw_server *s);

/* lmw_accept_hold stops (hold = 1) or allows again (hold = 0) accepting new connections:
 * the application's hooks are at their cap, so new clients wait in the listen backlog. */
void lmw_accept_hold(lmw_server *s, int hold);

int lmw_upgrade_accept(lmw_server *s, int fd, uint32_t gen, const uint8_t *protocol,
                       size_t protocol_len, uint64_t user_tag);
int lmw_reject(lmw_server *s, int fd, uint32_t gen, int status);
int lmw_respond(lmw_server *s, int fd, uint32_t gen, const uint8_t *data, size_t len);
/* lmw_send returns 1 sent or queued, 0 dropped (write limit), LMW_ERROR stale/closed. */
int lmw_send(lmw_server *s, int fd, uint32_t gen, int opcode, const uint8_t *data, size_t len);
int lmw_close(lmw_server *s, int fd, uint32_t gen, int code, const uint8_t *reason,
              size_t reason_len);
/* lmw_close_all sends close code to every open connection (shutdown: 1001). */
int lmw_close_all(lmw_server *s, int code);
int lmw_pause_reading(lmw_server *s, int fd, uint32_t gen);
int lmw_resume_reading(lmw_server *s, int fd, uint32_t gen);
int lmw_is_open(lmw_server *s, int fd, uint32_t gen);
uint32_t lmw_connection_count(lmw_server *s);
lmw_stats *lmw_server_stats(lmw_server *s);

/* ------------------------------------------------------------------------------------
 * Hub (_hub.c, _fanout.c): membership and fan-out. A topic is a 64-bit id that Python
 * derives from the topic name with a keyed hash, so a topic costs no Python object; 0 is
 * not a topic.
 * ---------------------------------------------------------------------------------- */

int lmw_subscribe(lmw_server *s, int fd, uint32_t gen, uint64_t topic);
int lmw_unsubscribe(lmw_server *s, int fd, uint32_t gen, uint64_t topic);
uint32_t lmw_topic_size(lmw_server *s, uint64_t topic);
/* lmw_is_member reports whether (fd, gen) is a member of topic. */
int lmw_is_member(lmw_server *s, int fd, uint32_t gen, uint64_t topic);

/* Presence and kick (_presence.c, issue 12). lmw_user_count is the number of open
 * connections tagged user_tag (0 for tag 0). lmw_close_user starts the closing handshake
 * with code and reason on each of them and returns how many, or LMW_ERROR for tag 0, a code
 * that may not be sent or a reason over LMW_CLOSE_REASON_MAX bytes. */
uint32_t lmw_user_count(lmw_server *s, uint64_t user_tag);
int64_t lmw_close_user(lmw_server *s, uint64_t user_tag, int code, const uint8_t *reason,
                       size_t reason_len);

/* Fan-out: the frame is built once and written to every member in one loop. Each
 * returns the number of connections the frame was sent or queued to; dropped and closed
 * members are counted in lmw_stats.dropped. */
int64_t lmw_publish(lmw_server *s, uint64_t topic, int opcode, const uint8_t *data, size_t len,
                    int policy);
int64_t lmw_send_user(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data, size_t len,
                      int policy);
int64_t lmw_broadcast(lmw_server *s, int opcode, const uint8_t *data, size_t len, int policy);

/* The envelope subprotocol (issue 12, docs/envelope.md): a connection that chose it gets every
 * data message wrapped (its stream position with it); the others get the raw payload. The
 * _env fan-outs take both forms, each built once: env/env_len (a text frame) go to the
 * connections that chose the subprotocol, data/len to the others (data NULL: to nobody else). */
#define LMW_ENVELOPE_PROTOCOL_LEN 11 /* strlen("lowmemws.v1") */
int64_t lmw_publish_env(lmw_server *s, uint64_t topic, int opcode, const uint8_t *data, size_t len,
                        const uint8_t *env, size_t env_len, int policy);
int64_t lmw_send_user_env(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data,
                          size_t len, const uint8_t *env, size_t env_len, int policy);
int64_t lmw_broadcast_env(lmw_server *s, int opcode, const uint8_t *data, size_t len,
                          const uint8_t *env, size_t env_len, int policy);
/* lmw_is_envelope reports whether (fd, gen) is open and chose the envelope subprotocol. */
int lmw_is_envelope(lmw_server *s, int fd, uint32_t gen);
/* lmw_set_user retags an open connection (0: none), e.g. once its resume replay is sent.
 * Returns 0, or LMW_ERROR for a stale or closed handle. */
int lmw_set_user(lmw_server *s, int fd, uint32_t gen, uint64_t user_tag);

/* The names of long str user ids (_user_names.c, issue 12): the tag of a str id too long for
 * it (the top bit set, the next one clear) is a keyed hash, so the name is kept here, one
 * entry per such user online in this process. lmw_user_name_hold keeps tag's entry (made
 * with the name's UTF-8 if there is none) until lmw_user_name_release; hold it before the
 * upgrade that tags a connection with it, release it after: from then on the entry lives as
 * long as a connection of the user does here. Returns 0, or LMW_ERROR for a tag that is not
 * a long str id's, an empty name or one over LMW_USER_NAME_MAX bytes, or no memory.
 * lmw_user_name copies tag's name into out (cap bytes) and returns its length, or LMW_ERROR
 * when the name is not known here (or does not fit). A closed event whose len is 1 holds its
 * user's name (so on_close can read it): release it once the event is handled. */
#define LMW_USER_NAME_MAX 256 /* bytes of UTF-8 in a str user id */
int lmw_user_name_hold(lmw_server *s, uint64_t tag, const uint8_t *name, size_t len);
void lmw_user_name_release(lmw_server *s, uint64_t tag);
int lmw_user_name(lmw_server *s, uint64_t tag, uint8_t *out, size_t cap);

/* ------------------------------------------------------------------------------------
 * Paced fan-out (_paced.c, issue 18): one frame to many, spread over time by the loop.
 * ---------------------------------------------------------------------------------- */

#define LMW_PACE_TOPIC 0 /* the members of a topic */
#define LMW_PACE_USERS 1 /* the connections tagged with any of a set of user tags */
#define LMW_PACE_ALL 2   /* every open connection */

/* lmw_paced_start sends one frame (built once) to `to`'s members of this server over time:
 * spread_s > 0 spreads the members present now evenly over that many seconds; otherwise
 * rate > 0 reaches at most that many members per second; with neither, every member gets
 * it now, before the call returns (the batch form of lmw_send_user). The loop sends, in fd
 * order, from a cursor: a member that leaves before the cursor reaches it is skipped; a
 * connection that joins during the send gets it only if its fd is ahead of the cursor and
 * below the highest fd in use when the send started; none gets it twice. users/nusers are
 * copied (LMW_PACE_USERS only). id names the send for lmw_paced_cancel (several may share
 * one). Returns the members found now (paced), the number that took the frame (not
 * paced), or LMW_ERROR (a bad argument or no memory). */
int64_t lmw_paced_start(lmw_server *s, uint64_t id, int to, uint64_t topic, const uint64_t *users,
                        size_t nusers, int opcode, const uint8_t *data, size_t len, int policy,
                        double spread_s, double rate);
/* lmw_paced_start_env is lmw_paced_start with env/env_len (an envelope text, issue 12): the
 * connections that chose the envelope subprotocol get env as a text frame, the others the
 * data frame; each frame is built once. env NULL: everyone gets the data frame. */
int64_t lmw_paced_start_env(lmw_server *s, uint64_t id, int to, uint64_t topic,
                            const uint64_t *users, size_t nusers, int opcode, const uint8_t *data,
                            size_t len, const uint8_t *env, size_t env_len, int policy,
                            double spread_s, double rate);

/* lmw_paced_cancel ends every paced send named id; returns the members they had not reached
 * (counted in lmw_stats.paced_cancelled_total). lmw_close_all ends every paced send the same
 * way (counted in paced_dropped_total): a stopping server never sends a remainder at once. */
int64_t lmw_paced_cancel(lmw_server *s, uint64_t id);

/* ------------------------------------------------------------------------------------
 * Interest (_interest.c, issue 15): which routing partitions this server has members in,
 * so a bus between machines subscribes only to the channels of those partitions.
 * ---------------------------------------------------------------------------------- */

/* LMW_PARTITIONS is the number of routing partitions of users, and of topics (a power of
 * two; lowmemws._routing explains the choice). A topic id carries its partition in its low
 * bits (id & (LMW_PARTITIONS - 1)); a user tag's is lmw_user_partition(tag). */
#define LMW_PARTITIONS 4096

/* lmw_user_partition is the routing partition of user_tag: the same on every node. */
uint32_t lmw_user_partition(uint64_t user_tag);

/* lmw_interest_watch makes the server write one byte to fd (non-blocking; a full pipe
 * already holds a wake-up) whenever a partition gains its first local member or loses its
 * last; -1 stops it. */
void lmw_interest_watch(lmw_server *s, int fd);

/* lmw_interest fills users and topics (LMW_PARTITIONS / 8 bytes each, bit p of byte p / 8)
 * with the partitions that have local members now. */
void lmw_interest(lmw_server *s, uint8_t *users, uint8_t *topics);

/* lmw_user_held tells whether a connection tagged user_tag is open here (1) or not (0): a
 * bus drops an envelope for a user held elsewhere before decoding it. */
int lmw_user_held(lmw_server *s, uint64_t user_tag);

/* ------------------------------------------------------------------------------------
 * Bus filter (_bus_filter.c, issue 15): RedisBus's subscriber thread frames the pub/sub
 * messages of a whole read in C and drops, undecoded, its own echoes, re-sent envelopes and
 * user envelopes for users with no connection here; Python gets the rest.
 * ---------------------------------------------------------------------------------- */

/* Envelope wire header bytes the filter peeks at (lowmemws._bus_base writes them). */
#define LMW_ENVELOPE_V1 1        /* the unpaced topic, user or broadcast version */
#define LMW_ENVELOPE_USER 1      /* a version 1 "user" kind index (low 2 bits of byte 2) */
#define LMW_ENVELOPE_KIND_MASK 3 /* the kind's bits in a version 1 envelope's byte 2 */

/* Bounds of the framing: a line, a blob or an aggregate's count; the sequence table. */
#define LMW_BUS_LINE_MAX 65536
#define LMW_BUS_BULK_MAX 1099511627776
#define LMW_BUS_SEQ_MAX 262144

/* A verdict (lmw_bus_item.kind): deliver (checked in C), not judged here (Python checks
 * it: the answer channel, a message too short for its header, a stored history envelope or
 * a history read's marker), a whole other reply (feed it to hiredis), or dropped (never
 * returned). */
#define LMW_BUS_DELIVER 1
#define LMW_BUS_UNJUDGED 2
#define LMW_BUS_REPLY 3
#define LMW_BUS_DROP 4

typedef struct lmw_bus_filter lmw_bus_filter;

/* lmw_bus_item: a message (channel and data, offsets into the scanned buffer), or a reply
 * (data_at, data_len: the whole frame). */
typedef struct lmw_bus_item {
    size_t kind;
    size_t channel_at, channel_len, data_at, data_len;
} lmw_bus_item;

/* lmw_bus_counts: what the filter dropped or noticed; the caller adds and zeroes them. */
typedef struct lmw_bus_counts {
    uint64_t unserved, duplicates, missed;
} lmw_bus_counts;

/* lmw_bus_filter_new: a filter for the node node_id (16 bytes) whose answer channel (never
 * judged here) is answers; NULL when out of memory. */
lmw_bus_filter *lmw_bus_filter_new(const uint8_t *node_id, const uint8_t *answers,
                                   size_t answers_len);
void lmw_bus_filter_free(lmw_bus_filter *f);

/* lmw_bus_filter_forget forgets the sequence numbers of count channels (unsubscribed): their
 * names one after the other in names, lengths[i] bytes each. */
void lmw_bus_filter_forget(lmw_bus_filter *f, const uint8_t *names, const size_t *lengths,
                           size_t count);

/* lmw_bus_filter_judge judges one message: LMW_BUS_DELIVER, LMW_BUS_UNJUDGED or
 * LMW_BUS_DROP. hub may be NULL (no user check). */
int lmw_bus_filter_judge(lmw_bus_filter *f, lmw_server *hub, const uint8_t *channel,
                         size_t channel_len, const uint8_t *data, size_t len,
                         lmw_bus_counts *counts);

/* lmw_bus_filter_scan reads the complete frames of buf[start..len) in order, judges each
 * message and fills items (at most cap, *used of them) with what Python must see. Returns
 * the offset of the first frame not read (incomplete, or items full), or -1 when the bytes
 * break RESP (the link is unusable). */
int64_t lmw_bus_filter_scan(lmw_bus_filter *f, lmw_server *hub, const uint8_t *buf, size_t len,
                            size_t start, lmw_bus_item *items, size_t cap, size_t *used,
                            lmw_bus_counts *counts);

/* The subscriber's wait-read-judge loop (_bus_wait.c). lmw_bus_link: one subscriber link's
 * plain socket and its read buffer ([0, len) read, [0, at) scanned); heard: CLOCK_MONOTONIC
 * seconds of its last byte; error: errno of a failed read. */
typedef struct lmw_bus_link {
    int fd, more, error;
    uint8_t *buf;
    size_t size, first_size, len, at;
    double heard;
} lmw_bus_link;

/* What lmw_bus_wait returns: items of links[*which] are ready (*used of them, offsets into
 * its buf), the wake fd is readable, the timeout passed, report_every passed with messages
 * dropped (counts changed) meanwhile; or a failure of links[*which]:
 * closed by the server, a read error (error), bytes that break RESP; poll failed (errno);
 * more links than LMW_BUS_WAIT_LINKS_MAX. */
#define LMW_BUS_WAIT_ITEMS 1
#define LMW_BUS_WAIT_WOKEN 2
#define LMW_BUS_WAIT_TIMEOUT 3
#define LMW_BUS_WAIT_COUNTED 4
#define LMW_BUS_WAIT_CLOSED -1
#define LMW_BUS_WAIT_FAILED -2
#define LMW_BUS_WAIT_PROTOCOL -3
#define LMW_BUS_WAIT_POLL_FAILED -4
#define LMW_BUS_WAIT_TOO_MANY -5
#define LMW_BUS_WAIT_LINKS_MAX 1024 /* a link per Redis Cluster master: far above any */

/* lmw_bus_link_init gives link a read buffer of size bytes for socket fd: 0, or -1 when out
 * of memory. lmw_bus_link_release frees the buffer (the socket is the caller's). */
int lmw_bus_link_init(lmw_bus_link *link, int fd, size_t size);
void lmw_bus_link_release(lmw_bus_link *link);

/* lmw_bus_wait polls count links and wake_fd for at most timeout seconds, reads and judges
 * (lmw_bus_filter_scan) what arrives, and returns only when Python has something to do (see
 * the statuses above; counts: report_every seconds after the call began, once any message
 * was dropped). *which: in, the link served last (fairness); out, the link the status
 * is about. Call it with the GIL released: it blocks. */
int lmw_bus_wait(lmw_bus_filter *f, lmw_server *hub, lmw_bus_link **links, size_t count,
                 int wake_fd, double timeout, double report_every, lmw_bus_item *items, size_t cap,
                 size_t *used, lmw_bus_counts *counts, size_t *which);

/* Constants shared with Python (lowmemws._constants reads them from lib; Python keeps no
 * copies of them). RFC 6455 section 5.5: a control frame carries at most 125 payload bytes,
 * so a close reason, after the 2-byte code, at most 123. */
#define LMW_CONTROL_PAYLOAD_MAX 125
#define LMW_CLOSE_REASON_MAX 123

/* ------------------------------------------------------------------------------------
 * TLS (docs/tls.md): OpenSSL runs the handshake, lowmemws's record layer (RFC 8446
 * section 5) protects a TLS 1.3 connection afterwards.
 * ---------------------------------------------------------------------------------- */

/* lmw_tls_available is 1 when lowmemws was built with OpenSSL, else 0. */
int lmw_tls_available(void);

/* lmw_tls_configure loads a certificate chain and its private key (PEM files) and makes every
 * connection the server accepts from now on a TLS one; called again, it replaces them (a
 * reload: handshakes begin with the new certificate, established connections keep theirs).
 * Returns 0, or LMW_ERROR with a message in err (err_len bytes, NUL-terminated). */
int lmw_tls_configure(lmw_server *s, const char *certfile, const char *keyfile, char *err,
                      size_t err_len);

/* lmw_tls_expand_label is HKDF-Expand-Label (RFC 8446 section 7.1) with SHA-384 when sha384,
 * else SHA-256: out_len bytes into out. Returns 0 or LMW_ERROR. */
int lmw_tls_expand_label(int sha384, const uint8_t *secret, size_t secret_len, const char *label,
                         const uint8_t *context, size_t context_len, uint8_t *out, size_t out_len);

#endif
