/* IEEE binary16 -> float32, exact, in plain C: for the kernels' portable paths and scalar tails (matvec.c,
 * qmatvec.c).  Included by both; native.py's build hash covers the headers a source includes. */
#ifndef KVCACHE_HALF_H
#define KVCACHE_HALF_H
#include <stdint.h>
#include <string.h>

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float v = (float)man * 0x1p-24f; /* zero or subnormal */
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else {
        bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif
