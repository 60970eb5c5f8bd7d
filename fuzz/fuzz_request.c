/* fuzz_request - libFuzzer target for lmw_parse_request and lmw_header_next.
 * Invariants: the outcome is a head length, incomplete or a documented status; spans lie
 * inside the head; feeding the same bytes in two pieces gives the same outcome. */
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/lmw.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

static void check_span(lmw_span s, uint32_t head_len) {
    CHECK((uint64_t)s.off + s.len <= head_len);
}

static int documented(int status) {
    return status == 400 || status == 405 || status == 426 || status == 431 || status == 501 ||
           status == 505;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t max_head = size > 0 ? 16 + data[0] * 4 : 64;
    lmw_request req;
    memset(&req, 0, sizeof req);
    int rc = lmw_parse_request(data, size, max_head, &req);
    if (rc == LMW_ERROR) {
        CHECK(documented(req.status));
        size_t n;
        CHECK(lmw_reject_response(req.status, &n) != NULL && n > 0);
    } else if (rc == LMW_INCOMPLETE) {
        CHECK(size < max_head);
    } else {
        CHECK(rc >= 4 && (size_t)rc <= size && (size_t)rc <= max_head);
        CHECK(memcmp(data + rc - 4, "\r\n\r\n", 4) == 0);
        CHECK(req.kind == LMW_KIND_HTTP || req.kind == LMW_KIND_UPGRADE);
        check_span(req.method, rc);
        check_span(req.target, rc);
        check_span(req.path, rc);
        check_span(req.query, rc);
        for (int i = 0; i < LMW_H_COUNT; i++) check_span(req.headers[i], rc);
        uint32_t pos = 0, count = 0;
        lmw_span name, value;
        while (lmw_header_next(data, (size_t)rc, &pos, &name, &value)) {
            check_span(name, rc);
            check_span(value, rc);
            CHECK(name.len > 0);
            count++;
        }
        CHECK(count == req.header_count);
        if (req.kind == LMW_KIND_UPGRADE) {
            uint8_t out[512];
            lmw_span key = req.headers[LMW_H_SEC_WEBSOCKET_KEY];
            CHECK(key.len == 24);
            CHECK(lmw_build_101(data + key.off, key.len, NULL, 0, 0, out, sizeof out) > 0);
        }
    }
    /* The same bytes in two pieces, resuming the search, must end the same way. */
    size_t cut = size / 2;
    lmw_request again;
    memset(&again, 0, sizeof again);
    int first = lmw_parse_request(data, cut, max_head, &again);
    if (first == LMW_INCOMPLETE) {
        int second = lmw_parse_request(data, size, max_head, &again);
        CHECK(second == rc);
        if (rc == LMW_ERROR) CHECK(again.status == req.status);
    }
    return 0;
}
