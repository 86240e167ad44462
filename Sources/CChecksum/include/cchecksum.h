// CRC32C (Castagnoli), the checksum of every Tern frame and snapshot section.
// In C because the SSE4.2 crc32 instruction is what makes it cheap (several
// GB/s on one core); a table-driven fallback covers CPUs without it.
#ifndef CCHECKSUM_H
#define CCHECKSUM_H
#include <stddef.h>
#include <stdint.h>

/// Continues a CRC32C over `length` bytes. Start with crc = 0; the
/// pre/post inversion is handled inside, so calls chain: crc(a+b) = crc(crc(a), b).
uint32_t tern_crc32c(uint32_t crc, const void *data, size_t length);

/// The same CRC by the table-driven code alone (tests compare the two).
uint32_t tern_crc32c_portable(uint32_t crc, const void *data, size_t length);

/// True when every byte of the range is zero (word at a time).
int tern_is_zero(const void *data, size_t length);

/// A 64-bit hash of the range (fingerprint.c): whether a page still holds what was sent.
uint64_t tern_fingerprint(const void *data, size_t length);

#endif
