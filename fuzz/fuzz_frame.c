/* fuzz_frame - libFuzzer target for the frame parser, unmasking, the message checks
 * and close payloads. Invariants: a header is accepted with its length inside the input,
 * incomplete, or refused with 1002; message checks return 0 or a documented code; the
 * rebuilt header of an accepted unmasked frame parses to the same fields. */
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/lmw.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t flags = data[0];
    const uint8_t *buf = data + 1;
    size_t len = size - 1;
    uint8_t *copy = malloc(len ? len : 1);
    memcpy(copy, buf, len);
    lmw_message_state m;
    memset(&m, 0, sizeof m);
    size_t at = 0;
    while (at < len) {
        lmw_frame f;
        int rc = lmw_parse_frame(copy + at, len - at, flags & 7, flags >> 7, &f);
        if (rc == LMW_INCOMPLETE) break;
        if (rc == LMW_ERROR) {
            CHECK(f.close_code == 1002);
            break;
        }
        CHECK(rc >= 2 && rc <= 14 && (size_t)rc <= len - at && (uint32_t)rc == f.header_len);
        CHECK(!((f.opcode & 8) && (f.payload_len > 125 || !f.fin)));
        uint8_t rebuilt[10];
        int hl = lmw_build_header(rebuilt, f.fin, f.opcode, f.payload_len);
        lmw_frame g;
        CHECK(lmw_parse_frame(rebuilt, (size_t)hl, 7, 0, &g) == hl);
        CHECK(g.payload_len == f.payload_len && g.opcode == f.opcode && g.fin == f.fin);
        int code = lmw_message_frame(&m, &f, 4096);
        if (code) {
            CHECK(code == 1002 || code == 1009);
            break;
        }
        at += (size_t)rc;
        size_t avail = len - at < f.payload_len ? len - at : (size_t)f.payload_len;
        /* unmask in two pieces: phase must make that equal to one piece */
        size_t half = avail / 2;
        lmw_unmask(copy + at, half, f.mask, 0);
        lmw_unmask(copy + at + half, avail - half, f.mask, half);
        for (size_t i = 0; i < avail; i++) CHECK((copy[at + i] ^ f.mask[i & 3]) == buf[at + i]);
        if (f.opcode == LMW_OP_CLOSE && avail == f.payload_len) {
            uint16_t cc = 0;
            int r = lmw_parse_close(copy + at, avail, &cc);
            CHECK(r == 0 || r == 1002 || r == 1007);
            if (r == 0 && avail >= 2) {
                uint8_t out[125];
                CHECK(lmw_build_close_payload(out, cc, copy + at + 2, avail - 2) == (int)avail);
            }
        } else if (!(f.opcode & 8)) {
            code = lmw_message_payload(&m, copy + at, avail);
            CHECK(code == 0 || code == 1007);
            if (code) break;
        }
        if (avail < f.payload_len) break;
        at += avail;
        if (!(f.opcode & 8)) {
            code = lmw_message_frame_end(&m, f.fin);
            CHECK(code == 0 || code == 1007);
            if (code) break;
        }
    }
    free(copy);
    return 0;
}
