#include "cchecksum.h"
#include <string.h>

static uint32_t table[8][256];
static int table_ready;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

// Slicing-by-8: portable, about 1-2 GB/s.
static uint32_t crc32c_software(uint32_t crc, const uint8_t *p, size_t n) {
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) build_table();
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = table[7][word & 0xFF] ^ table[6][(word >> 8) & 0xFF] ^ table[5][(word >> 16) & 0xFF] ^
              table[4][(word >> 24) & 0xFF] ^ table[3][(word >> 32) & 0xFF] ^ table[2][(word >> 40) & 0xFF] ^
              table[1][(word >> 48) & 0xFF] ^ table[0][word >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

// The SSE4.2 instruction, one stream: each crc32 waits for the one before
// (3 cycles), so a single chain runs at about 8 bytes per 3 cycles.
__attribute__((target("sse4.2")))
static uint64_t crc32c_chain(uint64_t c, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    return c;
}

// Three chains at once over consecutive lanes of LANE bytes (4080 = 3 x 1360
// covers a 4 KiB page but its run header), joined by the linearity of CRCs:
// crc(r, A||B) = shift(crc(r, A), |B|) ^ crc(0, B), where shift(x, n) is x
// run through n zero bytes, a linear map applied here with four byte tables.
#define LANE 1360
static uint32_t shift_lane[4][256];
static int shift_ready;

__attribute__((target("sse4.2")))
static void build_shift(void) {
    static const uint8_t zeros[LANE];
    for (int k = 0; k < 4; k++)
        for (uint32_t i = 0; i < 256; i++) shift_lane[k][i] = (uint32_t)crc32c_chain(i << (8 * k), zeros, LANE);
    __atomic_store_n(&shift_ready, 1, __ATOMIC_RELEASE);
}

static inline uint32_t shift(uint32_t x) {
    return shift_lane[0][x & 0xFF] ^ shift_lane[1][(x >> 8) & 0xFF] ^ shift_lane[2][(x >> 16) & 0xFF] ^ shift_lane[3][x >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    if (n >= 3 * LANE) {
        if (!__atomic_load_n(&shift_ready, __ATOMIC_ACQUIRE)) build_shift();
        while (n >= 3 * LANE) {
            uint64_t a = c, b = 0, d = 0;
            for (size_t i = 0; i < LANE; i += 8) {
                uint64_t wa, wb, wd;
                memcpy(&wa, p + i, 8);
                memcpy(&wb, p + LANE + i, 8);
                memcpy(&wd, p + 2 * LANE + i, 8);
                a = __builtin_ia32_crc32di(a, wa);
                b = __builtin_ia32_crc32di(b, wb);
                d = __builtin_ia32_crc32di(d, wd);
            }
            c = shift(shift((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
            p += 3 * LANE;
            n -= 3 * LANE;
        }
    }
    c = crc32c_chain(c, p, n & ~(size_t)7);
    p += n & ~(size_t)7;
    n &= 7;
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

uint32_t tern_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    return ~crc32c_software(~crc, data, length);
}

uint32_t tern_crc32c(uint32_t crc, const void *data, size_t length) {
    static int has_sse42 = -1;
    if (has_sse42 < 0) {
        __builtin_cpu_init();
        has_sse42 = __builtin_cpu_supports("sse4.2");
    }
    crc = ~crc;
    crc = has_sse42 ? crc32c_hardware(crc, data, length) : crc32c_software(crc, data, length);
    return ~crc;
}

int tern_is_zero(const void *data, size_t length) {
    const uint8_t *p = data;
    while (length >= 64) {
        uint64_t w[8];
        memcpy(w, p, 64);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) return 0;
        p += 64;
        length -= 64;
    }
    while (length--) if (*p++) return 0;
    return 1;
}
