// Packed sparse weights x dense activations on CPU: sparseforge's own kernels.
//
// Format ("bitmask"): a weight W of shape [N, K] is stored as
//   mask    int64 [N, KW]   KW = ceil(K / 64); bit j of word w of row n is W[n, 64 w + j] != 0
//   values  fp32 / bf16 (as int16) / int8, the nonzeros of W in row-major order, then 64 bytes of
//           zero padding (the vector loads below read up to one register past a row's last value)
//   row_ptr int64 [N + 1]   row n's values are values[row_ptr[n] : row_ptr[n + 1]]
//   scales  fp32 [N]        int8 only: W[n, k] = values[...] * scales[n]
// Batch-1 to small-batch products read each byte of the packed weight once: for every 64-column word of
// a row the set bits say which activations the next popcount values multiply. With AVX-512 VBMI2 the
// values are expanded into their lanes with vpexpand{d,w,b} (SparAMX / DeepSparse's idea: a 1-bit mask
// plus compressed values); with AVX2 with a 256-entry permutation table; otherwise with a bit loop.
// The ISA is chosen at run time (cpuid), and can be forced lower for testing (set_isa).
//
// Accumulation is in fp32 (bf16 and int8 values are exact in fp32; int8 rows are scaled once at the end),
// so an fp32 result equals the dense product of the same weight up to summation order. On the top ISA
// level (AVX512_BF16 + VNNI) two kernels also round the activations: bf16 values multiply bf16-rounded
// activations (VDPBF16PS, as a dense bf16 matmul does) and int8 codes multiply activations rounded to
// int16 per batch row (VPDPWSSD; error at most max|x_b| / 32766 per activation).

#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <string>
#include <vector>

namespace {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};

int detect_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
  // the top level also has VNNI (every CPU with AVX512_BF16 does: Cooper Lake, Sapphire Rapids, Zen 4)
  if (avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")) return AVX512BF16;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return SCALAR;
}

int g_best_isa = detect_isa();
int g_isa = g_best_isa;

enum VType { F32 = 0, BF16 = 1, I8 = 2 };

// Software prefetch distance of the value streams. Each thread reads R value streams and R mask streams at
// once, more than the hardware prefetchers follow well at every density (measured over DRAM: 70% sparse
// bf16 from 19.2 to 14.7 ms for 16 layers of 4096 x 4096).
constexpr int kPrefetchBytes = 1024;

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline float value_at(const T* p, int64_t i);
template <>
inline float value_at<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float value_at<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
template <>
inline float value_at<int8_t>(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }

// ---------------------------------------------------------------- scalar: the reference bit loop

template <typename T>
void rows_scalar(const int64_t* mask, const T* vals, const int64_t* row_ptr, const float* x, int64_t B,
                 int64_t KP, int64_t KW, int64_t n0, int64_t n1, float* out, int64_t N) {
  std::vector<float> acc(B);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const T* vp = vals + row_ptr[n];
    int64_t i = 0;
    for (int64_t w = 0; w < KW; ++w) {
      uint64_t m = static_cast<uint64_t>(mask[n * KW + w]);
      while (m) {
        int j = __builtin_ctzll(m);
        m &= m - 1;
        float v = value_at<T>(vp, i++);
        int64_t k = w * 64 + j;
        for (int64_t b = 0; b < B; ++b) acc[b] += v * x[b * KP + k];
      }
    }
    for (int64_t b = 0; b < B; ++b) out[b * N + n] = acc[b];
  }
}

// ---------------------------------------------------------------- AVX-512 (F, BW, VL, VBMI2)

// Expand the next lanes of a row into fp32 vectors: fp32 16 per step, bf16 32 per step (2 vectors),
// int8 64 per step (4 vectors). R rows are processed together so that a batch-1 product has R * V
// independent FMA chains.

template <int BT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void rows_avx512_f32(
    const int64_t* mask, const float* vals, const int64_t* row_ptr, const float* x, int64_t B, int64_t KP,
    int64_t KW, int64_t n, float* out, int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m512 acc[R][BT];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b] = _mm512_setzero_ps();
    const float* vp[R];
    for (int r = 0; r < R; ++r) vp[r] = vals + row_ptr[n + r];
    for (int64_t w = 0; w < KW; ++w) {
      uint64_t mw[R];
      for (int r = 0; r < R; ++r) mw[r] = static_cast<uint64_t>(mask[(n + r) * KW + w]);
      for (int q = 0; q < 4; ++q) {
        const int64_t k = w * 64 + q * 16;
        __m512 wv[R];
        for (int r = 0; r < R; ++r) {
          const __mmask16 m = static_cast<__mmask16>(mw[r] >> (16 * q));
          wv[r] = _mm512_maskz_expand_ps(m, _mm512_loadu_ps(vp[r]));
          vp[r] += _mm_popcnt_u32(m);
        }
        for (int b = 0; b < BT; ++b) {
          if (b >= nb) break;
          const __m512 xv = _mm512_loadu_ps(x + (b0 + b) * KP + k);
          for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(wv[r], xv, acc[r][b]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) out[(b0 + b) * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
  }
}

template <int BT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void rows_avx512_bf16(
    const int64_t* mask, const uint16_t* vals, const int64_t* row_ptr, const float* x, int64_t B, int64_t KP,
    int64_t KW, int64_t n, float* out, int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m512 acc[R][BT][2];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
    const uint16_t* vp[R];
    for (int r = 0; r < R; ++r) vp[r] = vals + row_ptr[n + r];
    for (int64_t w = 0; w < KW; ++w) {
      uint64_t mw[R];
      for (int r = 0; r < R; ++r) mw[r] = static_cast<uint64_t>(mask[(n + r) * KW + w]);
      for (int h = 0; h < 2; ++h) {
        const int64_t k = w * 64 + h * 32;
        __m512 lo[R], hi[R];
        for (int r = 0; r < R; ++r) {
          const __mmask32 m = static_cast<__mmask32>(mw[r] >> (32 * h));
          const __m512i e = _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(vp[r]));
          vp[r] += _mm_popcnt_u32(m);
          lo[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
          hi[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
        }
        for (int b = 0; b < BT; ++b) {
          if (b >= nb) break;
          const float* xb = x + (b0 + b) * KP + k;
          const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
          for (int r = 0; r < R; ++r) {
            acc[r][b][0] = _mm512_fmadd_ps(lo[r], x0, acc[r][b][0]);
            acc[r][b][1] = _mm512_fmadd_ps(hi[r], x1, acc[r][b][1]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b)
        out[(b0 + b) * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][b][0], acc[r][b][1]));
  }
}

template <int BT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void rows_avx512_i8(
    const int64_t* mask, const int8_t* vals, const int64_t* row_ptr, const float* x, int64_t B, int64_t KP,
    int64_t KW, int64_t n, float* out, int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m512 acc[R][BT][2];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
    const int8_t* vp[R];
    for (int r = 0; r < R; ++r) vp[r] = vals + row_ptr[n + r];
    for (int64_t w = 0; w < KW; ++w) {
      const int64_t k = w * 64;
      __m512i e[R];
      for (int r = 0; r < R; ++r) {
        const uint64_t m = static_cast<uint64_t>(mask[(n + r) * KW + w]);
        e[r] = _mm512_maskz_expand_epi8(static_cast<__mmask64>(m), _mm512_loadu_si512(vp[r]));
        vp[r] += _mm_popcnt_u64(m);
      }
      for (int q = 0; q < 4; ++q) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r)
          wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e[r], q)));
        for (int b = 0; b < BT; ++b) {
          if (b >= nb) break;
          const __m512 xv = _mm512_loadu_ps(x + (b0 + b) * KP + k + 16 * q);
          for (int r = 0; r < R; ++r) acc[r][b][q & 1] = _mm512_fmadd_ps(wv[r], xv, acc[r][b][q & 1]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b)
        out[(b0 + b) * N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][b][0], acc[r][b][1]));
  }
}


// bf16 values times bf16-rounded activations with VDPBF16PS (AVX512_BF16): one expand and one dot
// instruction per 32 weights, no widening. Pairs of adjacent columns share a 32-bit lane, which is also
// how the activations lie in memory, so no shuffling is needed. R = 4 rows give four independent
// accumulation chains at batch 1.
template <int BT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt"))) void rows_avx512_bf16dot(
    const int64_t* mask, const uint16_t* vals, const int64_t* row_ptr, const uint16_t* xb, int64_t B,
    int64_t KP, int64_t KW, int64_t n, float* out, int64_t N) {
  const uint32_t* mask32 = reinterpret_cast<const uint32_t*>(mask);
  const int64_t KH = 2 * KW;  // 32-column half-words per row
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m512 acc[R][BT];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b] = _mm512_setzero_ps();
    const uint16_t* vp[R];
    for (int r = 0; r < R; ++r) vp[r] = vals + row_ptr[n + r];
    for (int64_t h = 0; h < KH; ++h) {
      __m512i e[R];
      for (int r = 0; r < R; ++r) {
        const uint32_t* mp = mask32 + (n + r) * KH + h;
        const __mmask32 m = _load_mask32(const_cast<__mmask32*>(reinterpret_cast<const __mmask32*>(mp)));
        e[r] = _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(vp[r]));
        _mm_prefetch(reinterpret_cast<const char*>(vp[r]) + kPrefetchBytes, _MM_HINT_T0);
        if ((h & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(mp) + 256, _MM_HINT_T0);
        vp[r] += _mm_popcnt_u32(*mp);
      }
      for (int b = 0; b < BT; ++b) {
        if (b >= nb) break;
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (b0 + b) * KP + h * 32);
        for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)e[r], xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) out[(b0 + b) * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
  }
}


// int8 codes times activations rounded to int16 (per batch row: x ~ xq * sx, |xq| <= kActMax) with
// VPDPWSSD (AVX512_VNNI): one byte expand, two sign extensions and two dot instructions per 64 weights.
// The int32 sums are moved to fp32 every kFlushWords words, so they cannot overflow:
// kFlushWords * 64 * 127 * kActMax < 2^31.
constexpr int kActMax = 16383;
constexpr int64_t kFlushWords = 16;

template <int BT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,popcnt"))) void rows_avx512_i8dot(
    const int64_t* mask, const int8_t* vals, const int64_t* row_ptr, const int16_t* xq, const float* sx,
    int64_t B, int64_t KP, int64_t KW, int64_t n, float* out, int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m512 accf[R][BT];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) accf[r][b] = _mm512_setzero_ps();
    const int8_t* vp[R];
    for (int r = 0; r < R; ++r) vp[r] = vals + row_ptr[n + r];
    for (int64_t w0 = 0; w0 < KW; w0 += kFlushWords) {
      const int64_t w1 = std::min(KW, w0 + kFlushWords);
      __m512i acc[R][BT];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm512_setzero_si512();
      for (int64_t w = w0; w < w1; ++w) {
        __m512i lo[R], hi[R];
        for (int r = 0; r < R; ++r) {
          const uint64_t m = static_cast<uint64_t>(mask[(n + r) * KW + w]);
          const __m512i e = _mm512_maskz_expand_epi8(static_cast<__mmask64>(m), _mm512_loadu_si512(vp[r]));
          _mm_prefetch(reinterpret_cast<const char*>(vp[r]) + kPrefetchBytes, _MM_HINT_T0);
          if ((w & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + (n + r) * KW + w) + 512, _MM_HINT_T0);
          vp[r] += _mm_popcnt_u64(m);
          lo[r] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(e));
          hi[r] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(e, 1));
        }
        for (int b = 0; b < BT; ++b) {
          if (b >= nb) break;
          const int16_t* xr = xq + (b0 + b) * KP + w * 64;
          const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 32);
          for (int r = 0; r < R; ++r) {
            acc[r][b] = _mm512_dpwssd_epi32(acc[r][b], lo[r], x0);
            acc[r][b] = _mm512_dpwssd_epi32(acc[r][b], hi[r], x1);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < nb; ++b) accf[r][b] = _mm512_add_ps(accf[r][b], _mm512_cvtepi32_ps(acc[r][b]));
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) out[(b0 + b) * N + n + r] = _mm512_reduce_add_ps(accf[r][b]) * sx[b0 + b];
  }
}


// ---------------------------------------------------------------- activation sparsity: column blocks

// The column layout for skipping the weights of zero activations (TEAL, "Training-Free Activation Sparsity
// in Large Language Models"): rows are cut into blocks of kColBlock; block b stores its transpose
// W[b*kColBlock : (b+1)*kColBlock, :].T in the bitmask format (mask [K, kColBlock/64], values column after
// column, cptr [K + 1] absolute offsets). A batch-1 product reads only the columns whose activation
// survives the threshold: for each such k, y[block] += x[k] * W[block, k], with the block's 256 sums in
// 16 registers. Threads take blocks.
constexpr int64_t kColBlock = 256;
constexpr int64_t kColWords = kColBlock / 64;

template <typename T>
void colblock_scalar(const int64_t* cmask, const T* vals, const int64_t* cptr, const int64_t* ks,
                     const float* xs, int64_t nk, float* y) {
  float acc[kColBlock] = {0};
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    const float xv = xs[i];
    const T* vp = vals + cptr[k];
    int64_t j = 0;
    for (int64_t w = 0; w < kColWords; ++w) {
      uint64_t m = static_cast<uint64_t>(cmask[k * kColWords + w]);
      while (m) {
        const int b = __builtin_ctzll(m);
        m &= m - 1;
        acc[w * 64 + b] += value_at<T>(vp, j++) * xv;
      }
    }
  }
  std::memcpy(y, acc, sizeof(acc));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void colblock_avx512_bf16(
    const int64_t* cmask, const uint16_t* vals, const int64_t* cptr, const int64_t* ks, const float* xs,
    int64_t nk, float* y) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    const __m512 xv = _mm512_set1_ps(xs[i]);
    const uint64_t* m = reinterpret_cast<const uint64_t*>(cmask) + k * kColWords;
    const uint16_t* vp = vals + cptr[k];
#pragma GCC unroll 8
    for (int h = 0; h < 8; ++h) {
      const uint32_t mh = static_cast<uint32_t>(m[h >> 1] >> (32 * (h & 1)));
      const __m512i e = _mm512_maskz_expand_epi16(mh, _mm512_loadu_si512(vp));
      vp += _mm_popcnt_u32(mh);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
      acc[2 * h] = _mm512_fmadd_ps(lo, xv, acc[2 * h]);
      acc[2 * h + 1] = _mm512_fmadd_ps(hi, xv, acc[2 * h + 1]);
    }
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(y + 16 * i, acc[i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"))) void colblock_avx512_f32(
    const int64_t* cmask, const float* vals, const int64_t* cptr, const int64_t* ks, const float* xs,
    int64_t nk, float* y) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    const __m512 xv = _mm512_set1_ps(xs[i]);
    const uint64_t* m = reinterpret_cast<const uint64_t*>(cmask) + k * kColWords;
    const float* vp = vals + cptr[k];
#pragma GCC unroll 16
    for (int q = 0; q < 16; ++q) {
      const __mmask16 mq = static_cast<__mmask16>(m[q >> 2] >> (16 * (q & 3)));
      acc[q] = _mm512_fmadd_ps(_mm512_maskz_expand_ps(mq, _mm512_loadu_ps(vp)), xv, acc[q]);
      vp += _mm_popcnt_u32(mq);
    }
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(y + 16 * i, acc[i]);
}


// Row n of a packed weight, unpacked into `dst` (KP entries): bf16 values -> bf16, int8 codes -> bf16 of
// code * scale, fp32 -> fp32. Used to hand blocks of rows to a dense (AMX) matmul for large batches.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt"))) void unpack_row_avx512(
    const int64_t* mask, const void* vals, int vtype, int64_t begin, float scale, int64_t KW, int64_t n,
    void* dst) {
  const uint64_t* mrow = reinterpret_cast<const uint64_t*>(mask) + n * KW;
  if (vtype == BF16) {
    const uint16_t* vp = static_cast<const uint16_t*>(vals) + begin;
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t w = 0; w < KW; ++w)
      for (int h = 0; h < 2; ++h) {
        const uint32_t m = static_cast<uint32_t>(mrow[w] >> (32 * h));
        _mm512_storeu_si512(d + w * 64 + h * 32, _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(vp)));
        vp += _mm_popcnt_u32(m);
      }
  } else if (vtype == I8) {
    const int8_t* vp = static_cast<const int8_t*>(vals) + begin;
    uint16_t* d = static_cast<uint16_t*>(dst);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t w = 0; w < KW; ++w) {
      const __m512i e = _mm512_maskz_expand_epi8(mrow[w], _mm512_loadu_si512(vp));
      vp += _mm_popcnt_u64(mrow[w]);
      for (int q = 0; q < 4; q += 2) {
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, q))), sc);
        const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(e, q + 1))), sc);
        _mm512_storeu_si512(d + w * 64 + q * 16, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      }
    }
  } else {
    const float* vp = static_cast<const float*>(vals) + begin;
    float* d = static_cast<float*>(dst);
    for (int64_t w = 0; w < KW; ++w)
      for (int q = 0; q < 4; ++q) {
        const __mmask16 m = static_cast<__mmask16>(mrow[w] >> (16 * q));
        _mm512_storeu_ps(d + w * 64 + q * 16, _mm512_maskz_expand_ps(m, _mm512_loadu_ps(vp)));
        vp += _mm_popcnt_u32(m);
      }
  }
}

// ---------------------------------------------------------------- AVX2 + FMA: expansion by a table

struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m) {
      int s = 0;
      for (int j = 0; j < 8; ++j) idx[m][j] = (m >> j) & 1 ? s++ : -1;
    }
  }
};
const ExpandTable g_table;

__attribute__((target("avx2,fma"))) inline __m256 expand8(__m256 packed, unsigned m) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_table.idx[m]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1)));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), keep);
}

template <typename T>
__attribute__((target("avx2,fma"))) inline __m256 load8(const T* p);
template <>
__attribute__((target("avx2,fma"))) inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
__attribute__((target("avx2,fma"))) inline __m256 load8<uint16_t>(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <>
__attribute__((target("avx2,fma"))) inline __m256 load8<int8_t>(const int8_t* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

template <typename T, int BT>
__attribute__((target("avx2,fma,popcnt"))) void rows_avx2(const int64_t* mask, const T* vals,
                                                         const int64_t* row_ptr, const float* x, int64_t B,
                                                         int64_t KP, int64_t KW, int64_t n, float* out,
                                                         int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += BT) {
    const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
    __m256 acc[BT][2];
    for (int b = 0; b < BT; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    const T* vp = vals + row_ptr[n];
    for (int64_t w = 0; w < KW; ++w) {
      const uint64_t mw = static_cast<uint64_t>(mask[n * KW + w]);
      if (!mw) continue;
      for (int q = 0; q < 8; ++q) {
        const unsigned m = static_cast<unsigned>((mw >> (8 * q)) & 0xff);
        if (!m) continue;
        const __m256 wv = expand8(load8<T>(vp), m);
        vp += _mm_popcnt_u32(m);
        const int64_t k = w * 64 + q * 8;
        for (int b = 0; b < BT; ++b) {
          if (b >= nb) break;
          acc[b][q & 1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (b0 + b) * KP + k), acc[b][q & 1]);
        }
      }
    }
    for (int b = 0; b < nb; ++b) {
      const __m256 s = _mm256_add_ps(acc[b][0], acc[b][1]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      out[(b0 + b) * N + n] = _mm_cvtss_f32(h);
    }
  }
}

// ---------------------------------------------------------------- dispatch

constexpr int kBatchTile = 4;  // batch rows sharing one expansion of the weights (registers: R * BT * 2 <= 16)

template <typename T>
void run_rows(int vtype, const int64_t* mask, const T* vals, const int64_t* row_ptr, const float* x, int64_t B,
              int64_t KP, int64_t KW, int64_t N, float* out) {
  const int isa = g_isa;
  const int64_t pairs = (N + 1) / 2;
  // Rows in pairs (two independent FMA chains per vector at batch 1); the last odd row alone.
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t n = 2 * p;
    const bool two = n + 1 < N;
    if (isa >= AVX512) {
      if constexpr (std::is_same_v<T, float>) {
        if (two) rows_avx512_f32<kBatchTile, 2>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
        else rows_avx512_f32<kBatchTile, 1>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
      } else if constexpr (std::is_same_v<T, uint16_t>) {
        if (two) rows_avx512_bf16<kBatchTile, 2>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
        else rows_avx512_bf16<kBatchTile, 1>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
      } else {
        if (two) rows_avx512_i8<kBatchTile, 2>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
        else rows_avx512_i8<kBatchTile, 1>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
      }
    } else if (isa == AVX2) {
      rows_avx2<T, kBatchTile>(mask, vals, row_ptr, x, B, KP, KW, n, out, N);
      if (two) rows_avx2<T, kBatchTile>(mask, vals, row_ptr, x, B, KP, KW, n + 1, out, N);
    } else {
      rows_scalar<T>(mask, vals, row_ptr, x, B, KP, KW, n, two ? n + 2 : n + 1, out, N);
    }
  }
  (void)vtype;
}

void check_packed(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_ptr,
                  int64_t K) {
  TORCH_CHECK(mask.dtype() == torch::kInt64 && mask.dim() == 2 && mask.is_contiguous(),
              "mask must be a contiguous int64 [N, ceil(K/64)] tensor");
  TORCH_CHECK(mask.size(1) == (K + 63) / 64, "mask has ", mask.size(1), " words per row, K=", K, " needs ",
              (K + 63) / 64);
  TORCH_CHECK(row_ptr.dtype() == torch::kInt64 && row_ptr.dim() == 1 && row_ptr.numel() == mask.size(0) + 1,
              "row_ptr must be int64 [N + 1]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  const int64_t nnz = row_ptr[-1].item<int64_t>();
  const int64_t pad = 64 / static_cast<int64_t>(values.element_size());
  TORCH_CHECK(values.numel() >= nnz + pad, "values hold ", values.numel(), " entries; the rows need ", nnz,
              " plus ", pad, " of padding");
}

}  // namespace

// out[b, n] = sum_k W[n, k] * x[b, k] (times scales[n] for int8 values), fp32, for x of shape [B, K].
torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr,
                            c10::optional<torch::Tensor> scales, int64_t K) {
  check_packed(mask, values, row_ptr, K);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [B, ", K, "], got ", x.sizes());
  const int64_t N = mask.size(0), B = x.size(0), KW = mask.size(1), KP = KW * 64;
  // Activations in fp32, padded to whole 64-column words with zeros (the padding columns have no mask bits).
  torch::Tensor xp = torch::zeros({B, KP}, x.options().dtype(torch::kFloat32));
  xp.narrow(1, 0, K).copy_(x);
  torch::Tensor out = torch::empty({B, N}, xp.options());
  const int64_t* m = mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const float* xd = xp.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (values.dtype() == torch::kFloat32) {
    run_rows<float>(F32, m, values.data_ptr<float>(), rp, xd, B, KP, KW, N, o);
  } else if (values.dtype() == torch::kBFloat16 && g_isa >= AVX512BF16) {
    // activations rounded to bf16 (as a dense bf16 matmul does), padded the same way
    torch::Tensor xb = xp.to(torch::kBFloat16);
    const uint16_t* xbd = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    const uint16_t* v = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
    const int64_t quads = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < quads; ++q) {
      const int64_t n = 4 * q;
      if (n + 4 <= N) {
        rows_avx512_bf16dot<kBatchTile, 4>(m, v, rp, xbd, B, KP, KW, n, o, N);
      } else {
        for (int64_t r = n; r < N; ++r) rows_avx512_bf16dot<kBatchTile, 1>(m, v, rp, xbd, B, KP, KW, r, o, N);
      }
    }
  } else if (values.dtype() == torch::kBFloat16) {
    run_rows<uint16_t>(BF16, m, reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), rp, xd, B,
                       KP, KW, N, o);
  } else if (values.dtype() == torch::kInt8 && g_isa >= AVX512BF16) {
    // activations rounded to int16 per batch row (scale: the row's largest magnitude / kActMax)
    torch::Tensor sx = xp.abs().amax(1).clamp_min(1e-30f).div(static_cast<float>(kActMax));
    torch::Tensor xq = xp.div(sx.view({B, 1})).round().clamp(-kActMax, kActMax).to(torch::kInt16);
    const int16_t* xqd = xq.data_ptr<int16_t>();
    const float* sxd = sx.data_ptr<float>();
    const int8_t* v = values.data_ptr<int8_t>();
    const int64_t quads = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < quads; ++q) {
      const int64_t n = 4 * q;
      if (n + 4 <= N) {
        rows_avx512_i8dot<2, 4>(m, v, rp, xqd, sxd, B, KP, KW, n, o, N);
      } else {
        for (int64_t r = n; r < N; ++r) rows_avx512_i8dot<2, 1>(m, v, rp, xqd, sxd, B, KP, KW, r, o, N);
      }
    }
  } else if (values.dtype() == torch::kInt8) {
    run_rows<int8_t>(I8, m, values.data_ptr<int8_t>(), rp, xd, B, KP, KW, N, o);
  } else {
    TORCH_CHECK(false, "values must be float32, bfloat16 or int8, got ", values.dtype());
  }
  if (scales.has_value()) {
    TORCH_CHECK(scales->numel() == N, "scales must have one entry per row");
    out.mul_(scales->to(torch::kFloat32).view({1, N}));
  }
  return out;
}

// Dense rows [n0, n1) of the packed weight (values times scales for int8), in `dtype`.
torch::Tensor packed_unpack(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr,
                            c10::optional<torch::Tensor> scales, int64_t K, int64_t n0, int64_t n1,
                            at::ScalarType dtype) {
  check_packed(mask, values, row_ptr, K);
  const int64_t N = mask.size(0), KW = mask.size(1);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "row range [", n0, ", ", n1, ") outside [0, ", N, ")");
  const int64_t* m = mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  torch::Tensor sf;
  const float* s = nullptr;
  if (scales.has_value()) {
    sf = scales->to(torch::kFloat32).contiguous();
    s = sf.data_ptr<float>();
  }
  const int vt = values.dtype() == torch::kFloat32 ? F32 : values.dtype() == torch::kBFloat16 ? BF16 : I8;
  const bool fast = g_isa >= AVX512BF16 && ((vt == F32 && dtype == torch::kFloat32) ||
                                            (vt != F32 && dtype == torch::kBFloat16));
  if (fast) {
    torch::Tensor dense = torch::empty({n1 - n0, KW * 64}, torch::TensorOptions().dtype(dtype));
    const int64_t row_bytes = KW * 64 * dense.element_size();
    char* d = static_cast<char*>(dense.data_ptr());
    const void* v = values.data_ptr();
#pragma omp parallel for schedule(static)
    for (int64_t n = n0; n < n1; ++n)
      unpack_row_avx512(m, v, vt, rp[n], s ? s[n] : 1.f, KW, n, d + (n - n0) * row_bytes);
    return dense.narrow(1, 0, K);
  }
  torch::Tensor dense = torch::zeros({n1 - n0, KW * 64}, torch::TensorOptions().dtype(torch::kFloat32));
  torch::Tensor vf = values.dtype() == torch::kFloat32 ? values : values.to(torch::kFloat32);
  const float* v = vf.data_ptr<float>();
  float* d = dense.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = n0; n < n1; ++n) {
    int64_t i = rp[n];
    float* row = d + (n - n0) * KW * 64;
    const float sc = s ? s[n] : 1.f;
    for (int64_t w = 0; w < KW; ++w) {
      uint64_t bits = static_cast<uint64_t>(m[n * KW + w]);
      while (bits) {
        const int j = __builtin_ctzll(bits);
        bits &= bits - 1;
        row[w * 64 + j] = s ? v[i++] * sc : v[i++];
      }
    }
  }
  return dense.narrow(1, 0, K).to(dtype);
}

// y [N] = W x for one activation row x [K], reading only the columns with |x[k]| > threshold (column blocks).
torch::Tensor colpacked_matvec(torch::Tensor x, torch::Tensor cmask, torch::Tensor values, torch::Tensor cptr,
                               int64_t N, double threshold) {
  TORCH_CHECK(cmask.dtype() == torch::kInt64 && cmask.dim() == 3 && cmask.size(2) == kColWords &&
                  cmask.is_contiguous(), "cmask must be a contiguous int64 [blocks, K, ", kColWords, "] tensor");
  const int64_t NB = cmask.size(0), K = cmask.size(1);
  TORCH_CHECK(NB == (N + kColBlock - 1) / kColBlock, "cmask has ", NB, " blocks; N=", N, " needs ",
              (N + kColBlock - 1) / kColBlock);
  TORCH_CHECK(cptr.dtype() == torch::kInt64 && cptr.is_contiguous() && cptr.numel() == NB * (K + 1),
              "cptr must be a contiguous int64 [blocks, K + 1] tensor");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  const int64_t* cp = cptr.data_ptr<int64_t>();
  const int64_t pad = 64 / values.element_size();
  TORCH_CHECK(values.numel() >= cp[NB * (K + 1) - 1] + pad, "values hold ", values.numel(), " entries; the blocks need ",
              cp[NB * (K + 1) - 1], " plus ", pad, " of padding");
  TORCH_CHECK(x.numel() == K, "x must have ", K, " entries, got ", x.numel());
  torch::Tensor xf = x.reshape({K}).to(torch::kFloat32).contiguous();
  const float* xd = xf.data_ptr<float>();
  // the surviving activations, once for all blocks
  std::vector<int64_t> ks;
  std::vector<float> xs;
  ks.reserve(K);
  xs.reserve(K);
  const float t = static_cast<float>(threshold);
  for (int64_t k = 0; k < K; ++k)
    if (std::fabs(xd[k]) > t) {
      ks.push_back(k);
      xs.push_back(xd[k]);
    }
  const int64_t nk = static_cast<int64_t>(ks.size());
  torch::Tensor y = torch::empty({NB * kColBlock}, xf.options());
  float* yd = y.data_ptr<float>();
  const int64_t* cm = cmask.data_ptr<int64_t>();
  const bool bf16 = values.dtype() == torch::kBFloat16;
  TORCH_CHECK(bf16 || values.dtype() == torch::kFloat32, "column-packed values must be float32 or bfloat16");
  const void* v = values.data_ptr();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t* bm = cm + b * K * kColWords;
    const int64_t* bp = cp + b * (K + 1);
    float* yb = yd + b * kColBlock;
    if (g_isa >= AVX512 && bf16)
      colblock_avx512_bf16(bm, static_cast<const uint16_t*>(v), bp, ks.data(), xs.data(), nk, yb);
    else if (g_isa >= AVX512)
      colblock_avx512_f32(bm, static_cast<const float*>(v), bp, ks.data(), xs.data(), nk, yb);
    else if (bf16)
      colblock_scalar<uint16_t>(bm, static_cast<const uint16_t*>(v), bp, ks.data(), xs.data(), nk, yb);
    else
      colblock_scalar<float>(bm, static_cast<const float*>(v), bp, ks.data(), xs.data(), nk, yb);
  }
  return y.narrow(0, 0, N);
}

// A copy of `t` in memory that asks the kernel for 2 MiB pages (madvise MADV_HUGEPAGE before the first
// touch), for buffers of at least 2 MiB; smaller ones are returned as they are. Streams of packed values
// cross a 4 KiB page every few hundred weights; with 2 MiB pages the TLB covers a whole layer (measured:
// 16 layers of 4096 x 4096 at 50-70% sparsity, bf16 or int8 values, 2 threads: 3-8% faster).
torch::Tensor huge_page_copy(torch::Tensor t) {
  constexpr size_t kHuge = size_t(2) << 20;
  t = t.contiguous();
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (nbytes < kHuge || t.device().type() != torch::kCPU) return t;
  const size_t size = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, size);
  if (p == nullptr) return t;
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without transparent huge pages it changes nothing
  std::memcpy(p, t.data_ptr(), nbytes);
  return torch::from_blob(p, t.sizes(), [](void* q) { std::free(q); }, t.options());
}

// A STREAM-style read of a large buffer: the sum of its fp32 values (the caller times it).
double read_sum(torch::Tensor t) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "read_sum takes a contiguous float32 tensor");
  const float* p = t.data_ptr<float>();
  const int64_t n = t.numel();
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t i = 0; i < n; i += 4096) {
    const int64_t e = std::min(n, i + 4096);
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t j = i;
    for (; j + 4 <= e; j += 4) {
      s0 += p[j];
      s1 += p[j + 1];
      s2 += p[j + 2];
      s3 += p[j + 3];
    }
    for (; j < e; ++j) s0 += p[j];
    total += static_cast<double>(s0 + s1 + s2 + s3);
  }
  return total;
}

std::string isa() { return kIsaNames[g_isa]; }
std::string best_isa() { return kIsaNames[g_best_isa]; }

// Force a lower ISA (for tests of every path on one machine); a higher one than the CPU has is refused.
void set_isa(const std::string& name) {
  int want = -1;
  for (int i = 0; i <= AVX512BF16; ++i)
    if (name == kIsaNames[i]) want = i;
  TORCH_CHECK(want >= 0, "unknown ISA '", name, "'; use avx512bf16, avx512, avx2 or scalar");
  TORCH_CHECK(want <= g_best_isa, "this CPU does not support ", name, " (best: ", best_isa(), ")");
  g_isa = want;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_matmul", &packed_matmul, "x [B, K] times a bitmask-packed weight [N, K]^T, fp32 out");
  m.def("packed_unpack", &packed_unpack, "dense rows of a bitmask-packed weight");
  m.def("colpacked_matvec", &colpacked_matvec, "one activation row times a column-block-packed weight, "
        "skipping the columns of activations at or under the threshold");
  m.def("huge_page_copy", &huge_page_copy, "a copy in 2 MiB-page-advised memory (buffers of 2 MiB or more)");
  m.def("read_sum", &read_sum, "sum of a float32 tensor, read once (bandwidth probe)");
  m.def("isa", &isa);
  m.def("best_isa", &best_isa);
  m.def("set_isa", &set_isa);
}
