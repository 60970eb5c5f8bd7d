/* codec_bench.c - the C codec timed without Python: ns per Upgrade parse, unmask and
 * UTF-8 throughput. Built and run by codec_bench.py (gcc -O2 with ../src/lowmemws/_frame.c).
 * Prints one "name value unit" line per figure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../src/lowmemws/lmw.h"

static const char browser_request[] =
    "GET /notify?user=42&v=3 HTTP/1.1\r\n"
    "Host: mail.example.com\r\n"
    "Connection: keep-alive, Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Upgrade: websocket\r\n"
    "Origin: https://mail.example.com\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\n"
    "Accept-Language: en-US,en;q=0.9,fr;q=0.8\r\n"
    "Cookie: session=3f2a9c1e8b7d4a60b5e1c2d3f4a5b6c7; theme=dark; "
    "_ga=GA1.2.1234567890.1700000000; csrftoken=Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1\r\n"
    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "\r\n";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* best_of runs fn(iters) several times and returns the fastest seconds per iteration. */
#define BEST_OF(iters, body)                                                                       \
    ({                                                                                             \
        double best = 1e9;                                                                         \
        for (int rep = 0; rep < 7; rep++) {                                                        \
            double t0 = now();                                                                     \
            for (long it = 0; it < (iters); it++) {                                                \
                body;                                                                              \
            }                                                                                      \
            double dt = (now() - t0) / (iters);                                                    \
            if (dt < best) best = dt;                                                              \
        }                                                                                          \
        best;                                                                                      \
    })

static volatile int sink;

int main(void) {
    size_t n = sizeof browser_request - 1;
    lmw_request req;
    double parse = BEST_OF(200000, {
        memset(&req, 0, sizeof req);
        sink = lmw_parse_request((const uint8_t *)browser_request, n, 8192, &req);
    });
    if (sink != (int)n || req.kind != LMW_KIND_UPGRADE) {
        fprintf(stderr, "upgrade parse failed: %d\n", sink);
        return 1;
    }
    uint8_t accept[28];
    double acc = BEST_OF(200000, {
        lmw_accept_key((const uint8_t *)"x3JJHMbDL1EzLkh9GBhXDw==", 24, accept);
        sink = accept[0];
    });
    printf("upgrade_parse_bytes %zu B\n", n);
    printf("upgrade_parse %.1f ns\n", parse * 1e9);
    printf("accept_key %.1f ns\n", acc * 1e9);

    enum { SIZE = 64 * 1024 };
    uint8_t *buf = malloc(SIZE + 8);
    for (int i = 0; i < SIZE + 8; i++) buf[i] = (uint8_t)(i * 31);
    const uint8_t mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    double unmask = BEST_OF(20000, { lmw_unmask(buf + 1, SIZE, mask, (size_t)it); });
    printf("unmask_64k %.2f GB/s\n", SIZE / unmask / 1e9);

    /* mostly ASCII: English-like text with a two-byte letter every ~60 bytes and a
     * euro sign every ~500 */
    static const char line[] = "The quick brown fox jumps over the lazy dog, caf\xc3\xa9 ";
    size_t at = 0;
    while (at + sizeof line <= SIZE) {
        memcpy(buf + at, line, sizeof line - 1);
        at += sizeof line - 1;
        if (at % 500 < 60 && at + 3 <= SIZE) {
            memcpy(buf + at, "\xe2\x82\xac", 3);
            at += 3;
        }
    }
    while (at < SIZE) buf[at++] = 'x';
    uint32_t st;
    double utf8 = BEST_OF(20000, {
        st = 0;
        sink = (int)lmw_utf8_check(&st, buf, SIZE);
    });
    if (sink != -1) {
        fprintf(stderr, "utf8 sample invalid at %d\n", sink);
        return 1;
    }
    printf("utf8_64k %.2f GB/s\n", SIZE / utf8 / 1e9);
    memset(buf, 'a', SIZE);
    double ascii = BEST_OF(20000, {
        st = 0;
        sink = (int)lmw_utf8_check(&st, buf, SIZE);
    });
    printf("utf8_64k_ascii %.2f GB/s\n", SIZE / ascii / 1e9);

    uint8_t frame[7] = {0x81, 0x81, 0x37, 0xfa, 0x21, 0x3d, 'x' ^ 0x37};
    lmw_frame f;
    double fp = BEST_OF(2000000, { sink = lmw_parse_frame(frame, sizeof frame, 0, 1, &f); });
    printf("small_frame_parse %.1f ns\n", fp * 1e9);
    free(buf);
    return 0;
}
