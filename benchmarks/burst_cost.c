/* burst_cost.c - what this machine charges for the same work done in bursts after sleeping,
 * against the same work done back to back: the floor under any paced send's CPU (issue 18).
 *
 * A paced send does its deliveries in steps 100 ms apart; between steps the loop sleeps, and
 * on a virtual machine the next step finds cold caches (and maybe a slower clock). This
 * program does a fixed amount of pure computation (a hash over a 4 MiB buffer, no system
 * call, no socket) either all at once or split into steps separated by sleeps, and prints
 * the thread CPU time per round of work. A ratio above 1 is the machine's, not lowmemws's.
 *
 *     cc -O2 -o /tmp/burst_cost benchmarks/burst_cost.c
 *     /tmp/burst_cost 1 0 1900      # back to back: 1 step of 1,900 rounds
 *     /tmp/burst_cost 100 100 19    # 100 steps of 19 rounds, 100 ms apart (a 10 s spread)
 *     /tmp/burst_cost 10 1000 190   # 10 steps of 190 rounds, 1 s apart
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_BYTES (4u << 20) /* larger than the caches a step could keep warm */
#define MIX_ROUNDS 20000        /* register-only work per round, beside the memory walk */

static uint8_t buffer[BUFFER_BYTES];

static double thread_cpu_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

/* work does `rounds` rounds: a strided walk that reads and writes the buffer, then mixing. */
static uint64_t work(int rounds, uint64_t h) {
    for (int r = 0; r < rounds; r++) {
        for (size_t i = 0; i < BUFFER_BYTES; i += 4096 + 64 * (size_t)(r & 7)) {
            h ^= buffer[i] + (uint64_t)r;
            h *= 0x9e3779b97f4a7c15ull;
            buffer[i] = (uint8_t)h;
        }
        for (int k = 0; k < MIX_ROUNDS; k++) {
            h ^= h >> 13;
            h *= 0xbf58476d1ce4e5b9ull;
        }
    }
    return h;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s STEPS SLEEP_MS ROUNDS_PER_STEP\n", argv[0]);
        return 2;
    }
    int steps = atoi(argv[1]), sleep_ms = atoi(argv[2]), per_step = atoi(argv[3]);
    if (steps < 1 || sleep_ms < 0 || per_step < 1) {
        fprintf(stderr, "STEPS and ROUNDS_PER_STEP must be >= 1, SLEEP_MS >= 0\n");
        return 2;
    }
    uint64_t h = 1;
    double spent = 0;
    for (int s = 0; s < steps; s++) {
        double before = thread_cpu_us();
        h = work(per_step, h);
        spent += thread_cpu_us() - before;
        if (sleep_ms) usleep((useconds_t)sleep_ms * 1000u);
    }
    printf("%d steps of %d rounds, %d ms apart: %.2f us of CPU per round (check %u)\n", steps,
           per_step, sleep_ms, spent / ((double)steps * per_step), (unsigned)(h & 1));
    return 0;
}
