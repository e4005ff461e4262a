// Fused dequantize + attention over packed KV caches on the CPU (flash-decoding).
//
// One task takes a (sequence, KV head, split of the cached tokens): it decodes a tile of keys straight from the
// packed codes into a small float buffer, scores every query row of the GQA group against it (all heads of the
// group and all new tokens share the decoded tile), keeps an online softmax, decodes the value tile and
// accumulates. The splits are merged by their log-sum-exp; with need_mass the raw scores are kept so that the
// attention mass of every cached token follows from the final log-sum-exp. No dequantized copy of the cache is
// made: per task only a tile of TILE tokens lives in floats.
//
// Every cache format kvpass stores decodes as, element (t, d) of head h:
//   v = table ? table[code] (or table[h, d, code]) : code             the code's value (identity for int)
//   v = v * ch_mul[h, d] + ch_add[h, d]                               calibrated per-channel ranges, fp8 scale
//   x = tok_zero[t, g] + tok_scale[t, g] * v                          per-token (or per-block) scale, zero point
//   x[t, idx] = outlier value                                         dense-and-sparse outliers
// with rows (codes [B, H, S, P]) or, for per-channel groups coded a residual block at a time, blocks of tokens
// (codes [B, H, NB, D, P], the block's tokens along the last axis); the first sink_n tokens and the tokens of an
// unfinished residual block come from dense model-precision buffers; keys stored before RoPE are rotated here.
// The Python side (kvpass/lowering/cpu.py) turns a cache spec and its buffers into these fields.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int TILE = 32;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

enum Kind : int64_t { DENSE = 0, ROWS = 1, BLOCKS = 2 };
enum Rope : int64_t { NO_ROPE = 0, HALF = 1, INTERLEAVED = 2 };

// The fields of one cache, in the order kvpass/lowering/cpu.py passes them.
enum TensorSlot { MAIN, TABLE, CH_MUL, CH_ADD, TOK_SCALE, TOK_ZERO, OUT_VAL, OUT_IDX, SINK, RING, COS, SIN, OV_ROWS, OV_MAP,
                  CENTRE, SIGNS, N_TENSORS };
enum IntSlot { KIND, BITS, DIM, GSIZE, CHAN_TABLE, SINK_N, RING_R, RING_FROM, RING_TO, ROPE, RDIM, BLOCK, FP8, N_INTS };
enum Fp8 : int64_t { NOT_FP8 = 0, E4M3 = 1, E5M2 = 2 };

// A strided view of a tensor whose last axis is contiguous; dtype read per element.
struct View {
  const char* ptr = nullptr;
  bool present = false;  // given (an empty tensor, e.g. a cache shorter than one residual block, has no data)
  at::ScalarType dtype = at::kFloat;
  int64_t item = 0;
  int64_t stride[4] = {0, 0, 0, 0};

  explicit operator bool() const { return present; }

  static View of(const c10::optional<at::Tensor>& t) {
    View v;
    if (!t.has_value() || !t->defined()) return v;
    TORCH_CHECK(t->device().is_cpu(), "kvpass cpu kernel: tensors must be on the CPU");
    TORCH_CHECK(t->dim() == 0 || t->stride(-1) == 1 || t->size(-1) == 1, "kvpass cpu kernel: last axis must be contiguous");
    v.present = true;
    v.ptr = static_cast<const char*>(t->data_ptr());
    v.dtype = t->scalar_type();
    v.item = t->element_size();
    // a size-1 axis broadcasts (RoPE tables of batch 1 serve every sequence)
    for (int64_t i = 0; i < std::min<int64_t>(4, t->dim()); ++i) v.stride[i] = t->size(i) == 1 ? 0 : t->stride(i);
    return v;
  }
  // Element offset of the row at leading indices (a, b, c) (a 3- or 4-axis tensor's first axes).
  int64_t at3(int64_t a, int64_t b, int64_t c) const { return a * stride[0] + b * stride[1] + c * stride[2]; }
  int64_t at4(int64_t a, int64_t b, int64_t c, int64_t d) const { return at3(a, b, c) + d * stride[3]; }

  float f(int64_t i) const {
    switch (dtype) {
      case at::kFloat: return reinterpret_cast<const float*>(ptr)[i];
      case at::kHalf: return static_cast<float>(reinterpret_cast<const at::Half*>(ptr)[i]);
      case at::kBFloat16: return static_cast<float>(reinterpret_cast<const at::BFloat16*>(ptr)[i]);
      default: TORCH_CHECK(false, "kvpass cpu kernel: unsupported float dtype ", dtype);
    }
  }
  int64_t i(int64_t k) const {
    switch (dtype) {
      case at::kByte: return reinterpret_cast<const uint8_t*>(ptr)[k];
      case at::kShort: return reinterpret_cast<const int16_t*>(ptr)[k];
      case at::kInt: return reinterpret_cast<const int32_t*>(ptr)[k];
      case at::kLong: return reinterpret_cast<const int64_t*>(ptr)[k];
      default: TORCH_CHECK(false, "kvpass cpu kernel: unsupported index dtype ", dtype);
    }
  }
  // A row of n floats starting at element offset `off`, converted into `out`.
  void row(int64_t off, int64_t n, float* __restrict out) const {
    if (dtype == at::kFloat) {
      std::memcpy(out, reinterpret_cast<const float*>(ptr) + off, n * sizeof(float));
    } else if (dtype == at::kHalf) {
      const at::Half* p = reinterpret_cast<const at::Half*>(ptr) + off;
      for (int64_t d = 0; d < n; ++d) out[d] = static_cast<float>(p[d]);
    } else if (dtype == at::kBFloat16) {
      const at::BFloat16* p = reinterpret_cast<const at::BFloat16*>(ptr) + off;
      for (int64_t d = 0; d < n; ++d) out[d] = static_cast<float>(p[d]);
    } else {
      TORCH_CHECK(false, "kvpass cpu kernel: unsupported float dtype ", dtype);
    }
  }
};

struct Cache {
  int64_t kind, bits, dim, gsize, chan_table, sink_n, ring_r, ring_from, ring_to, rope, rdim, block;
  int64_t fp8 = NOT_FP8, nout = 0, ntable = 0;
  float small_table[16] = {0};  // a shared table of up to 16 entries, padded, for in-register lookups
  View main, table, ch_mul, ch_add, scale, zero, out_val, out_idx, sink, ring, cos, sin, ov_rows, ov_map, centre, signs;

  // centre=N: the [B, H, D] centre the coded rows were taken from, added back
  void add_centre(int64_t b, int64_t h, float* __restrict row) const {
    if (!centre) return;
    const float* cp = reinterpret_cast<const float*>(centre.ptr) + b * centre.stride[0] + h * centre.stride[1];
    for (int64_t d = 0; d < dim; ++d) row[d] += cp[d];
  }

  // the overlay entry holding token t of head (b, h) at high precision, or -1
  int64_t overlay_entry(int64_t b, int64_t h, int64_t t) const {
    return ov_map ? reinterpret_cast<const int32_t*>(ov_map.ptr)[ov_map.at3(b, h, t)] : -1;
  }
};

Cache make_cache(const std::vector<c10::optional<at::Tensor>>& t, at::IntArrayRef n) {
  TORCH_CHECK(t.size() == N_TENSORS && n.size() == N_INTS, "kvpass cpu kernel: a cache takes ", N_TENSORS,
              " tensors and ", N_INTS, " ints");
  Cache c;
  c.kind = n[KIND]; c.bits = n[BITS]; c.dim = n[DIM]; c.gsize = n[GSIZE]; c.chan_table = n[CHAN_TABLE];
  c.sink_n = n[SINK_N]; c.ring_r = n[RING_R]; c.ring_from = n[RING_FROM]; c.ring_to = n[RING_TO];
  c.rope = n[ROPE]; c.rdim = n[RDIM]; c.block = n[BLOCK]; c.fp8 = n[FP8];
  c.main = View::of(t[MAIN]); c.table = View::of(t[TABLE]); c.ch_mul = View::of(t[CH_MUL]);
  c.ch_add = View::of(t[CH_ADD]); c.scale = View::of(t[TOK_SCALE]); c.zero = View::of(t[TOK_ZERO]);
  c.out_val = View::of(t[OUT_VAL]); c.out_idx = View::of(t[OUT_IDX]); c.sink = View::of(t[SINK]);
  c.ring = View::of(t[RING]); c.cos = View::of(t[COS]); c.sin = View::of(t[SIN]);
  c.ov_rows = View::of(t[OV_ROWS]); c.ov_map = View::of(t[OV_MAP]); c.centre = View::of(t[CENTRE]);
  c.signs = View::of(t[SIGNS]);
  TORCH_CHECK(!c.signs || c.signs.dtype == at::kFloat, "kvpass cpu kernel: the rotation's signs must be float32");
  TORCH_CHECK(!c.centre || c.centre.dtype == at::kFloat, "kvpass cpu kernel: the centre must be float32");
  TORCH_CHECK(!c.ov_map || c.ov_map.dtype == at::kInt, "kvpass cpu kernel: the overlay map must be int32");
  TORCH_CHECK(c.main, "kvpass cpu kernel: a cache needs its data or codes");
  if (c.kind != DENSE) TORCH_CHECK(c.main.dtype == at::kByte, "kvpass cpu kernel: codes must be uint8");
  if (c.table) {
    TORCH_CHECK(c.table.dtype == at::kFloat, "kvpass cpu kernel: the table must be float32");
    c.ntable = t[TABLE]->size(-1);
    if (!c.chan_table && c.ntable <= 16) std::memcpy(c.small_table, c.table.ptr, c.ntable * sizeof(float));
  }
  for (const View* v : {&c.ch_mul, &c.ch_add, &c.cos, &c.sin})
    TORCH_CHECK(!*v || v->dtype == at::kFloat, "kvpass cpu kernel: channel ranges and RoPE tables must be float32");
  if (c.out_val) c.nout = t[OUT_VAL]->size(-1);
  return c;
}

// Code i of a little-endian bit stream of `bits`-bit codes (kvpass.formats.packing: code i starts at bit i*bits).
inline uint32_t code_at(const uint8_t* p, int64_t bits, int64_t i) {
  int64_t bit = i * bits, byte = bit >> 3, shift = bit & 7;
  uint32_t word = p[byte];
  if (shift + bits > 8) word |= static_cast<uint32_t>(p[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

// Eight floats: GCC's vector extension compiles it to one AVX register (or two SSE ones) on any x86 and to NEON
// pairs on ARM, so the hot loops below are vectorized without intrinsics.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

inline v8i widen8(const uint8_t* p) {  // eight bytes zero-extended to eight int32 lanes
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v8i v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
#else
  return v8i{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
#endif
}
inline v8 tofloat(v8i v) { return __builtin_convertvector(v, v8); }

// The `n` codes of one packed row as floats (eight or more codes at a time in vector registers).
inline void unpack_row(const uint8_t* __restrict p, int64_t bits, int64_t n, float* __restrict out) {
  int64_t d = 0;
  if (bits == 8) {
    for (; d + 8 <= n; d += 8) store8(out + d, tofloat(widen8(p + d)));
  } else if (bits == 4) {
    for (; d + 16 <= n; d += 16) {
      const v8i w = widen8(p + d / 2), lo = w & 15, hi = w >> 4;
      store8(out + d, tofloat(__builtin_shufflevector(lo, hi, 0, 8, 1, 9, 2, 10, 3, 11)));
      store8(out + d + 8, tofloat(__builtin_shufflevector(lo, hi, 4, 12, 5, 13, 6, 14, 7, 15)));
    }
  } else if (bits == 2) {
    for (; d + 32 <= n; d += 32) {
      const v8i w = widen8(p + d / 4), c0 = w & 3, c1 = (w >> 2) & 3, c2 = (w >> 4) & 3, c3 = w >> 6;
      const v8i a = __builtin_shufflevector(c0, c1, 0, 8, 1, 9, 2, 10, 3, 11);  // codes 0, 1 of bytes 0..3
      const v8i b = __builtin_shufflevector(c2, c3, 0, 8, 1, 9, 2, 10, 3, 11);  // codes 2, 3 of bytes 0..3
      const v8i c = __builtin_shufflevector(c0, c1, 4, 12, 5, 13, 6, 14, 7, 15);
      const v8i e = __builtin_shufflevector(c2, c3, 4, 12, 5, 13, 6, 14, 7, 15);
      store8(out + d, tofloat(__builtin_shufflevector(a, b, 0, 1, 8, 9, 2, 3, 10, 11)));
      store8(out + d + 8, tofloat(__builtin_shufflevector(a, b, 4, 5, 12, 13, 6, 7, 14, 15)));
      store8(out + d + 16, tofloat(__builtin_shufflevector(c, e, 0, 1, 8, 9, 2, 3, 10, 11)));
      store8(out + d + 24, tofloat(__builtin_shufflevector(c, e, 4, 5, 12, 13, 6, 7, 14, 15)));
    }
  }
  for (; d < n; ++d) out[d] = static_cast<float>(code_at(p, bits, d));
}

// Codes (as floats) to values through the table, shared or per channel of head h.
inline void lookup_row(const Cache& c, int64_t h, float* __restrict v) {
  const float* tab = reinterpret_cast<const float*>(c.table.ptr);
  const int64_t D = c.dim, K = c.ntable;
  int64_t d = 0;
#ifdef __AVX2__
  if (c.chan_table) {  // one gather of eight channels' entries
    const float* base = tab + h * D * K;
    const __m256i lane = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(K));
    for (; d + 8 <= D; d += 8) {
      const __m256i code = _mm256_cvttps_epi32(_mm256_loadu_ps(v + d));
      const __m256i off = _mm256_add_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(d * K)), code);
      _mm256_storeu_ps(v + d, _mm256_i32gather_ps(base, off, 4));
    }
  } else if (K <= 16) {  // the table in two registers: a permute each, blended on the code's high bit
    const __m256 lo = _mm256_loadu_ps(c.small_table), hi = _mm256_loadu_ps(c.small_table + 8);
    for (; d + 8 <= D; d += 8) {
      const __m256i code = _mm256_cvttps_epi32(_mm256_loadu_ps(v + d));
      const __m256 a = _mm256_permutevar8x32_ps(lo, code), b = _mm256_permutevar8x32_ps(hi, code);
      const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(code, _mm256_set1_epi32(7)));
      _mm256_storeu_ps(v + d, _mm256_blendv_ps(a, b, high));
    }
  }
#endif
  if (c.chan_table) {
    const float* base = tab + h * D * K;
    for (; d < D; ++d) v[d] = base[d * K + static_cast<int64_t>(v[d])];
  } else {
    for (; d < D; ++d) v[d] = tab[static_cast<int64_t>(v[d])];
  }
}

// fp8 codes to floats: e5m2 is the high byte of an fp16, e4m3 is an fp16 with its exponent 8 lower, so F16C
// converts eight at a time exactly (subnormals included); the value table serves where F16C is missing.
inline void fp8_row(const Cache& c, const uint8_t* __restrict p, float* __restrict out) {
  int64_t d = 0;
#if defined(__AVX2__) && defined(__F16C__)
  const __m128i sign = _mm_set1_epi16(0x80), rest = _mm_set1_epi16(0x7f);
  for (; d + 8 <= c.dim; d += 8) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + d)));
    if (c.fp8 == E5M2) {
      _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_slli_epi16(b, 8)));
    } else {
      const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, sign), 8), _mm_slli_epi16(_mm_and_si128(b, rest), 7));
      _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f)));
    }
  }
#endif
  const float* tab = reinterpret_cast<const float*>(c.table.ptr);
  for (; d < c.dim; ++d) out[d] = tab[p[d]];
}

inline void channel_affine(const Cache& c, int64_t h, float* __restrict v) {
  const float* mul = reinterpret_cast<const float*>(c.ch_mul.ptr) + h * c.ch_mul.stride[0];
  const float* add = reinterpret_cast<const float*>(c.ch_add.ptr) + h * c.ch_add.stride[0];
  for (int64_t d = 0; d < c.dim; ++d) v[d] = v[d] * mul[d] + add[d];
}

void apply_rope(const Cache& c, int64_t b, int64_t t, float* __restrict r) {
  const float* cs = reinterpret_cast<const float*>(c.cos.ptr) + c.cos.at3(b, 0, t);
  const float* sn = reinterpret_cast<const float*>(c.sin.ptr) + c.sin.at3(b, 0, t);
  float tmp[1024];
  const int64_t rd = c.rdim;
  std::memcpy(tmp, r, rd * sizeof(float));
  if (c.rope == HALF) {
    const int64_t h = rd / 2;
    for (int64_t i = 0; i < h; ++i) r[i] = tmp[i] * cs[i] - tmp[i + h] * sn[i];
    for (int64_t i = h; i < rd; ++i) r[i] = tmp[i] * cs[i] + tmp[i - h] * sn[i];
  } else {
    for (int64_t i = 0; i < rd; i += 2) {
      r[i] = tmp[i] * cs[i] - tmp[i + 1] * sn[i];
      r[i + 1] = tmp[i + 1] * cs[i + 1] + tmp[i] * sn[i + 1];
    }
  }
}

// Hadamard codes read in the model's space: the row times R = H diag(signs), H the normalized Sylvester matrix of
// each power-of-two block (largest first, as kvpass.formats.rotation builds it), by the fast transform.
void unrotate_row(const Cache& c, float* __restrict row) {
  int64_t start = 0;
  for (int64_t rest = c.dim; rest > 0;) {
    const int64_t n = int64_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(rest)));
    float* x = row + start;
    for (int64_t h = 1; h < n; h <<= 1)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = x[j], b = x[j + h];
          x[j] = a + b;
          x[j + h] = a - b;
        }
    const float norm = 1.0f / std::sqrt(static_cast<float>(n));
    for (int64_t j = 0; j < n; ++j) x[j] *= norm;
    start += n;
    rest -= n;
  }
  const float* s = reinterpret_cast<const float*>(c.signs.ptr);
  for (int64_t d = 0; d < c.dim; ++d) row[d] *= s[d];
}

// Token t of head (b, h), decoded into `row` [dim].
void decode_token(const Cache& c, int64_t b, int64_t h, int64_t t, float* __restrict row) {
  const int64_t D = c.dim;
  if (const int64_t e = c.overlay_entry(b, h, t); e >= 0) {  // MiKV's high-precision copy wins over every source
    c.ov_rows.row(c.ov_rows.at3(b, h, e), D, row);
  } else if (t < c.sink_n) {
    c.sink.row(c.sink.at3(b, h, t), D, row);
  } else if (c.ring && t >= c.ring_from) {
    if (t < c.ring_to) c.ring.row(c.ring.at3(b, h, t % c.ring_r), D, row);
    else std::fill(row, row + D, 0.0f);
  } else if (c.kind == DENSE) {
    c.main.row(c.main.at3(b, h, t), D, row);
  } else if (c.kind == ROWS) {
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(c.main.ptr) + c.main.at3(b, h, t);
    if (c.fp8 != NOT_FP8) {
      fp8_row(c, codes, row);
    } else {
      unpack_row(codes, c.bits, D, row);
      if (c.table) lookup_row(c, h, row);
    }
    if (c.ch_mul) channel_affine(c, h, row);
    if (c.scale) {
      const int64_t off = c.scale.at3(b, h, t), ng = D / c.gsize;
      for (int64_t g = 0; g < ng; ++g) {
        const float s = c.scale.f(off + g), z = c.zero ? c.zero.f(c.zero.at3(b, h, t) + g) : 0.0f;
        float* x = row + g * c.gsize;
        int64_t d = 0;
        for (; d + 8 <= c.gsize; d += 8) store8(x + d, load8(x + d) * s + z);
        for (; d < c.gsize; ++d) x[d] = z + s * x[d];
      }
    }
    if (c.signs) unrotate_row(c, row);
    if (c.nout) {  // rotated codes: the outliers were kept before the rotation, added onto the rest
      const int64_t vo = c.out_val.at3(b, h, t), io = c.out_idx.at3(b, h, t);
      for (int64_t k = 0; k < c.nout; ++k) {
        float& x = row[c.out_idx.i(io + k)];
        x = c.signs ? x + c.out_val.f(vo + k) : c.out_val.f(vo + k);
      }
    }
    c.add_centre(b, h, row);
  } else {  // BLOCKS: the block's tokens run along the last axis of each channel's codes
    const int64_t blk = t / c.block, i = t % c.block, g = i / c.gsize;
    const uint8_t* base = reinterpret_cast<const uint8_t*>(c.main.ptr);
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(code_at(base + c.main.at4(b, h, blk, d), c.bits, i));
    if (c.table) lookup_row(c, h, row);
    if (c.ch_mul) channel_affine(c, h, row);
    if (c.scale) {
      for (int64_t d = 0; d < D; ++d) {
        const float s = c.scale.f(c.scale.at4(b, h, blk, d) + g);
        const float z = c.zero ? c.zero.f(c.zero.at4(b, h, blk, d) + g) : 0.0f;
        row[d] = z + s * row[d];
      }
    }
    for (int64_t d = 0; d < D && c.nout; ++d) {
      const int64_t vo = c.out_val.at4(b, h, blk, d), io = c.out_idx.at4(b, h, blk, d);
      for (int64_t k = 0; k < c.nout; ++k)
        if (c.out_idx.i(io + k) == i) row[d] = c.out_val.f(vo + k);
    }
    c.add_centre(b, h, row);
  }
  if (c.rope != NO_ROPE) apply_rope(c, b, t, row);
}

// Keys [t0, t0 + nt) of a BLOCKS cache as columns of kT [dim][TILE]: each channel's codes of a block are one
// packed run along the tokens, so a run of a tile's tokens is unpacked at once per channel.
void decode_block_tile(const Cache& c, int64_t b, int64_t h, int64_t t0, int64_t nt, float* __restrict kT) {
  const int64_t D = c.dim;
  float tmp[TILE], row[1024];
  int64_t j = 0;
  while (j < nt) {
    const int64_t t = t0 + j;
    const bool coded = t >= c.sink_n && !(c.ring && t >= c.ring_from) && c.overlay_entry(b, h, t) < 0;
    if (!coded) {  // a sink token, or one of an unfinished block: a dense row
      decode_token(c, b, h, t, row);
      for (int64_t d = 0; d < D; ++d) kT[d * TILE + j] = row[d];
      ++j;
      continue;
    }
    const int64_t blk = t / c.block, i0 = t % c.block;
    int64_t len = std::min(nt - j, c.block - i0);
    if (c.ring) len = std::min(len, c.ring_from - t);
    for (int64_t k = 1; k < len && c.ov_map; ++k)  // a run of coded tokens stops at an overlaid one
      if (c.overlay_entry(b, h, t + k) >= 0) len = k;
    const bool aligned = (i0 * c.bits) % 8 == 0;
    const float* tab = c.table ? reinterpret_cast<const float*>(c.table.ptr) : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      const uint8_t* codes = reinterpret_cast<const uint8_t*>(c.main.ptr) + c.main.at4(b, h, blk, d);
      if (aligned) {
        unpack_row(codes + i0 * c.bits / 8, c.bits, len, tmp);
      } else {
        for (int64_t k = 0; k < len; ++k) tmp[k] = static_cast<float>(code_at(codes, c.bits, i0 + k));
      }
      if (tab) {
        const float* td = c.chan_table ? tab + (h * D + d) * c.ntable : tab;
        for (int64_t k = 0; k < len; ++k) tmp[k] = td[static_cast<int64_t>(tmp[k])];
      }
      if (c.ch_mul) {
        const float mul = reinterpret_cast<const float*>(c.ch_mul.ptr)[h * c.ch_mul.stride[0] + d];
        const float add = reinterpret_cast<const float*>(c.ch_add.ptr)[h * c.ch_add.stride[0] + d];
        for (int64_t k = 0; k < len; ++k) tmp[k] = tmp[k] * mul + add;
      }
      float* col = kT + d * TILE + j;
      if (c.scale) {
        const int64_t so = c.scale.at4(b, h, blk, d), zo = c.zero ? c.zero.at4(b, h, blk, d) : 0;
        for (int64_t k = 0; k < len;) {
          const int64_t g = (i0 + k) / c.gsize, end = std::min(len, (g + 1) * c.gsize - i0);
          const float sc = c.scale.f(so + g), z = c.zero ? c.zero.f(zo + g) : 0.0f;
          for (; k < end; ++k) col[k] = z + sc * tmp[k];
        }
      } else {
        for (int64_t k = 0; k < len; ++k) col[k] = tmp[k];
      }
      if (c.nout) {
        const int64_t vo = c.out_val.at4(b, h, blk, d), io = c.out_idx.at4(b, h, blk, d);
        for (int64_t k = 0; k < c.nout; ++k) {
          const int64_t i = c.out_idx.i(io + k);
          if (i >= i0 && i < i0 + len) col[i - i0] = c.out_val.f(vo + k);
        }
      }
      if (c.centre) {
        const float cd = reinterpret_cast<const float*>(c.centre.ptr)[b * c.centre.stride[0] + h * c.centre.stride[1] + d];
        for (int64_t k = 0; k < len; ++k) col[k] += cd;
      }
    }
    j += len;
  }
}

// Scores of every query row against keys held as columns of kT [Dp][TILE].
inline void score_columns(const float* const* q, int64_t R, const float* kT, int64_t D, float* const* out) {
  for (int64_t r = 0; r < R; ++r) {
    v8 a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; ++d) {
      const v8 qd = splat(q[r][d]);
      const float* k = kT + d * TILE;
      a0 += qd * load8(k);
      a1 += qd * load8(k + 8);
      a2 += qd * load8(k + 16);
      a3 += qd * load8(k + 24);
    }
    store8(out[r], a0);
    store8(out[r] + 8, a1);
    store8(out[r] + 16, a2);
    store8(out[r] + 24, a3);
  }
}

// exp(x) for x <= 0 on eight lanes (Cody-Waite reduction, degree-6 polynomial: a few ulp); -inf and anything below
// -87 give 0.
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f);
  const v8i under = x < lo;
  x = under ? lo : x;
  const v8i ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  // round half away (x <= 0)
  const v8 n = __builtin_convertvector(ni, v8);
  const v8 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  v8 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v8i bits = (ni + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8 out = p * scale;
  return under ? splat(0.0f) : out;
}

struct Problem {
  int64_t B, Hq, Hkv, G, T, D, Dv, n, splits, split_len, rows;
  float scale;
  bool need_mass;
  const float* q;            // [B, Hq, T, D] contiguous float32
  View mask;                 // float32 additive, strided over [B, Hq, T, n] (stride 0 broadcasts)
  const int64_t* qpos;       // [T] causal positions, or null
  float *m, *l, *acc;        // per task and row: running max, sum, unnormalized output [Dv]
  float* scores;             // [B, Hkv, rows, n] when need_mass
};

inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

// Scores of up to four query rows against the TILE decoded keys (rows of Dp floats, zero-padded).
template <int NR>
inline void score_rows(const float* const* q, const float* k, int64_t Dp, int64_t nt, float* const* out) {
  for (int64_t j = 0; j < nt; ++j) {
    const float* kj = k + j * Dp;
    v8 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = splat(0.0f);
    for (int64_t c = 0; c < Dp; c += 8) {
      const v8 kv = load8(kj + c);
      for (int r = 0; r < NR; ++r) a[r] += load8(q[r] + c) * kv;
    }
    for (int r = 0; r < NR; ++r) out[r][j] = hsum(a[r]);
  }
}

void run_task(const Problem& P, const Cache& kc, const Cache& vc, int64_t task) {
  const int64_t split = task % P.splits, bh = task / P.splits, h = bh % P.Hkv, b = bh / P.Hkv;
  const int64_t s0 = split * P.split_len, s1 = std::min(P.n, s0 + P.split_len);
  const int64_t R = P.rows, D = P.D, Dv = P.Dv, Dp = pad8(D), Dvp = pad8(Dv);
  float* m = P.m + task * R;
  float* l = P.l + task * R;
  float* acc_out = P.acc + task * R * Dv;
  std::fill(m, m + R, NEG_INF);
  std::fill(l, l + R, 0.0f);
  std::fill(acc_out, acc_out + R * Dv, 0.0f);
  if (s0 >= s1) return;

  int64_t last = s1;  // one past the last slot any row of this task may see
  if (P.qpos) {
    int64_t mx = -1;
    for (int64_t t = 0; t < P.T; ++t) mx = std::max(mx, P.qpos[t]);
    last = std::min(last, mx + 1);
  }
  std::vector<float> kt(TILE * Dp, 0.0f), vt(TILE * Dvp, 0.0f), s(R * TILE), qs(R * Dp, 0.0f), acc(R * Dvp, 0.0f);
  const bool columns = kc.kind == BLOCKS && kc.rope == NO_ROPE;  // keys decoded straight into columns
  std::vector<float> kT(columns ? D * TILE : 0);
  std::vector<const float*> qrow(R);
  std::vector<float*> srow(R);
  for (int64_t r = 0; r < R; ++r) {  // the query rows, scaled and zero-padded
    const int64_t g = r / P.T, t = r % P.T;
    const float* src = P.q + ((b * P.Hq + h * P.G + g) * P.T + t) * D;
    for (int64_t d = 0; d < D; ++d) qs[r * Dp + d] = src[d] * P.scale;
    qrow[r] = qs.data() + r * Dp;
    srow[r] = s.data() + r * TILE;
  }
  for (int64_t t0 = s0; t0 < last; t0 += TILE) {
    const int64_t nt = std::min<int64_t>(TILE, last - t0);
    int64_t r = 0;
    if (columns) {
      decode_block_tile(kc, b, h, t0, nt, kT.data());
      score_columns(qrow.data(), R, kT.data(), D, srow.data());
      r = R;
    } else {
      for (int64_t j = 0; j < nt; ++j) decode_token(kc, b, h, t0 + j, kt.data() + j * Dp);
    }
    for (; r < R; r += 6) {  // up to six rows share each key row read
      const float* const* qr = qrow.data() + r;
      float* const* sr = srow.data() + r;
      switch (std::min<int64_t>(6, R - r)) {
        case 6: score_rows<6>(qr, kt.data(), Dp, nt, sr); break;
        case 5: score_rows<5>(qr, kt.data(), Dp, nt, sr); break;
        case 4: score_rows<4>(qr, kt.data(), Dp, nt, sr); break;
        case 3: score_rows<3>(qr, kt.data(), Dp, nt, sr); break;
        case 2: score_rows<2>(qr, kt.data(), Dp, nt, sr); break;
        default: score_rows<1>(qr, kt.data(), Dp, nt, sr); break;
      }
    }

    bool any = false;
    for (r = 0; r < R; ++r) {
      const int64_t t = r % P.T, hq = h * P.G + r / P.T;
      float* sr = srow[r];
      for (int64_t j = nt; j < TILE; ++j) sr[j] = NEG_INF;
      if (P.mask) {
        const float* mk = reinterpret_cast<const float*>(P.mask.ptr) + P.mask.at4(b, hq, t, t0);
        const int64_t ms = P.mask.stride[3];
        for (int64_t j = 0; j < nt; ++j) sr[j] += mk[j * ms];
      } else if (P.qpos) {
        for (int64_t j = std::max<int64_t>(0, P.qpos[t] + 1 - t0); j < nt; ++j) sr[j] = NEG_INF;
      }
      if (P.need_mass) std::memcpy(P.scores + ((b * P.Hkv + h) * R + r) * P.n + t0, sr, nt * sizeof(float));
      v8 mx = splat(NEG_INF);
      for (int j = 0; j < TILE; j += 8) {
        const v8 x = load8(sr + j);
        mx = x > mx ? x : mx;
      }
      const float mt = std::max(std::max(std::max(mx[0], mx[1]), std::max(mx[2], mx[3])),
                                std::max(std::max(mx[4], mx[5]), std::max(mx[6], mx[7])));
      if (mt == NEG_INF) {
        std::fill(sr, sr + TILE, 0.0f);
        continue;
      }
      any = true;
      const float mnew = std::max(m[r], mt);
      const float corr = m[r] == NEG_INF ? 0.0f : std::exp(m[r] - mnew);
      v8 sum = splat(0.0f);
      for (int j = 0; j < TILE; j += 8) {
        const v8 p = exp8(load8(sr + j) - mnew);
        store8(sr + j, p);
        sum += p;
      }
      l[r] = l[r] * corr + hsum(sum);
      m[r] = mnew;
      if (corr != 1.0f) {
        float* ar = acc.data() + r * Dvp;
        for (int64_t c = 0; c < Dvp; c += 8) store8(ar + c, load8(ar + c) * corr);
      }
    }
    if (!any) continue;
    for (int64_t j = 0; j < nt; ++j) decode_token(vc, b, h, t0 + j, vt.data() + j * Dvp);
    for (r = 0; r < R; ++r) {
      const float* pr = srow[r];
      float* ar = acc.data() + r * Dvp;
      for (int64_t c0 = 0; c0 < Dvp; c0 += 64) {  // eight vectors of the accumulator stay in registers
        const int64_t nc = std::min<int64_t>(64, Dvp - c0);
        v8 a[8];
        for (int i = 0; i < 8; ++i) a[i] = i * 8 < nc ? load8(ar + c0 + i * 8) : splat(0.0f);
        for (int64_t j = 0; j < nt; ++j) {
          const float p = pr[j];
          if (p == 0.0f) continue;
          const v8 pv = splat(p);
          const float* vr = vt.data() + j * Dvp + c0;
          for (int i = 0; i < 8; ++i)
            if (i * 8 < nc) a[i] += pv * load8(vr + i * 8);
        }
        for (int i = 0; i < 8; ++i)
          if (i * 8 < nc) store8(ar + c0 + i * 8, a[i]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) std::memcpy(acc_out + r * Dv, acc.data() + r * Dvp, Dv * sizeof(float));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attend(
    const at::Tensor& q, const std::vector<c10::optional<at::Tensor>>& k_tensors, at::IntArrayRef k_ints,
    const std::vector<c10::optional<at::Tensor>>& v_tensors, at::IntArrayRef v_ints,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_positions, int64_t n, double scale,
    bool need_mass, int64_t kv_heads) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "kvpass cpu kernel: q must be a contiguous float32 [B, Hq, T, D] tensor");
  const Cache kc = make_cache(k_tensors, k_ints), vc = make_cache(v_tensors, v_ints);
  Problem P;
  P.B = q.size(0); P.Hq = q.size(1); P.T = q.size(2); P.D = q.size(3); P.Hkv = kv_heads;
  TORCH_CHECK(P.Hq % P.Hkv == 0, "kvpass cpu kernel: query heads must be a multiple of KV heads");
  TORCH_CHECK(kc.dim == P.D, "kvpass cpu kernel: query and key head dims differ");
  P.G = P.Hq / P.Hkv; P.Dv = vc.dim; P.n = n; P.rows = P.G * P.T;
  P.scale = static_cast<float>(scale); P.need_mass = need_mass; P.q = q.data_ptr<float>();
  at::Tensor mask_f, qpos;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4 && mask->scalar_type() == at::kFloat,
                "kvpass cpu kernel: the mask must be float32 [B, Hq, T, n] (broadcast strides allowed)");
    mask_f = *mask;
    P.mask = View::of(mask_f);
    for (int i = 0; i < 4; ++i) P.mask.stride[i] = mask_f.size(i) == 1 ? 0 : mask_f.stride(i);
  }
  P.qpos = nullptr;
  if (!P.mask && q_positions.has_value() && q_positions->defined()) {
    qpos = q_positions->to(at::kLong).contiguous();
    P.qpos = qpos.data_ptr<int64_t>();
  }
  // Enough splits that both the threads and the context are shared out; each split a whole number of tiles.
  const int64_t threads = at::get_num_threads(), heads = P.B * P.Hkv;
  const int64_t want = std::max<int64_t>(1, (4 * threads + heads - 1) / heads);
  const int64_t tiles = (std::max<int64_t>(n, 1) + TILE - 1) / TILE;
  const int64_t per = std::max<int64_t>(8, (tiles + want - 1) / want);
  P.split_len = per * TILE;
  P.splits = std::max<int64_t>(1, (n + P.split_len - 1) / P.split_len);
  const int64_t tasks = heads * P.splits;

  auto f32 = q.options();
  at::Tensor m = at::empty({tasks, P.rows}, f32), l = at::empty({tasks, P.rows}, f32);
  at::Tensor acc = at::empty({tasks, P.rows, P.Dv}, f32);
  at::Tensor scores = need_mass ? at::empty({heads, P.rows, n}, f32) : at::empty({0}, f32);
  P.m = m.data_ptr<float>(); P.l = l.data_ptr<float>(); P.acc = acc.data_ptr<float>();
  P.scores = need_mass ? scores.data_ptr<float>() : nullptr;
  if (need_mass && n) scores.fill_(NEG_INF);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) run_task(P, kc, vc, task);
  });

  at::Tensor out = at::zeros({P.B, P.Hq, P.T, P.Dv}, f32);
  at::Tensor lse = at::empty({P.B, P.Hq, P.T}, f32);
  // the merged max and sum apart: next to a -3.4e38 mask entry, max + log(sum) rounds back to the max
  std::vector<float> row_max(P.B * P.Hq * P.T, NEG_INF), row_sum(P.B * P.Hq * P.T, 0.0f);
  float* o = out.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  at::parallel_for(0, heads * P.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / P.rows, r = row % P.rows, g = r / P.T, t = r % P.T;
      const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
      const int64_t dst = (b * P.Hq + h * P.G + g) * P.T + t;
      float M = NEG_INF;
      for (int64_t sp = 0; sp < P.splits; ++sp) M = std::max(M, P.m[(bh * P.splits + sp) * P.rows + r]);
      if (M == NEG_INF) {
        ls[dst] = NEG_INF;
        continue;
      }
      float L = 0.0f;
      float* od = o + dst * P.Dv;
      for (int64_t sp = 0; sp < P.splits; ++sp) {
        const int64_t tk = (bh * P.splits + sp) * P.rows + r;
        if (P.m[tk] == NEG_INF) continue;
        const float w = std::exp(P.m[tk] - M);
        L += P.l[tk] * w;
        const float* a = P.acc + tk * P.Dv;
        for (int64_t d = 0; d < P.Dv; ++d) od[d] += w * a[d];
      }
      for (int64_t d = 0; d < P.Dv; ++d) od[d] /= L;
      ls[dst] = M + std::log(L);
      row_max[dst] = M;
      row_sum[dst] = L;
    }
  });

  at::Tensor mass = need_mass ? at::zeros({P.B, P.Hkv, n}, f32) : at::empty({0}, f32);
  if (need_mass && n) {
    float* ms = mass.data_ptr<float>();
    const int64_t chunk = 256, nchunks = (n + chunk - 1) / chunk;
    at::parallel_for(0, heads * nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t bh = w / nchunks, c0 = (w % nchunks) * chunk, c1 = std::min(n, c0 + chunk);
        const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
        float* dst = ms + bh * n;
        for (int64_t r = 0; r < P.rows; ++r) {
          const int64_t g = r / P.T, t = r % P.T;
          const int64_t src = (b * P.Hq + h * P.G + g) * P.T + t;
          const float mr = row_max[src], inv = 1.0f / row_sum[src];
          if (mr == NEG_INF) continue;
          const float* sc = P.scores + (bh * P.rows + r) * n;
          for (int64_t j = c0; j < c1; ++j)
            if (sc[j] != NEG_INF) dst[j] += std::exp(sc[j] - mr) * inv;
        }
      }
    });
  }
  return {out, lse, mass};
}

// Tokens [s0, s1) of every head, decoded to float32 [B, H, s1 - s0, dim] (for the exact-window op's band).
at::Tensor decode(const std::vector<c10::optional<at::Tensor>>& tensors, at::IntArrayRef ints, int64_t s0, int64_t s1) {
  const Cache c = make_cache(tensors, ints);
  const at::Tensor& main = *tensors[MAIN];
  const int64_t B = main.size(0), H = main.size(1), n = std::max<int64_t>(s1 - s0, 0);
  at::Tensor out = at::empty({B, H, n, c.dim}, main.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * H * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / n, t = s0 + row % n;
      decode_token(c, bh / H, bh % H, t, o + row * c.dim);
    }
  });
  return out;
}

// The smallest value of ST above h (C's nextafter toward +inf), on the bits of an fp16 or as float.
inline at::Half next_up(at::Half h) {
  uint16_t bits = h.x;
  if ((bits & 0x7fff) > 0x7c00) return h;  // NaN
  if ((bits & 0x7fff) == 0) bits = 0x0001;
  else if (bits & 0x8000) bits -= 1;
  else bits += 1;
  return at::Half(bits, at::Half::from_bits());
}
inline float next_up(float f) { return std::nextafter(f, std::numeric_limits<float>::infinity()); }

// kvpass.formats.uniform.round_up: the scale in ST, never below its float value.
template <typename ST>
inline ST round_up(float v) {
  ST stored = static_cast<ST>(v);
  return static_cast<float>(stored) < v ? next_up(stored) : stored;
}

// Code `code` at position i of a packed little-endian bit stream of `bits`-bit codes (bytes zeroed beforehand).
inline void put_code(uint8_t* p, int64_t bits, int64_t i, uint32_t code) {
  const int64_t bit = i * bits, byte = bit >> 3, shift = bit & 7;
  p[byte] |= static_cast<uint8_t>(code << shift);
  if (shift + bits > 8) p[byte + 1] |= static_cast<uint8_t>(code >> (8 - shift));
}

// Quantize rows `x` [B, H, T, D] (any float dtype) and write them at token `positions` of a per-token cache, exactly
// as kvpass.formats does: intB min/max per group (kind 0), or fp8 with an amax scale per token (kind 1, variant 0
// e4m3fn, 1 e5m2). Scales (and zero points) in ST.
template <typename ST>
void store_rows_impl(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& zero, int64_t kind, int64_t bits, int64_t gsize, int64_t variant) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), P = codes.size(3);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const float* xs = xf.data_ptr<float>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  uint8_t* cs = codes.data_ptr<uint8_t>();
  ST* ss = scale.data_ptr<ST>();
  ST* zs = zero.has_value() ? zero->data_ptr<ST>() : nullptr;
  const int64_t ng = kind == 0 ? D / gsize : 1, levels = (1 << bits) - 1;
  const float fmax = variant == 0 ? 448.0f : 57344.0f;
  at::parallel_for(0, B * H * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % T, bh = row / T, b = bh / H, h = bh % H, p = ps[t];
      const float* xr = xs + row * D;
      uint8_t* cr = cs + b * codes.stride(0) + h * codes.stride(1) + p * codes.stride(2);
      ST* sr = ss + b * scale.stride(0) + h * scale.stride(1) + p * scale.stride(2);
      if (kind == 1) {
        float amax = 0.0f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(xr[d]));
        const ST sc = round_up<ST>(amax / fmax);
        const float sf = static_cast<float>(sc) > 0 ? static_cast<float>(sc) : 1.0f;
        for (int64_t d = 0; d < D; ++d) {
          const float v = std::min(std::max(xr[d] / sf, -fmax), fmax);
          cr[d] = variant == 0 ? c10::Float8_e4m3fn(v).x : c10::Float8_e5m2(v).x;
        }
        sr[0] = sc;
        continue;
      }
      ST* zr = zs + b * zero->stride(0) + h * zero->stride(1) + p * zero->stride(2);
      std::fill(cr, cr + P, 0);
      for (int64_t g = 0; g < ng; ++g) {
        const float* xg = xr + g * gsize;
        float lo = xg[0], hi = xg[0];
        for (int64_t d = 1; d < gsize; ++d) {
          lo = std::min(lo, xg[d]);
          hi = std::max(hi, xg[d]);
        }
        const ST z = static_cast<ST>(lo);
        const float zf = static_cast<float>(z);
        const ST sc = round_up<ST>((hi - zf) / static_cast<float>(levels));
        const float sf = static_cast<float>(sc) > 0 ? static_cast<float>(sc) : 1.0f;
        for (int64_t d = 0; d < gsize; ++d) {
          const float c = std::nearbyint((xg[d] - zf) / sf);
          put_code(cr, bits, g * gsize + d, static_cast<uint32_t>(std::min(std::max(c, 0.0f), static_cast<float>(levels))));
        }
        sr[g] = sc;
        zr[g] = z;
      }
    }
  });
}

void store_rows(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& codes, const at::Tensor& scale,
                const c10::optional<at::Tensor>& zero, int64_t kind, int64_t bits, int64_t gsize, int64_t variant) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.stride(3) == 1 && scale.stride(3) == 1,
              "kvpass cpu store: codes must be uint8 with contiguous rows");
  if (scale.scalar_type() == at::kHalf) store_rows_impl<at::Half>(x, positions, codes, scale, zero, kind, bits, gsize, variant);
  else if (scale.scalar_type() == at::kFloat) store_rows_impl<float>(x, positions, codes, scale, zero, kind, bits, gsize, variant);
  else TORCH_CHECK(false, "kvpass cpu store: scales must be fp16 or fp32");
}

// One float row written into a float tensor of any dtype.
inline void put_row(char* base, at::ScalarType dtype, int64_t off, const float* src, int64_t n) {
  if (dtype == at::kFloat) {
    std::memcpy(reinterpret_cast<float*>(base) + off, src, n * sizeof(float));
  } else if (dtype == at::kHalf) {
    at::Half* d = reinterpret_cast<at::Half*>(base) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<at::Half>(src[i]);
  } else if (dtype == at::kBFloat16) {
    at::BFloat16* d = reinterpret_cast<at::BFloat16*>(base) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<at::BFloat16>(src[i]);
  } else {
    TORCH_CHECK(false, "kvpass cpu kernel: unsupported float dtype ", dtype);
  }
}

// kvpass.methods.overlay.op.kv_overlay_store_: each new token at p takes an overlay entry of its head (a free one,
// else the lowest score or the oldest, sparing the first `sink` slots and the `recent` newest; the oldest non-sink
// entry when all are spared), after any entry still holding p is dropped and p's score zeroed. With `taken`
// ([B, H, T] int64), each token's entry is written there and, into `old_k`/`old_v` ([B, H, T, D] of the rows' dtype),
// the row it overwrote: a failed step puts them back.
void overlay_store(at::Tensor& ov_k, at::Tensor& ov_v, at::Tensor& ov_slot, at::Tensor& score, const at::Tensor& new_k,
                   const at::Tensor& new_v, const at::Tensor& positions, int64_t recent, int64_t sink, bool by_score,
                   const std::optional<at::Tensor>& taken, const std::optional<at::Tensor>& old_k,
                   const std::optional<at::Tensor>& old_v) {
  TORCH_CHECK(ov_slot.scalar_type() == at::kInt && score.scalar_type() == at::kFloat && ov_slot.is_contiguous() &&
                  score.is_contiguous() && ov_k.is_contiguous() && ov_v.is_contiguous(),
              "kvpass cpu overlay store: int32 slots, float32 scores, contiguous buffers");
  const int64_t B = ov_slot.size(0), H = ov_slot.size(1), C = ov_slot.size(2), S = score.size(2);
  const int64_t Dk = ov_k.size(3), Dv = ov_v.size(3), T = new_k.size(2);
  const at::Tensor nk = new_k.to(at::kFloat).contiguous(), nv = new_v.to(at::kFloat).contiguous();
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* ps = pos.data_ptr<int64_t>();
  int32_t* slots = ov_slot.data_ptr<int32_t>();
  float* sc = score.data_ptr<float>();
  char* kb = static_cast<char*>(ov_k.data_ptr());
  char* vb = static_cast<char*>(ov_v.data_ptr());
  const float inf = std::numeric_limits<float>::infinity();
  const bool log = taken.has_value();
  TORCH_CHECK(!log || (old_k.has_value() && old_v.has_value() && taken->scalar_type() == at::kLong &&
                       old_k->scalar_type() == ov_k.scalar_type() && old_v->scalar_type() == ov_v.scalar_type() &&
                       taken->is_contiguous() && old_k->is_contiguous() && old_v->is_contiguous()),
              "kvpass cpu overlay store: taken int64 with old rows of the overlay's dtype, contiguous");
  int64_t* tk = log ? taken->data_ptr<int64_t>() : nullptr;
  char* okb = log ? static_cast<char*>(old_k->data_ptr()) : nullptr;
  char* ovb = log ? static_cast<char*>(old_v->data_ptr()) : nullptr;
  const int64_t ek = ov_k.element_size(), ev = ov_v.element_size();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      int32_t* sl = slots + bh * C;
      float* srow = sc + bh * S;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = ps[t];
        for (int64_t e = 0; e < C; ++e)
          if (sl[e] == p + 1) sl[e] = 0;
        srow[p] = 0.0f;
        int64_t choice = 0, oldest = 0;
        float best = inf, oldest_key = inf;
        bool found = false;
        for (int64_t e = 0; e < C; ++e) {
          const int64_t s = static_cast<int64_t>(sl[e]) - 1;
          const bool free = s < 0, pinned = !free && s < sink, spared = pinned || s >= p - recent;
          float key = by_score ? srow[std::max<int64_t>(s, 0)] : static_cast<float>(s);
          if (spared) key = inf;
          if (free) key = -inf;
          if (!found || key < best) choice = e, best = key, found = true;
          const float age = pinned ? inf : static_cast<float>(s);
          if (e == 0 || age < oldest_key) oldest = e, oldest_key = age;
        }
        const int64_t entry = best == inf ? oldest : choice;
        sl[entry] = static_cast<int32_t>(p + 1);
        const int64_t b = bh / H, h = bh % H;
        if (log) {
          tk[bh * T + t] = entry;
          std::memcpy(okb + (bh * T + t) * Dk * ek, kb + (bh * C + entry) * Dk * ek, Dk * ek);
          std::memcpy(ovb + (bh * T + t) * Dv * ev, vb + (bh * C + entry) * Dv * ev, Dv * ev);
        }
        put_row(kb, ov_k.scalar_type(), (bh * C + entry) * Dk, nk.data_ptr<float>() + ((b * H + h) * T + t) * Dk, Dk);
        put_row(vb, ov_v.scalar_type(), (bh * C + entry) * Dv, nv.data_ptr<float>() + ((b * H + h) * T + t) * Dv, Dv);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(kvpass_cpu, m) {
  m.def("attend(Tensor q, Tensor?[] k, int[] k_ints, Tensor?[] v, int[] v_ints, Tensor? mask, Tensor? q_positions, "
        "int n, float scale, bool need_mass, int kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def("decode(Tensor?[] cache, int[] ints, int s0, int s1) -> Tensor");
  m.def("store_rows(Tensor x, Tensor positions, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!)? zero, int kind, int bits, "
        "int gsize, int variant) -> ()");
  m.def("overlay_store(Tensor(a!) ov_k, Tensor(b!) ov_v, Tensor(c!) ov_slot, Tensor(d!) score, Tensor new_k, "
        "Tensor new_v, Tensor positions, int recent, int sink, bool by_score, Tensor(e!)? taken, Tensor(f!)? old_k, "
        "Tensor(g!)? old_v) -> ()");
}

TORCH_LIBRARY_IMPL(kvpass_cpu, CPU, m) {
  m.impl("attend", attend);
  m.impl("decode", decode);
  m.impl("store_rows", store_rows);
  m.impl("overlay_store", overlay_store);
}
