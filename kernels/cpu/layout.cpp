// Packing of int4/int3 codes and of binary weight panels (layouts in qtool_kernels.h).
#include "layout.h"

#include <cstring>

namespace qtool {
namespace cpu {

void pack_int4(const int8_t* codes, int64_t N, int64_t K, uint8_t* out) {
  const int64_t blocks = ceil_div(K, kBlock), row_bytes = blocks * 32;
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* c = codes + n * K;
    uint8_t* o = out + n * row_bytes;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t j = 0; j < 32; ++j) {
        const int64_t k0 = b * kBlock + j, k1 = k0 + 32;
        const int u0 = (k0 < K ? c[k0] : 0) + 8, u1 = (k1 < K ? c[k1] : 0) + 8;
        o[b * 32 + j] = static_cast<uint8_t>(u0 | (u1 << 4));
      }
  }
}

void pack_int3(const int8_t* codes, int64_t N, int64_t K, uint8_t* out) {
  const int64_t blocks = ceil_div(K, kBlock), row_bytes = blocks * 24;
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* c = codes + n * K;
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* o = out + n * row_bytes + b * 24;
      int u[kBlock];
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t k = b * kBlock + j;
        u[j] = (k < K ? c[k] : 0) + 4;
      }
      uint64_t high = 0;
      for (int j = 0; j < 16; ++j)
        o[j] = static_cast<uint8_t>((u[j] & 3) | (u[j + 16] & 3) << 2 | (u[j + 32] & 3) << 4 | (u[j + 48] & 3) << 6);
      for (int j = 0; j < kBlock; ++j) high |= static_cast<uint64_t>(u[j] >> 2) << j;
      std::memcpy(o + 16, &high, 8);
    }
  }
}

void decode_block(int bits, const uint8_t* block, int8_t* codes) {
  if (bits == 4) {
    for (int j = 0; j < 32; ++j) {
      codes[j] = static_cast<int8_t>((block[j] & 15) - 8);
      codes[j + 32] = static_cast<int8_t>((block[j] >> 4) - 8);
    }
    return;
  }
  uint64_t high;
  std::memcpy(&high, block + 16, 8);
  for (int j = 0; j < kBlock; ++j) {
    const int low = (block[j % 16] >> (2 * (j / 16))) & 3;
    codes[j] = static_cast<int8_t>(low + 4 * static_cast<int>((high >> j) & 1) - 4);
  }
}

static void unpack(int bits, const uint8_t* packed, int64_t N, int64_t K, int8_t* codes) {
  const int64_t blocks = ceil_div(K, kBlock), bb = block_bytes(bits);
  int8_t block[kBlock];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < blocks; ++b) {
      decode_block(bits, packed + (n * blocks + b) * bb, block);
      const int64_t count = K - b * kBlock < kBlock ? K - b * kBlock : kBlock;
      std::memcpy(codes + n * K + b * kBlock, block, count);
    }
}

void unpack_int4(const uint8_t* packed, int64_t N, int64_t K, int8_t* codes) { unpack(4, packed, N, K, codes); }
void unpack_int3(const uint8_t* packed, int64_t N, int64_t K, int8_t* codes) { unpack(3, packed, N, K, codes); }

static uint64_t tail_mask(int64_t Kw, int64_t K, int64_t word) {
  const int64_t bits = K - word * 64;
  return bits >= 64 ? ~0ULL : (bits <= 0 ? 0ULL : (1ULL << bits) - 1);
}

void binary_panels(const uint64_t* w, int64_t N, int64_t Kw, int64_t K, uint64_t* panels) {
  const int64_t np = ceil_div(N, kBinaryPanel);
  for (int64_t p = 0; p < np; ++p)
    for (int64_t k = 0; k < Kw; ++k)
      for (int64_t j = 0; j < kBinaryPanel; ++j) {
        const int64_t n = p * kBinaryPanel + j;
        panels[(p * Kw + k) * kBinaryPanel + j] = n < N ? w[n * Kw + k] & tail_mask(Kw, K, k) : 0;
      }
}

void binary_nibble_panels(const uint64_t* panels, int64_t count, int64_t Kw, uint64_t* out) {
  const uint64_t low = 0x0F0F0F0F0F0F0F0FULL;
  for (int64_t i = 0; i < count * Kw; ++i)
    for (int64_t j = 0; j < kBinaryPanel; ++j) {
      out[(2 * i) * kBinaryPanel + j] = panels[i * kBinaryPanel + j] & low;
      out[(2 * i + 1) * kBinaryPanel + j] = (panels[i * kBinaryPanel + j] >> 4) & low;
    }
}

void copy_bit_rows(const uint64_t* a, int64_t rows, int64_t Kw, int64_t K, uint64_t* tile) {
  std::memcpy(tile, a, sizeof(uint64_t) * rows * Kw);
  const uint64_t last = tail_mask(Kw, K, Kw - 1);
  if (Kw > 0 && last != ~0ULL)
    for (int64_t r = 0; r < rows; ++r) tile[r * Kw + Kw - 1] &= last;
}

}  // namespace cpu
}  // namespace qtool
