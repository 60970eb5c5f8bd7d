/* _bus_wait.c - RedisBus's subscriber thread waits, reads and judges in C (issue 15).
 *
 * The socket-facing half of the subscriber's filter (_bus_filter.c is the pure half). With
 * random placement most messages reaching a node are for users held elsewhere; the filter
 * drops them without a Python object each, but every read still went through Python
 * (select, recv_into, the call into the filter: about 6 us a read), which at a few messages
 * per read was most of the cost of a dropped message. Here one call, made with the GIL
 * released, polls the links' sockets and the bus's wake-up pipe, reads into each link's own
 * buffer, frames and judges what arrived, and goes back to polling while everything was
 * dropped: Python wakes only for messages it delivers, other replies (confirmations, PONGs,
 * errors), a wake-up, a closed or failed link, the timeout (the next keepalive), or, while
 * messages are being dropped, every report_every seconds so that the drop counters reach
 * the bus's stats (bus_unserved_total) within that time; never when nothing arrives.
 *
 * A link's buffer holds [0, len): bytes read; [0, at) is scanned. The items returned point
 * into it and stay valid until the next call on the same links, which first moves the
 * unscanned tail to the front. A frame larger than the buffer doubles it (frames are
 * bounded by the filter's LMW_BUS_BULK_MAX); the buffer shrinks back to its first size once
 * it holds less than that again.
 *
 * Plain sockets only (TCP, unix): a TLS link's bytes must pass through OpenSSL in Python, so
 * RedisBus reads those links itself.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "lmw.h"

#define POLL_MAX_S 3600.0 /* one poll's longest wait: its milliseconds fit an int */

static double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* the clock of Python's time.monotonic() */
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

int lmw_bus_link_init(lmw_bus_link *link, int fd, size_t size) {
    memset(link, 0, sizeof *link);
    link->buf = malloc(size);
    if (!link->buf) return -1;
    link->fd = fd;
    link->size = link->first_size = size;
    return 0;
}

void lmw_bus_link_release(lmw_bus_link *link) {
    free(link->buf);
    link->buf = NULL;
    link->size = link->len = link->at = 0;
}

/* make_room moves the unscanned tail to the front, and grows the buffer when a frame fills
 * it whole (or shrinks it once a large frame is done). Returns 0, or -1 out of memory. */
static int make_room(lmw_bus_link *link) {
    size_t tail = link->len - link->at;
    if (link->at) memmove(link->buf, link->buf + link->at, tail);
    link->len = tail;
    link->at = 0;
    size_t wanted = link->size;
    if (tail == link->size)
        wanted = link->size * 2;
    else if (link->size > link->first_size && tail < link->first_size)
        wanted = link->first_size;
    if (wanted != link->size) {
        uint8_t *moved = realloc(link->buf, wanted);
        if (!moved) return -1;
        link->buf = moved;
        link->size = wanted;
    }
    return 0;
}

/* scan_link judges link's unscanned complete frames; *used items for Python. Returns 0, or
 * LMW_BUS_WAIT_PROTOCOL. */
static int scan_link(lmw_bus_filter *f, lmw_server *hub, lmw_bus_link *link, lmw_bus_item *items,
                     size_t cap, size_t *used, lmw_bus_counts *counts) {
    int64_t end =
        lmw_bus_filter_scan(f, hub, link->buf, link->len, link->at, items, cap, used, counts);
    if (end < 0) return LMW_BUS_WAIT_PROTOCOL;
    link->at = (size_t)end;
    link->more = *used == cap; /* items full: complete frames may be left to scan */
    return 0;
}

/* read_link receives once into link and scans. Returns 0 (*used items, maybe none), or a
 * negative LMW_BUS_WAIT_ status (link->error holds errno for LMW_BUS_WAIT_FAILED). */
static int read_link(lmw_bus_filter *f, lmw_server *hub, lmw_bus_link *link, lmw_bus_item *items,
                     size_t cap, size_t *used, lmw_bus_counts *counts) {
    *used = 0;
    if (make_room(link) < 0) {
        link->error = ENOMEM;
        return LMW_BUS_WAIT_FAILED;
    }
    ssize_t got = recv(link->fd, link->buf + link->len, link->size - link->len, 0);
    if (got == 0) return LMW_BUS_WAIT_CLOSED;
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        link->error = errno;
        return LMW_BUS_WAIT_FAILED;
    }
    link->len += (size_t)got;
    link->heard = monotonic_seconds();
    return scan_link(f, hub, link, items, cap, used, counts);
}

static uint64_t counted(const lmw_bus_counts *counts) {
    return counts->unserved + counts->duplicates + counts->missed;
}

int lmw_bus_wait(lmw_bus_filter *f, lmw_server *hub, lmw_bus_link **links, size_t count,
                 int wake_fd, double timeout, double report_every, lmw_bus_item *items, size_t cap,
                 size_t *used, lmw_bus_counts *counts, size_t *which) {
    struct pollfd fds[LMW_BUS_WAIT_LINKS_MAX + 1];
    if (count > LMW_BUS_WAIT_LINKS_MAX) return LMW_BUS_WAIT_TOO_MANY;
    *used = 0;
    for (size_t i = 0; i < count; i++) { /* frames left over when the items filled up */
        if (links[i]->more) {
            *which = i;
            int status = scan_link(f, hub, links[i], items, cap, used, counts);
            if (status < 0 || *used) return status < 0 ? status : LMW_BUS_WAIT_ITEMS;
        }
    }
    double start = monotonic_seconds();
    double deadline = start + (timeout > 0 ? timeout : 0);
    double report_at = start + (report_every > 0 ? report_every : 0);
    uint64_t at_start = counted(counts);
    for (;;) {
        for (size_t i = 0; i < count; i++) fds[i] = (struct pollfd){links[i]->fd, POLLIN, 0};
        fds[count] = (struct pollfd){wake_fd, POLLIN, 0};
        double now = monotonic_seconds();
        int dropped = counted(counts) != at_start;
        if (dropped && now >= report_at) return LMW_BUS_WAIT_COUNTED;
        double until = dropped && report_at < deadline ? report_at : deadline;
        double left = until - now;
        if (left > POLL_MAX_S) left = POLL_MAX_S;         /* a huge keepalive: poll again later */
        int ms = left > 0 ? (int)(left * 1000.0) + 1 : 0; /* + 1: never return early */
        int ready = poll(fds, count + 1, ms);
        if (ready < 0 && errno != EINTR) return LMW_BUS_WAIT_POLL_FAILED;
        if (ready == 0 && monotonic_seconds() >= deadline) return LMW_BUS_WAIT_TIMEOUT;
        if (ready <= 0) continue;
        if (fds[count].revents) return LMW_BUS_WAIT_WOKEN;
        size_t first = count ? (*which + 1) % count : 0; /* after the last link served: fair */
        for (size_t j = 0; j < count; j++) {
            size_t i = (first + j) % count;
            if (!fds[i].revents) continue;
            *which = i;
            int status = read_link(f, hub, links[i], items, cap, used, counts);
            if (status < 0 || *used) return status < 0 ? status : LMW_BUS_WAIT_ITEMS;
        }
    }
}
