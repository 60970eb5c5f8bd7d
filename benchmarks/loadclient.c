/* loadclient: one load-client worker in C, the cheap twin of loadclients.py's Worker.
 *
 * It holds one process's share of the benchmark's idle WebSocket connections and answers the
 * server's pings at once, so that the server, not the client, is what a benchmark measures.
 * Same command line as the Python worker:
 *
 *     loadclient --host H --port P --sources 127.0.0.2,127.0.0.3 [--user-base N]
 *
 * Commands arrive on stdin, one JSON object a line as LoadClients writes them; each is answered
 * with one JSON line on stdout, in the shapes of the Python worker's replies:
 *
 *     {"cmd": "open", "count": N, "window": W, "timeout": T}
 *         -> {"opened", "wanted", "failed", "deflated", "seconds"}
 *     {"cmd": "ping", "timeout": T}   -> {"asked", "answered", "lost"}
 *     {"cmd": "close", "timeout": T}  -> {"closed_by_server", "forced"}
 *     {"cmd": "reset"}                -> {"open", "lost"}
 *     {"cmd": "exit"}                 (no answer; the worker also exits when stdin closes)
 *
 * Any other command (echo, wait_frames) is answered {"error": "..."}; --deflate is refused.
 * The parser is strict and small: one flat object, string keys without escapes, values that
 * are numbers or (for "cmd") strings without escapes.
 *
 * One epoll loop serves the sockets and stdin at once, between commands too: a command is a
 * state that the loop checks after every batch of events, so pings are answered while a
 * command runs and while the worker waits for the next one. Connections are non-blocking,
 * bound to their source address with IP_BIND_ADDRESS_NO_PORT (the kernel picks the port per
 * 4-tuple), at most `window` handshakes in flight. The 101 is checked (status line and
 * Sec-WebSocket-Accept = base64(SHA-1(key + GUID)), RFC 6455 section 4.1); then every server
 * ping is answered with a masked pong carrying its payload, a server close is answered with a
 * close, data frames are skipped. Failed connects and handshakes are counted and retried like
 * the Python worker does; an open connection that ends without a close handshake is lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RECV_SIZE 65536
#define MAX_HEAD 8192 /* the longest 101 response head accepted */
#define MAX_EVENTS 1024
#define LINE_MAX_LEN 4096

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
static const unsigned char MASK[4] = {0x37, 0xfa, 0x21, 0x3d}; /* as loadclients.MASK */

/* ------------------------------------------------------------------------------- SHA-1 */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const unsigned char *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    }
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5a827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ed9eba1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8f1bbcdc;
        } else {
            f = b ^ c ^ d;
            k = 0xca62c1d6;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

/* sha1 hashes n bytes (FIPS 180-4); the digest is 20 bytes. */
static void sha1(const void *data, size_t n, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0};
    const unsigned char *p = data;
    size_t left = n;
    for (; left >= 64; left -= 64, p += 64) sha1_block(h, p);
    unsigned char tail[128] = {0};
    memcpy(tail, p, left);
    tail[left] = 0x80;
    size_t end = left < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)n * 8;
    for (size_t i = 0; i < 8; i++) tail[end - 1 - i] = (unsigned char)(bits >> (8 * i));
    sha1_block(h, tail);
    if (end == 128) sha1_block(h, tail + 64);
    for (int i = 0; i < 20; i++) out[i] = (unsigned char)(h[i / 4] >> (24 - 8 * (i % 4)));
}

/* base64 writes the standard base64 of n bytes and a NUL; returns its length (RFC 4648). */
static size_t base64(const unsigned char *in, size_t n, char *out) {
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = digits[v >> 18 & 63];
        out[o++] = digits[v >> 12 & 63];
        out[o++] = i + 1 < n ? digits[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? digits[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

/* accept_value computes Sec-WebSocket-Accept for a 24-character key (RFC 6455 4.2.2). */
static void accept_value(const char key[24], char out[29]) {
    char joined[24 + sizeof GUID];
    unsigned char digest[20];
    memcpy(joined, key, 24);
    memcpy(joined + 24, GUID, sizeof GUID - 1);
    sha1(joined, 24 + sizeof GUID - 1, digest);
    base64(digest, 20, out);
}

/* --------------------------------------------------------------------------- the state */

enum { FREE, CONNECTING, HANDSHAKE, OPEN, CLOSING };
enum { ASKED = 1, ANSWERED = 2 }; /* a connection's part in the current ping round */

typedef struct {
    uint8_t state;
    uint8_t ping; /* ASKED | ANSWERED, valid when round == the worker's round */
    uint16_t inlen;
    uint32_t round;
    uint32_t outlen;
    uint64_t skip; /* bytes of a data frame still to discard */
    uint64_t user; /* the user id in the request path */
    char *in;      /* unparsed input kept between reads (a partial head or control frame) */
    char *out;     /* output the socket did not take yet */
    char key[24];  /* Sec-WebSocket-Key */
} conn;

enum { CMD_NONE, CMD_OPEN, CMD_PING, CMD_CLOSE };

static struct {
    char host[256];
    int port;
    struct sockaddr_in server;
    struct sockaddr_in *sources;
    size_t nsources;
    uint64_t user_base;
    int ep;
    conn *conns;
    int nconns_max;
    long nconns; /* every connection in any state */
    long nopen;  /* connections in state OPEN */
    long in_flight, failed, lost, next_user;
    uint64_t rng;
    /* the command running (the loop checks it after every batch of events) */
    int cmd;
    double start, deadline;
    long remaining, window, count, failed0, wanted;
    uint32_t round;
    long asked, answered, gone;
    long total;
    /* stdin */
    char line[LINE_MAX_LEN];
    size_t linelen;
    int stdin_closed;
} W;

static unsigned char rbuf[RECV_SIZE + MAX_HEAD];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t next_random(void) { /* splitmix64, seeded from getrandom */
    uint64_t z = (W.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void die(const char *what) {
    fprintf(stderr, "loadclient: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* reply writes one answer line to stdout (a short line on a pipe: it does not wait). */
static void reply(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) exit(0); /* the controller is gone */
        off += (int)w;
    }
}

/* ----------------------------------------------------------------------- connections */

static void set_events(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(W.ep, EPOLL_CTL_MOD, fd, &ev) < 0) die("epoll_ctl");
}

/* drop ends a connection; `expected` when we end it ourselves after our close. */
static void drop(int fd, int expected) {
    conn *c = &W.conns[fd];
    if (c->state == CONNECTING || c->state == HANDSHAKE) {
        W.in_flight--;
        W.failed++;
    } else if (!expected && c->state != CLOSING) {
        W.lost++;
    }
    if (c->state == OPEN) W.nopen--;
    if (W.cmd == CMD_PING && c->round == W.round && (c->ping & ASKED)) {
        if (c->ping & ANSWERED) W.answered--;
        W.gone++;
    }
    free(c->in);
    free(c->out);
    memset(c, 0, sizeof *c);
    W.nconns--;
    close(fd); /* also removes it from the epoll set */
}

/* send_bytes writes to a connection, keeping what the socket does not take; returns -1 when
 * the connection was dropped. */
static int send_bytes(int fd, const void *data, size_t n) {
    conn *c = &W.conns[fd];
    if (c->outlen) {
        char *grown = realloc(c->out, c->outlen + n);
        if (!grown) die("realloc");
        memcpy(grown + c->outlen, data, n);
        c->out = grown;
        c->outlen += (uint32_t)n;
        return 0;
    }
    ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            drop(fd, 0);
            return -1;
        }
        sent = 0;
    }
    if ((size_t)sent < n) {
        c->out = malloc(n - (size_t)sent);
        if (!c->out) die("malloc");
        memcpy(c->out, (const char *)data + sent, n - (size_t)sent);
        c->outlen = (uint32_t)(n - (size_t)sent);
        set_events(fd, EPOLLIN | EPOLLOUT);
    }
    return 0;
}

/* send_frame sends one masked, final client frame with a payload of at most 125 bytes. */
static int send_frame(int fd, int opcode, const unsigned char *payload, size_t n) {
    unsigned char frame[2 + 4 + 125];
    frame[0] = (unsigned char)(0x80 | opcode);
    frame[1] = (unsigned char)(0x80 | n);
    memcpy(frame + 2, MASK, 4);
    for (size_t i = 0; i < n; i++) frame[6 + i] = payload[i] ^ MASK[i & 3];
    return send_bytes(fd, frame, 6 + n);
}

static void connect_one(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        W.failed++;
        return;
    }
    int one = 1;
    const struct sockaddr_in *src = &W.sources[(size_t)W.next_user % W.nsources];
    if (fd >= W.nconns_max ||
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0 ||
        bind(fd, (const struct sockaddr *)src, sizeof *src) < 0 ||
        (connect(fd, (const struct sockaddr *)&W.server, sizeof W.server) < 0 &&
         errno != EINPROGRESS)) {
        close(fd);
        W.failed++;
        return;
    }
    conn *c = &W.conns[fd];
    memset(c, 0, sizeof *c);
    c->state = CONNECTING;
    c->user = W.user_base + (uint64_t)W.next_user++;
    unsigned char raw[16];
    uint64_t r0 = next_random(), r1 = next_random();
    memcpy(raw, &r0, 8);
    memcpy(raw + 8, &r1, 8);
    char key[25];
    base64(raw, 16, key);
    memcpy(c->key, key, 24);
    W.nconns++;
    W.in_flight++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    if (epoll_ctl(W.ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void on_writable(int fd) {
    conn *c = &W.conns[fd];
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
            drop(fd, 0);
            return;
        }
        char req[512];
        int n = snprintf(req, sizeof req,
                         "GET /ws?user=%llu HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: %.24s\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n",
                         (unsigned long long)c->user, W.host, W.port, c->key);
        c->state = HANDSHAKE;
        set_events(fd, EPOLLIN);
        send_bytes(fd, req, (size_t)n);
        return;
    }
    if (!c->outlen) {
        set_events(fd, EPOLLIN);
        return;
    }
    ssize_t sent = send(fd, c->out, c->outlen, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR) drop(fd, 0);
        return;
    }
    memmove(c->out, c->out + sent, c->outlen - (size_t)sent);
    c->outlen -= (uint32_t)sent;
    if (!c->outlen) {
        free(c->out);
        c->out = NULL;
        set_events(fd, EPOLLIN);
    }
}

/* header_is tells whether a head line is the header `name` (any case) with the value `want`
 * (surrounding blanks ignored). */
static int header_is(const char *line, size_t n, const char *name, const char *want) {
    size_t nl = strlen(name);
    if (n <= nl || line[nl] != ':' || strncasecmp(line, name, nl)) return 0;
    const char *v = line + nl + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
    return (size_t)(end - v) == strlen(want) && !memcmp(v, want, strlen(want));
}

/* finish_handshake checks the 101 at the start of buf; returns the bytes it used, 0 when the
 * head is incomplete, -1 when the connection was dropped. */
static long finish_handshake(int fd, const char *buf, size_t n) {
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!end) {
        if (n >= MAX_HEAD) {
            drop(fd, 0);
            return -1;
        }
        return 0;
    }
    conn *c = &W.conns[fd];
    char want[29];
    accept_value(c->key, want);
    const char *line = buf, *eol = memmem(line, (size_t)(end - line) + 2, "\r\n", 2);
    /* the status line: "HTTP/1.1 101 Switching Protocols" */
    const char *sp = memchr(line, ' ', (size_t)(eol - line));
    int ok = sp && eol - sp >= 4 && !memcmp(sp + 1, "101", 3) && (eol - sp == 4 || sp[4] == ' ');
    int accepted = 0;
    while (ok && eol < end) {
        line = eol + 2;
        eol = memmem(line, (size_t)(end - line) + 2, "\r\n", 2);
        if (header_is(line, (size_t)(eol - line), "sec-websocket-accept", want)) accepted = 1;
    }
    if (!ok || !accepted) {
        drop(fd, 0);
        return -1;
    }
    c->state = OPEN;
    W.nopen++;
    W.in_flight--;
    return end + 4 - buf;
}

/* parse_frames handles the server's frames in buf; returns the bytes used, -1 when the
 * connection was dropped. */
static long parse_frames(int fd, const unsigned char *buf, size_t n) {
    conn *c = &W.conns[fd];
    size_t i = 0;
    if (c->skip) {
        size_t k = c->skip < n ? (size_t)c->skip : n;
        c->skip -= k;
        i = k;
    }
    while (n - i >= 2) {
        unsigned b0 = buf[i], b1 = buf[i + 1];
        uint64_t length = b1 & 0x7f;
        size_t head = 2;
        if (b1 & 0x80) { /* a server never masks (RFC 6455 5.1) */
            drop(fd, 0);
            return -1;
        }
        if (length == 126) {
            if (n - i < 4) break;
            length = (uint64_t)buf[i + 2] << 8 | buf[i + 3];
            head = 4;
        } else if (length == 127) {
            if (n - i < 10) break;
            length = 0;
            for (size_t k = 0; k < 8; k++) length = length << 8 | buf[i + 2 + k];
            head = 10;
        }
        unsigned opcode = b0 & 0x0f;
        if (opcode < 8) { /* a data frame: skipped, even before it has all arrived */
            size_t have = n - i - head;
            if (length > have) {
                c->skip = length - have;
                return (long)n;
            }
            i += head + (size_t)length;
            continue;
        }
        if (length > 125) { /* a control frame is at most 125 bytes (RFC 6455 5.5) */
            drop(fd, 0);
            return -1;
        }
        if (n - i < head + length) break;
        const unsigned char *payload = buf + i + head;
        if (opcode == 9) {
            if (send_frame(fd, 10, payload, (size_t)length) < 0) return -1;
        } else if (opcode == 10) {
            if (W.cmd == CMD_PING && c->round == W.round && c->ping == ASKED) {
                c->ping |= ANSWERED;
                W.answered++;
            }
        } else if (opcode == 8 && c->state != CLOSING) {
            if (c->state == OPEN) W.nopen--;
            c->state = CLOSING;
            if (send_frame(fd, 8, payload, length < 2 ? (size_t)length : 2) < 0) return -1;
        }
        i += head + (size_t)length;
    }
    return (long)i;
}

static void on_readable(int fd) {
    conn *c = &W.conns[fd];
    size_t kept = c->inlen;
    if (kept) memcpy(rbuf, c->in, kept);
    ssize_t got = recv(fd, rbuf + kept, RECV_SIZE, 0);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) {
        drop(fd, 0);
        return;
    }
    size_t n = kept + (size_t)got, used = 0;
    if (c->state == HANDSHAKE) {
        long r = finish_handshake(fd, (const char *)rbuf, n);
        if (r < 0) return;
        used = (size_t)r;
    }
    if (c->state != HANDSHAKE) {
        long r = parse_frames(fd, rbuf + used, n - used);
        if (r < 0) return;
        used += (size_t)r;
    }
    size_t left = n - used;
    if (left != kept) {
        free(c->in);
        c->in = NULL;
        if (left) {
            c->in = malloc(left);
            if (!c->in) die("malloc");
        }
    }
    if (left) memcpy(c->in, rbuf + used, left);
    c->inlen = (uint16_t)left;
}

/* ---------------------------------------------------------------------------- commands */

/* A command line: one flat JSON object of at most 8 members. */
typedef struct {
    int n;
    char keys[8][32];
    char strs[8][32]; /* a string value, or "" */
    double nums[8];
    int is_num[8];
} cmdline;

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\r') p++;
    return p;
}

/* parse_string reads a JSON string without escapes into out; NULL on error. */
static const char *parse_string(const char *p, char out[32]) {
    if (*p != '"') return NULL;
    size_t k = 0;
    for (p++; *p != '"'; p++) {
        if (!*p || *p == '\\' || (unsigned char)*p < 0x20 || k == 31) return NULL;
        out[k++] = *p;
    }
    out[k] = 0;
    return p + 1;
}

/* parse_line parses {"key": value, ...}; returns 0, or -1 if it is not that. */
static int parse_line(const char *p, cmdline *cl) {
    memset(cl, 0, sizeof *cl);
    p = skip_ws(p);
    if (*p++ != '{') return -1;
    p = skip_ws(p);
    if (*p == '}') return *skip_ws(p + 1) ? -1 : 0;
    for (;;) {
        if (cl->n == 8) return -1;
        int i = cl->n++;
        if (!(p = parse_string(skip_ws(p), cl->keys[i]))) return -1;
        p = skip_ws(p);
        if (*p++ != ':') return -1;
        p = skip_ws(p);
        if (*p == '"') {
            if (!(p = parse_string(p, cl->strs[i]))) return -1;
        } else {
            char *end;
            if (*p != '-' && (*p < '0' || *p > '9')) return -1;
            cl->nums[i] = strtod(p, &end);
            if (end == p) return -1;
            cl->is_num[i] = 1;
            p = end;
        }
        p = skip_ws(p);
        if (*p == '}') return *skip_ws(p + 1) ? -1 : 0;
        if (*p++ != ',') return -1;
    }
}

/* get_num finds the number `key`; it must be there unless optional (then *v is unchanged). */
static int get_num(const cmdline *cl, const char *key, double *v) {
    for (int i = 0; i < cl->n; i++) {
        if (!strcmp(cl->keys[i], key)) {
            if (!cl->is_num[i]) return -1;
            *v = cl->nums[i];
            return 0;
        }
    }
    return -1;
}

/* only_keys tells whether the line has no member but "cmd" and the ones listed. */
static int only_keys(const cmdline *cl, const char *const *allowed) {
    for (int i = 0; i < cl->n; i++) {
        int ok = !strcmp(cl->keys[i], "cmd");
        for (const char *const *a = allowed; *a && !ok; a++) ok = !strcmp(cl->keys[i], *a);
        if (!ok) return 0;
    }
    return 1;
}

static void finish_open(void) {
    reply("{\"opened\": %ld, \"wanted\": %ld, \"failed\": %ld, \"deflated\": 0, "
          "\"seconds\": %.6f}",
          W.nopen, W.wanted, W.failed, now() - W.start);
    W.cmd = CMD_NONE;
}

static void finish_ping(void) {
    reply("{\"asked\": %ld, \"answered\": %ld, \"lost\": %ld}", W.asked, W.answered, W.lost);
    W.cmd = CMD_NONE;
}

static void finish_close(void) {
    long left = W.nconns;
    for (int fd = 0; fd < W.nconns_max && W.nconns; fd++) {
        if (W.conns[fd].state != FREE) drop(fd, 1);
    }
    reply("{\"closed_by_server\": %ld, \"forced\": %ld}", W.total - left, left);
    W.cmd = CMD_NONE;
}

/* step advances the running command after a batch of events; it answers when it is done. */
static void step(void) {
    double t = now();
    switch (W.cmd) {
    case CMD_OPEN: {
        long retry = W.failed - W.failed0;
        if (retry && !W.remaining && W.failed <= W.count) {
            /* refused or reset by a full backlog: try again, bounded by the deadline and by
             * `count` failures in all (a dead server is not retried for minutes) */
            W.remaining = retry;
            W.failed0 = W.failed;
        }
        if ((!W.remaining && !W.in_flight) || t >= W.deadline) {
            finish_open();
            return;
        }
        while (W.remaining && W.in_flight < W.window) {
            connect_one();
            W.remaining--;
        }
        return;
    }
    case CMD_PING:
        if (W.answered + W.gone >= W.asked || t >= W.deadline) finish_ping();
        return;
    case CMD_CLOSE:
        if (!W.nconns || t >= W.deadline) finish_close();
        return;
    default:
        return;
    }
}

/* start_command begins the command on one stdin line (it may answer at once). */
static void start_command(const char *text) {
    static const char *const open_keys[] = {"count", "window", "timeout", NULL};
    static const char *const timeout_key[] = {"timeout", NULL};
    static const char *const no_keys[] = {NULL};
    cmdline cl;
    const char *name = NULL;
    if (parse_line(text, &cl) < 0) {
        reply("{\"error\": \"not a command line\"}");
        return;
    }
    for (int i = 0; i < cl.n; i++) {
        if (!strcmp(cl.keys[i], "cmd") && !cl.is_num[i]) name = cl.strs[i];
    }
    if (!name) {
        reply("{\"error\": \"no cmd\"}");
        return;
    }
    double count = 0, window = 0, timeout = 0;
    W.start = now();
    if (!strcmp(name, "exit")) {
        exit(0);
    } else if (!strcmp(name, "open")) {
        if (!only_keys(&cl, open_keys) || get_num(&cl, "count", &count) < 0 ||
            get_num(&cl, "window", &window) < 0 || get_num(&cl, "timeout", &timeout) < 0 ||
            count < 0 || window < 1) {
            reply("{\"error\": \"open needs count, window and timeout\"}");
            return;
        }
        W.cmd = CMD_OPEN;
        W.count = (long)count;
        W.remaining = W.count;
        W.window = (long)window;
        W.failed0 = W.failed;
        W.wanted = W.nopen + W.count;
        W.deadline = W.start + timeout;
    } else if (!strcmp(name, "ping")) {
        if (!only_keys(&cl, timeout_key) || get_num(&cl, "timeout", &timeout) < 0) {
            reply("{\"error\": \"ping needs timeout\"}");
            return;
        }
        static const unsigned char payload[] = "ping";
        W.cmd = CMD_PING;
        W.round++;
        W.asked = W.answered = W.gone = 0;
        W.deadline = W.start + timeout;
        for (int fd = 0; fd < W.nconns_max; fd++) {
            conn *c = &W.conns[fd];
            if (c->state != OPEN) continue;
            c->round = W.round;
            c->ping = ASKED;
            W.asked++;
            send_frame(fd, 9, payload, 4);
        }
    } else if (!strcmp(name, "close")) {
        if (!only_keys(&cl, timeout_key) || get_num(&cl, "timeout", &timeout) < 0) {
            reply("{\"error\": \"close needs timeout\"}");
            return;
        }
        static const unsigned char code[2] = {1000 >> 8, 1000 & 0xff};
        W.cmd = CMD_CLOSE;
        W.total = W.nconns;
        W.deadline = W.start + timeout;
        for (int fd = 0; fd < W.nconns_max; fd++) {
            conn *c = &W.conns[fd];
            if (c->state != OPEN) continue;
            c->state = CLOSING;
            W.nopen--;
            send_frame(fd, 8, code, 2);
        }
    } else if (!strcmp(name, "reset")) {
        if (!only_keys(&cl, no_keys)) {
            reply("{\"error\": \"reset takes no arguments\"}");
            return;
        }
        reply("{\"open\": %ld, \"lost\": %ld}", W.nopen, W.lost);
        return;
    } else {
        reply("{\"error\": \"the C load client has no command %s\"}", name);
        return;
    }
    step();
}

/* on_stdin reads command text; while the buffer is full, stdin is not watched (the text
 * waits in the pipe until next_command has made room). */
static void on_stdin(void) {
    ssize_t got = read(0, W.line + W.linelen, sizeof W.line - W.linelen);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) {
        W.stdin_closed = 1;
        epoll_ctl(W.ep, EPOLL_CTL_DEL, 0, NULL);
        return;
    }
    W.linelen += (size_t)got;
    if (W.linelen == sizeof W.line) set_events(0, 0);
}

/* next_command starts the commands waiting in the buffer, one at a time. */
static void next_command(void) {
    int full = W.linelen == sizeof W.line;
    while (W.cmd == CMD_NONE) {
        char *nl = memchr(W.line, '\n', W.linelen);
        if (!nl) {
            if (W.linelen == sizeof W.line) {
                reply("{\"error\": \"command line too long\"}");
                W.linelen = 0;
            }
            break;
        }
        *nl = 0;
        char text[LINE_MAX_LEN];
        memcpy(text, W.line, (size_t)(nl - W.line) + 1);
        W.linelen -= (size_t)(nl + 1 - W.line);
        memmove(W.line, nl + 1, W.linelen);
        start_command(text);
    }
    if (full && W.linelen < sizeof W.line && !W.stdin_closed) set_events(0, EPOLLIN);
}

/* ------------------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr, "usage: loadclient --host H --port P --sources A,B,... [--user-base N]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    const char *host = NULL, *port = NULL, *sources = NULL;
    W.user_base = 1ull << 40;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--deflate")) {
            fprintf(stderr, "loadclient: permessage-deflate needs the Python load client\n");
            exit(2);
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) {
            host = v;
        } else if (!strcmp(a, "--port")) {
            port = v;
        } else if (!strcmp(a, "--sources")) {
            sources = v;
        } else if (!strcmp(a, "--user-base")) {
            char *end;
            W.user_base = strtoull(v, &end, 10);
            if (*end || !*v) usage();
        } else {
            usage();
        }
    }
    if (!host || !port || !sources || strlen(host) >= sizeof W.host) usage();
    strcpy(W.host, host);
    char *end;
    long p = strtol(port, &end, 10);
    if (*end || p < 1 || p > 65535) usage();
    W.port = (int)p;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, NULL, &hints, &ai)) usage();
    memcpy(&W.server, ai->ai_addr, sizeof W.server);
    W.server.sin_port = htons((uint16_t)p);
    freeaddrinfo(ai);
    size_t n = 1;
    for (const char *s = sources; *s; s++) n += *s == ',';
    W.sources = calloc(n, sizeof *W.sources);
    if (!W.sources) die("calloc");
    char *copy = strdup(sources), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        struct sockaddr_in *sa = &W.sources[W.nsources++];
        sa->sin_family = AF_INET;
        if (inet_pton(AF_INET, tok, &sa->sin_addr) != 1) usage();
    }
    free(copy);
    if (!W.nsources) usage();
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    if (getrandom(&W.rng, sizeof W.rng, 0) != sizeof W.rng) W.rng = (uint64_t)getpid() * 7919;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) die("getrlimit");
    W.nconns_max = rl.rlim_cur > (1 << 20) ? (1 << 20) : (int)rl.rlim_cur;
    W.conns = calloc((size_t)W.nconns_max, sizeof *W.conns);
    if (!W.conns) die("calloc");
    W.ep = epoll_create1(EPOLL_CLOEXEC);
    if (W.ep < 0) die("epoll_create1");
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.fd = 0};
    if (epoll_ctl(W.ep, EPOLL_CTL_ADD, 0, &sev) < 0) die("epoll_ctl stdin");
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        next_command();
        if (W.stdin_closed && W.cmd == CMD_NONE) return 0;
        int timeout = 1000;
        if (W.cmd != CMD_NONE) {
            double left = W.deadline - now();
            timeout = W.cmd == CMD_OPEN ? 50 : 200;
            if (left * 1000 < timeout) timeout = left > 0 ? (int)(left * 1000) + 1 : 0;
        }
        int n = epoll_wait(W.ep, evs, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t ev = evs[i].events;
            if (fd == 0) {
                on_stdin();
                continue;
            }
            if (W.conns[fd].state == FREE) continue;
            if (ev & EPOLLOUT) on_writable(fd);
            if (W.conns[fd].state != FREE && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                on_readable(fd);
            }
        }
        step();
    }
}
