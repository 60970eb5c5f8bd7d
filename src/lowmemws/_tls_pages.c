/* _tls_pages.c - where the lmw_tls_conn of every TLS connection lives: 64 KiB pages of
 * fixed-size objects, mapped when needed and unmapped as soon as their last connection ends.
 *
 * Why not malloc: each lmw_tls_conn is allocated while OpenSSL's handshake allocates and frees
 * tens of kilobytes around it, so malloc would scatter thousands of them through the heap,
 * which then cannot shrink when they end (RSS stays at its peak), and would add its 8-byte
 * header to each. Pages of only these objects go back to the kernel whole. A page is found
 * from an object by its alignment. Storage only: no state changes, no sockets.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "_runtime.h"

#define PAGE_BYTES (64 * 1024)
#define FIRST_OBJECT 64 /* the page header, rounded up */

typedef struct tls_free {
    struct tls_free *next;
} tls_free;

typedef struct tls_page {
    struct tls_page *next, *prev;
    tls_free *free; /* objects given back */
    uint32_t used;  /* objects handed out */
    uint32_t fresh; /* objects never handed out start at this index */
} tls_page;

_Static_assert(sizeof(tls_page) <= FIRST_OBJECT, "the page header fits before the objects");

static const uint32_t PER_PAGE = (PAGE_BYTES - FIRST_OBJECT) / sizeof(lmw_tls_conn);

/* page_map maps one PAGE_BYTES-aligned page (over-mapped, the ends unmapped). */
static tls_page *page_map(void) {
    uint8_t *m =
        mmap(NULL, 2 * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    uintptr_t at = ((uintptr_t)m + PAGE_BYTES - 1) & ~(uintptr_t)(PAGE_BYTES - 1);
    size_t head = at - (uintptr_t)m;
    if (head) munmap(m, head);
    munmap((uint8_t *)at + PAGE_BYTES, PAGE_BYTES - head);
    return (tls_page *)at; /* fresh anonymous memory: zero */
}

static lmw_tls_conn *object(tls_page *p, uint32_t i) {
    return (lmw_tls_conn *)((uint8_t *)p + FIRST_OBJECT + (size_t)i * sizeof(lmw_tls_conn));
}

static int has_room(const tls_page *p) { return p->free || p->fresh < PER_PAGE; }

/* lmw__tls_conn_new hands out a zeroed lmw_tls_conn, or NULL (out of memory). */
lmw_tls_conn *lmw__tls_conn_new(lmw_tls_server *t) {
    tls_page *p = t->pages;
    while (p && !has_room(p)) p = p->next;
    if (!p) {
        p = page_map();
        if (!p) return NULL;
        p->next = t->pages;
        if (t->pages) t->pages->prev = p;
        t->pages = p;
    }
    lmw_tls_conn *tc;
    if (p->free) {
        tc = (lmw_tls_conn *)p->free;
        p->free = p->free->next;
        memset(tc, 0, sizeof *tc);
    } else {
        tc = object(p, p->fresh++);
    }
    p->used++;
    return tc;
}

/* lmw__tls_conn_free gives tc back (its contents wiped); a page left empty is unmapped. */
void lmw__tls_conn_free(lmw_tls_server *t, lmw_tls_conn *tc) {
    tls_page *p = (tls_page *)((uintptr_t)tc & ~(uintptr_t)(PAGE_BYTES - 1));
    memset(tc, 0, sizeof *tc); /* secrets do not outlive their connection */
    tls_free *f = (tls_free *)tc;
    f->next = p->free;
    p->free = f;
    if (--p->used) return;
    if (p->prev)
        p->prev->next = p->next;
    else
        t->pages = p->next;
    if (p->next) p->next->prev = p->prev;
    munmap(p, PAGE_BYTES);
}

/* lmw__tls_pages_free unmaps every page (the server is being freed). */
void lmw__tls_pages_free(lmw_tls_server *t) {
    for (tls_page *p = t->pages, *next; p; p = next) {
        next = p->next;
        munmap(p, PAGE_BYTES);
    }
    t->pages = NULL;
}
