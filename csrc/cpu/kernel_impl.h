// The CPU item kernel.  Included by kernel_{avx512,avx2,base}.cpp after kernel_prelude.h and after
// the instruction-set pragma, with NMX_ISA naming the namespace; do not include it anywhere else.
//
// An item is a rectangle rows [r0, r1) x cols [c0, c1) of one entry's [R, L] layout (plan.h).  Items
// with COL views are read in groups of rows: per-column sums accumulate into a double array that
// stays in cache, and with AVX-512 the row totals of RUN views come from the same pass (two rows at
// a time, nine vector registers per row).  RUN-only items are read one whole row at a time, three
// sequential streams.  The kernels are templates over the storage type of x, y and z and widen to
// double in registers, so the common dtype mixes (all one dtype; fp32 x and z with a bf16 or fp16
// gradient) are read in place; rarer mixes are first converted into a per-thread scratch row.  The
// loops read through row readers: PlainRow for (x, y, z) as stored, AdamRow and LionRow for the stream
// modes, which form (θ, p, u) from the optimizer's tensors as they load them.

namespace nmx {
namespace cpu {
namespace NMX_ISA {
namespace {

// ---- conversions (bit-exact, vectorisable, no torch headers) ---------------------------------------
NMX_INLINE float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
NMX_INLINE uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}
NMX_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
// IEEE half to float, including subnormals, infinities and NaN (the algorithm c10::Half uses).
NMX_INLINE float f16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

// The storage types of 16-bit inputs (read in place, widened in registers).
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};
NMX_INLINE double to_double(float v) { return v; }
NMX_INLINE double to_double(double v) { return v; }
NMX_INLINE double to_double(bf16_t v) { return bf16_to_float(v.bits); }
NMX_INLINE double to_double(half_t v) { return f16_to_float(v.bits); }
template <typename T>
constexpr int dtype_code() {
  return std::is_same<T, float>::value ? kF32 : std::is_same<T, double>::value ? kF64
       : std::is_same<T, half_t>::value ? kF16 : kBF16;
}

// One vector register of doubles per instruction set (NMX_ISA_LEVEL: 2 AVX-512, 1 AVX2, 0 baseline).
// Loads go through intrinsics where they exist: GCC splits a generic float->double vector conversion
// into halves and inserts.
#if NMX_ISA_LEVEL == 2
constexpr int kLanes = 8;
#elif NMX_ISA_LEVEL == 1
constexpr int kLanes = 4;
#else
constexpr int kLanes = 2;
#endif
typedef double dvec __attribute__((vector_size(8 * kLanes)));
typedef float fvec __attribute__((vector_size(4 * kLanes), aligned(4)));
constexpr int64_t kSegment = 4096;  // columns converted / reduced at a time in RUN-only entries
constexpr int kRowGroup = 4;
// Rows up to this many elements prefetch the next rows (see prefetch_rows); longer rows are long
// streams for the hardware prefetchers, and requesting whole rows ahead only evicted data still in use
// (vgg16_bn's 25088-wide classifier lost 15%).
constexpr int64_t kPrefetchMaxRow = 8192;
constexpr bool kFused = NMX_ISA_LEVEL == 2;  // add_columns_and_two_rows needs 32 vector registers

NMX_INLINE dvec load(const float* p) {
#if NMX_ISA_LEVEL == 2
  return (dvec)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif NMX_ISA_LEVEL == 1
  return (dvec)_mm256_cvtps_pd(_mm_loadu_ps(p));
#else
  fvec f;
  std::memcpy(&f, p, sizeof f);
  return __builtin_convertvector(f, dvec);
#endif
}
// 16-bit inputs: the bits of a bfloat16 are the high half of a float's; IEEE halves go through F16C.
template <typename T>
NMX_INLINE dvec widen_lanes(const T* p) {  // the baseline: lane by lane
  dvec d;
  for (int i = 0; i < kLanes; ++i) d[i] = to_double(p[i]);
  return d;
}
NMX_INLINE dvec load(const bf16_t* p) {
#if NMX_ISA_LEVEL == 2
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return (dvec)_mm512_cvtps_pd(_mm256_castsi256_ps(w));
#elif NMX_ISA_LEVEL == 1
  const __m128i w = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16);
  return (dvec)_mm256_cvtps_pd(_mm_castsi128_ps(w));
#else
  return widen_lanes(p);
#endif
}
NMX_INLINE dvec load(const half_t* p) {
#if NMX_ISA_LEVEL == 2
  return (dvec)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif NMX_ISA_LEVEL == 1
  return (dvec)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  return widen_lanes(p);
#endif
}
NMX_INLINE dvec load(const double* p) {
  dvec d;
  std::memcpy(&d, p, sizeof d);
  return d;
}
NMX_INLINE void store(double* p, dvec v) { std::memcpy(p, &v, sizeof v); }

// Software prefetch into L2 of the rows a loop reads next (`ahead` elements past the current ones;
// 0: none; each row reader's prefetch_at()).  Rows of a few KB are too short for the hardware prefetchers
// to get going: with the row pairs of the next group requested while this one is summed, a 3072 x 768
// weight with rows and columns went from 0.72 to 0.45 ns per element.  A prefetch never faults, so
// running past the end of a tensor, or into a scratch row, is harmless.
template <typename T>
NMX_INLINE void prefetch(const T* p, int64_t at) {
  __builtin_prefetch(p + at, 0, 2);
}

// Lanes summed in a fixed order.  (Reading lanes through a copy keeps GCC from moving the
// accumulators of the loop that produced `v` to the stack.)
NMX_INLINE double hsum(dvec v) {
  double lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += lanes[i];
  return s;
}

template <bool HY, bool HZ>
constexpr bool moment_used(int m) {
  return m == 0 || m == 3 || ((m == 1 || m == 4 || m == 6) && HY) || ((m == 2 || m == 5 || m == 7) && HZ) ||
         (m == 8 && HY && HZ);
}

template <typename C>
void convert(const void* src, int dtype, int64_t offset, int64_t n, C* dst) {
  switch (dtype) {
    case kF32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(s[i]);
      break;
    }
    case kF64: {
      const double* s = static_cast<const double*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(s[i]);
      break;
    }
    case kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(f16_to_float(s[i]));
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(bf16_to_float(s[i]));
      break;
    }
  }
}

// A run of n values of tensor `src` starting at `offset`, as storage type T: in place when the dtype
// is T, else converted into `scratch` (only ever to float or double: process_item picks a 16-bit T
// only for tensors of that dtype).
template <typename T>
const T* as_type(const void* src, int dtype, int64_t offset, int64_t n, void* scratch) {
  if (dtype == dtype_code<T>()) return static_cast<const T*>(src) + offset;
  if constexpr (std::is_floating_point<T>::value) {
    T* out = static_cast<T*>(scratch);
    convert(src, dtype, offset, n, out);
    return out;
  } else {
    return nullptr;  // not reached
  }
}

#include "kernel_rows.h"  // PlainRow, AdamRow, LionRow (in this namespace)

// ---- the two reductions ----------------------------------------------------------------------------
// Always inlined into run_item: rows can be a few elements long, and an out-of-line call per row (with
// its AVX-512 register saves) cost three times the work on narrow tensors.
template <typename Row>
NMX_INLINE void add_row_total(const typename Row::Shared& sh, const Row& row, int64_t n, Moments<double>& out,
                              int64_t ahead) {
  constexpr bool HY = Row::kHY, HZ = Row::kHZ;
  Moments<dvec> a;
  zero(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if (ahead) row.prefetch_at(i + ahead);
    dvec xv, yv, zv;
    row.lanes(sh, i, xv, yv, zv);
    accumulate<HY, HZ>(a, xv, yv, zv);
  }
  Moments<double> t;
  for (int m = 0; m < kMoments; ++m) t.m[m] = hsum(a.m[m]);
  for (; i < n; ++i) {
    double xv, yv, zv;
    row.one(sh, i, xv, yv, zv);
    accumulate<HY, HZ>(t, xv, yv, zv);
  }
  add_to(out, t);
}

// Per-column sums, stored in blocks of kLanes columns with the nine moments of a block contiguous:
// moment m of column c lives at colsum_index(c, m).  One base pointer per block keeps the loop's
// addresses in registers.
NMX_INLINE int64_t colsum_index(int64_t c, int m) {
  return (c / kLanes) * (kMoments * kLanes) + m * kLanes + c % kLanes;
}

// Adds the moments of NR rows, columns [0, n), to the column sums `acc` (columns counted from acc).
template <int NR, typename Row>
NMX_INLINE void add_column_sums(const typename Row::Shared& sh, double* acc, const Row* rows, int64_t n,
                                int64_t ahead) {
  constexpr bool HY = Row::kHY, HZ = Row::kHZ;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    if (ahead)
      for (int r = 0; r < NR; ++r) rows[r].prefetch_at(c + ahead);
    double* block = acc + colsum_index(c, 0);
    Moments<dvec> a;
    for (int m = 0; m < kMoments; ++m) a.m[m] = moment_used<HY, HZ>(m) ? load(block + m * kLanes) : dvec{};
    for (int r = 0; r < NR; ++r) {
      dvec xv, yv, zv;
      rows[r].lanes(sh, c, xv, yv, zv);
      accumulate<HY, HZ>(a, xv, yv, zv);
    }
    for (int m = 0; m < kMoments; ++m)
      if (moment_used<HY, HZ>(m)) store(block + m * kLanes, a.m[m]);
  }
  for (; c < n; ++c) {
    Moments<double> a;
    for (int m = 0; m < kMoments; ++m) a.m[m] = acc[colsum_index(c, m)];
    for (int r = 0; r < NR; ++r) {
      double xv, yv, zv;
      rows[r].one(sh, c, xv, yv, zv);
      accumulate<HY, HZ>(a, xv, yv, zv);
    }
    for (int m = 0; m < kMoments; ++m) acc[colsum_index(c, m)] = a.m[m];
  }
}

// Items with both COL and RUN views, two rows at a time in one pass: the column sums (in memory) and
// the two rows' totals (in registers) take their terms from the same loads and conversions.  The
// additions happen in the same order as add_column_sums + add_row_total would do them, so the
// result is bit-identical.  Only with 32 vector registers (9 column + 18 row accumulators).
template <typename Row>
NMX_INLINE void add_columns_and_two_rows(const typename Row::Shared& sh, double* acc, const Row* rows, int64_t n,
                                         Moments<double>& out0, Moments<double>& out1, int64_t ahead) {
  constexpr bool HY = Row::kHY, HZ = Row::kHZ;
  Moments<dvec> r0, r1;
  zero(r0);
  zero(r1);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    double* block = acc + colsum_index(c, 0);
    Moments<dvec> a;
    for (int m = 0; m < kMoments; ++m) a.m[m] = moment_used<HY, HZ>(m) ? load(block + m * kLanes) : dvec{};
    if (ahead) rows[0].prefetch_at(c + ahead), rows[1].prefetch_at(c + ahead);
    dvec x0, y0, z0, x1, y1, z1;
    lanes_pair(sh, rows, c, x0, y0, z0, x1, y1, z1);
    accumulate<HY, HZ>(a, x0, y0, z0);
    accumulate<HY, HZ>(r0, x0, y0, z0);
    accumulate<HY, HZ>(a, x1, y1, z1);
    accumulate<HY, HZ>(r1, x1, y1, z1);
    for (int m = 0; m < kMoments; ++m)
      if (moment_used<HY, HZ>(m)) store(block + m * kLanes, a.m[m]);
  }
  Moments<double> t0, t1;
  for (int m = 0; m < kMoments; ++m) t0.m[m] = hsum(r0.m[m]), t1.m[m] = hsum(r1.m[m]);
  for (; c < n; ++c) {
    Moments<double> a;
    for (int m = 0; m < kMoments; ++m) a.m[m] = acc[colsum_index(c, m)];
    for (int q = 0; q < 2; ++q) {
      double xv, yv, zv;
      rows[q].one(sh, c, xv, yv, zv);
      accumulate<HY, HZ>(a, xv, yv, zv);
      accumulate<HY, HZ>(q == 0 ? t0 : t1, xv, yv, zv);
    }
    for (int m = 0; m < kMoments; ++m) acc[colsum_index(c, m)] = a.m[m];
  }
  add_to(out0, t0);
  add_to(out1, t1);
}

// Column sums and row totals of one group of rows as separate passes (the kernels without the fused
// row-pair loop).  Items with COL views have a single segment, so the column sums start at column c0.
template <typename Row>
NMX_INLINE void reduce_group(const typename Row::Shared& sh, double* cs, const Row* rows, int nr, int64_t n,
                             int64_t ahead, bool has_col, bool has_run, Moments<double>* rt) {
  if (has_col) {
    if (nr == kRowGroup) {
      add_column_sums<kRowGroup>(sh, cs, rows, n, ahead);
    } else {
      for (int q = 0; q < nr; ++q) add_column_sums<1>(sh, cs, rows + q, n, 0);
    }
  }
  if (has_run)
    for (int q = 0; q < nr; ++q) add_row_total(sh, rows[q], n, rt[q], has_col ? 0 : ahead);
}

// A stream mode's row with p and u written out in F (at `out` and a segment further; θ stays in place),
// for the separate passes, which would otherwise form them twice.  Element by element: the compiler
// vectorises the loop in the full width of F (twice the lanes of a double vector).  The inputs `ahead`
// further on are requested first.
template <typename Row>
NMX_INLINE typename Row::Formed form_row(const typename Row::Shared& sh, const Row& row, int64_t n, int64_t ahead,
                                         double* out, int64_t segment) {
  using F = typename Row::Formed::X;
  F *__restrict p = reinterpret_cast<F*>(out), *__restrict u = reinterpret_cast<F*>(out + segment);
  const typename Row::Shared c = sh;  // a local copy: the loop keeps it in registers
  if (ahead)
    for (int64_t i = 0; i < n; i += 64 / sizeof(F)) row.prefetch_at(i + ahead);
  for (int64_t i = 0; i < n; ++i) row.direction(c, i, p[i], u[i]);
  return typename Row::Formed{row.th, p, u};
}

// Item `it` read through row readers of type Row (PlainRow, AdamRow, LionRow).
template <typename Row>
void run_item(const Plan& plan, const ItemRec& it, const TensorPtrs& tp, double* slots) {
  static thread_local std::vector<double> colsum;
  static thread_local std::vector<Moments<double>> rowtot;
  static thread_local std::vector<double> scratch;  // room for a double per value; holds any T

  const EntryRec& e = plan.entries[it.entry];
  const bool has_col = it.has_col != 0, has_run = it.has_run != 0;
  const int64_t L = e.L, width = it.c1 - it.c0, rows = it.r1 - it.r0;
  const int64_t segment = has_col ? width : std::min(width, kSegment);
  // 8 extra doubles so that the sums can start on a cache line: a 64-byte vector store that straddles
  // two lines costs two, and the column sums are stored once per row pair.
  if (has_col) colsum.assign(kMoments * (width + kLanes) + 8, 0.0);
  if (has_run) {
    Moments<double> z0;
    zero(z0);
    rowtot.assign(rows, z0);
  }
  const int formed = Row::kForms ? 2 : 0;  // form_row's segments per row
  scratch.resize((Row::kScratch + formed) * kRowGroup * segment);
  // Plain pointers from here on: each use of a thread_local in a shared library may be a call to
  // __tls_get_addr, which the compiler does not hoist out of the loops.
  double* const cs = colsum.data() + ((64 - reinterpret_cast<uintptr_t>(colsum.data()) % 64) % 64) / sizeof(double);
  Moments<double>* const rt = rowtot.data() - it.r0;  // indexed by row
  double* const sc0 = scratch.data();
  const typename Row::Shared sh = Row::shared(tp);

  // RUN-only items with long rows read one row at a time: three long sequential streams, which the
  // prefetchers follow (four rows at once interleave twelve).  Short rows are contiguous anyway.
  const int group = has_col || L < 1024 ? kRowGroup : 1;
  for (int64_t r = it.r0; r < it.r1; r += group) {
    const int nr = static_cast<int>(std::min<int64_t>(group, it.r1 - r));
    for (int64_t s0 = it.c0; s0 < it.c1; s0 += segment) {
      const int64_t n = std::min(segment, it.c1 - s0);
      Row rows[kRowGroup];
      for (int q = 0; q < nr; ++q)
        rows[q] = Row::make(tp, (r + q) * L + s0, n, segment, sc0 + Row::kScratch * q * segment);
      if (kFused && has_col && has_run) {
        // One pass for both kinds (single segment, column sums from c0), rows in pairs; the next pair
        // is prefetched.
        const int64_t ahead_pair = n <= kPrefetchMaxRow ? 2 * L : 0;
        int q = 0;
        for (; q + 2 <= nr; q += 2)
          add_columns_and_two_rows(sh, cs, rows + q, n, rt[r + q], rt[r + q + 1], ahead_pair);
        for (; q < nr; ++q) {
          add_column_sums<1>(sh, cs, rows + q, n, 0);
          add_row_total(sh, rows[q], n, rt[r + q], 0);
        }
        continue;
      }
      // Groups of rows prefetch the next group; long rows read alone are left to the hardware.
      const int64_t ahead = group > 1 && n <= kPrefetchMaxRow ? group * L : 0;
      if constexpr (Row::kForms) {
        if (has_col && has_run) {  // both passes read every row: form it once
          using Formed = typename Row::Formed;
          Formed fr[kRowGroup];
          double* const out = sc0 + Row::kScratch * kRowGroup * segment;
          for (int q = 0; q < nr; ++q) fr[q] = form_row(sh, rows[q], n, ahead, out + formed * q * segment, segment);
          reduce_group(typename Formed::Shared{}, cs, fr, nr, n, 0, has_col, has_run, rt + r);
          continue;
        }
      }
      reduce_group(sh, cs, rows, nr, n, ahead, has_col, has_run, rt + r);
    }
  }

  // Fold into this item's slots, in a fixed order (the result does not depend on thread timing).
  const int64_t* const views = plan.item_views.data();
  int64_t total = 0;
  for (int64_t q = it.view_begin; q < it.view_end; ++q)
    total += slots_in_item(plan.views[views[q]], it.r0, it.r1, it.c0, it.c1);
  double* base = slots + it.slot_begin * kMoments;
  std::fill(base, base + total * kMoments, 0.0);
  for (int64_t q = it.view_begin; q < it.view_end; ++q) {
    const ViewRec& v = plan.views[views[q]];
    int64_t k0 = 0;
    const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1, &k0);
    if (v.kind == kRun) {
      // Rows of the view only: u % stride past K*period is a gap between two a's.
      const int64_t span = v.K * v.period, ra = std::max(it.r0, v.row0), rb = std::min(it.r1, v.row1);
      for (int64_t r = ra; r < rb; ++r) {
        const int64_t j = (r - v.row0) % v.stride;
        if (j >= span) continue;
        const int64_t idx = (j / v.period - k0 + v.K) % v.K;
        for (int m = 0; m < kMoments; ++m) base[idx * kMoments + m] += rt[r].m[m];
      }
    } else {
      // Column c goes to slot (c - col0) / B - k0: stepped, not divided (a 64-bit division per column
      // cost more than the sums when the slices are single elements).
      const int64_t ca = std::max(it.c0, v.col0), cb = std::min(it.c1, v.col0 + v.K * v.B);
      int64_t idx = 0, b = (ca - v.col0) % v.B;
      for (int64_t c = ca; c < cb; ++c) {
        for (int m = 0; m < kMoments; ++m) base[idx * kMoments + m] += cs[colsum_index(c - it.c0, m)];
        if (++b == v.B) b = 0, ++idx;
      }
    }
    base += count * kMoments;
  }
}

template <typename TX, typename TY, typename TZ>
void run_typed(const Plan& plan, const ItemRec& it, const TensorPtrs& tp, double* slots) {
  const bool hy = tp.y != nullptr, hz = tp.z != nullptr;
  if (hy && hz) {
    run_item<PlainRow<true, true, TX, TY, TZ>>(plan, it, tp, slots);
  } else if (hy) {
    run_item<PlainRow<true, false, TX, TY, TZ>>(plan, it, tp, slots);
  } else if constexpr (std::is_same<TX, TY>::value) {  // a mixed-type call always has y
    if (hz) run_item<PlainRow<false, true, TX, TY, TZ>>(plan, it, tp, slots);
    else run_item<PlainRow<false, false, TX, TY, TZ>>(plan, it, tp, slots);
  }
}

template <typename T>
void run_one_type(const Plan& plan, const ItemRec& it, const TensorPtrs& tp, double* slots) {
  run_typed<T, T, T>(plan, it, tp, slots);
}

// A stream mode in F: which state exists picks the reader (m = z; v_max only with amsgrad and state).
template <typename F>
void run_stream(const Plan& plan, const ItemRec& it, const TensorPtrs& tp, double* slots) {
  if (tp.mode == kStreamLion) {
    if (tp.z) run_item<LionRow<true, F>>(plan, it, tp, slots);
    else run_item<LionRow<false, F>>(plan, it, tp, slots);
  } else if (!tp.z) {
    run_item<AdamRow<false, false, F>>(plan, it, tp, slots);
  } else if (tp.vmax) {
    run_item<AdamRow<true, true, F>>(plan, it, tp, slots);
  } else {
    run_item<AdamRow<true, false, F>>(plan, it, tp, slots);
  }
}

}  // namespace

void process_item(const Plan& plan, int64_t item, const TensorPtrs* tensors, double* slots) {
  const ItemRec& it = plan.items[item];
  const TensorPtrs& tp = tensors[plan.entries[it.entry].tensor];
  if (tp.mode != kStreamPlain) {
    // A stream mode forms (θ, p, u), all three present, in double or float.
    if (stream_in_double(tp)) return run_stream<double>(plan, it, tp, slots);
    return run_stream<float>(plan, it, tp, slots);
  }
  // An absent y or z takes x's dtype, so that it does not break the "one dtype" case.
  const int dx = tp.dx, dy = tp.y ? tp.dy : dx, dz = tp.z ? tp.dz : dx;
  if (dx == dy && dx == dz) {
    switch (dx) {
      case kF32: return run_one_type<float>(plan, it, tp, slots);
      case kF64: return run_one_type<double>(plan, it, tp, slots);
      case kF16: return run_one_type<half_t>(plan, it, tp, slots);
      default: return run_one_type<bf16_t>(plan, it, tp, slots);
    }
  }
  // Mixed precision: fp32 parameters and momentum with a 16-bit gradient, in place.
  if (dx == kF32 && dz == kF32 && dy == kBF16) return run_typed<float, bf16_t, float>(plan, it, tp, slots);
  if (dx == kF32 && dz == kF32 && dy == kF16) return run_typed<float, half_t, float>(plan, it, tp, slots);
  // Any other mix is converted, row by row, to float (exact for every dtype but double) or double.
  if (dx == kF64 || dy == kF64 || dz == kF64) return run_one_type<double>(plan, it, tp, slots);
  run_one_type<float>(plan, it, tp, slots);
}

}  // namespace NMX_ISA
}  // namespace cpu
}  // namespace nmx
