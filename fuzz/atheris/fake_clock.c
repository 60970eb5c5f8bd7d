/* fake_clock.c - a clock the session target can move, for the instrumented build only.
 *
 * fuzz/atheris/build.py compiles the runtime with -Dclock_gettime=lmw_fuzz_clock_gettime,
 * so the runtime's clock (and only it: libFuzzer and Python keep the real one) is the
 * monotonic time plus an offset that lmw_fuzz_clock_advance moves forward. The session
 * target moves time past handshake_timeout with it instead of sleeping; without it (the
 * regression replays under pytest, on the normal module) the target sleeps.
 */
#include <stdint.h>
#include <time.h>

#undef clock_gettime
extern int clock_gettime(clockid_t clock, struct timespec *ts);

static uint64_t offset_us;

int lmw_fuzz_clock_gettime(clockid_t clock, struct timespec *ts) {
    int r = clock_gettime(clock, ts);
    if (r == 0 && offset_us) {
        uint64_t ns = (uint64_t)ts->tv_nsec + (offset_us % 1000000u) * 1000u;
        ts->tv_sec += (time_t)(offset_us / 1000000u + ns / 1000000000u);
        ts->tv_nsec = (long)(ns % 1000000000u);
    }
    return r;
}

void lmw_fuzz_clock_advance(uint64_t us) { offset_us += us; }
