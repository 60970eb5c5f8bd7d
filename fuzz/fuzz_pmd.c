/* fuzz_pmd - libFuzzer target for lmw_pmd_negotiate (RFC 7692 offers). Invariants: the
 * result is 0 or LMW_PMD_ACCEPT with server window bits 0 or 8-15; an accepted result
 * names bits the input really asked for; the 101 built from it carries the answer with
 * both no-context-takeover parameters; the input followed by a comma and a plain offer
 * is accepted unless the input broke the list syntax (then nothing after it is trusted). */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "../src/lowmemws/lmw.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) abort();                                                                      \
    } while (0)

static const char ANSWER[] = "Sec-WebSocket-Extensions: permessage-deflate; "
                             "server_no_context_takeover; client_no_context_takeover";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1); /* exact size: ASan sees any overread */
    if (!copy) return 0;
    memcpy(copy, data, size);
    int r = lmw_pmd_negotiate(copy, size);
    int bits = r & 15;
    CHECK(r == 0 || (r & ~15) == LMW_PMD_ACCEPT);
    CHECK(bits == 0 || (bits >= 8 && bits <= 15));
    CHECK(r == lmw_pmd_negotiate(copy, size));
    if (r) CHECK(memmem(copy, size, "permessage-deflate", 18) != NULL);
    uint8_t out[512];
    int n =
        lmw_build_101((const uint8_t *)"dGhlIHNhbXBsZSBub25jZQ==", 24, NULL, 0, r, out, sizeof out);
    CHECK(n > 0);
    CHECK((memmem(out, (size_t)n, ANSWER, sizeof ANSWER - 1) != NULL) == (r != 0));
    free(copy);
    return 0;
}
