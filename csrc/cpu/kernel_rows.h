// The row readers of the CPU item kernel (kernel_impl.h): included by kernel_impl.h inside its
// per-instruction-set namespace, after the loads and conversions they use; do not include it anywhere
// else.

// ---- row readers: what the reductions read -------------------------------------------------------
// A row reader hands the reductions the (x, y, z) of one row widened to double, kLanes columns at a time
// (lanes) or one at a time (one, for the tails), and prefetches its inputs.  kHY / kHZ: whether y and z
// exist; kForms: whether it forms y and z (a stream mode); kScratch: the segments of doubles make() may
// convert inputs into (those not of its types);
// Shared: what all rows of a tensor share (the step's constants), passed once to the reductions, so that
// a loop over several rows holds one copy of them.

// Plain: (x, y, z) as stored.
template <bool HY, bool HZ, typename TX, typename TY, typename TZ>
struct PlainRow {
  static constexpr bool kHY = HY, kHZ = HZ;
  static constexpr int kScratch = 3;
  static constexpr bool kForms = false, kPairInZmm = false;
  struct Shared {};
  using X = TX;
  const TX* x;
  const TY* y;
  const TZ* z;

  static NMX_INLINE PlainRow make(const TensorPtrs& tp, int64_t off, int64_t n, int64_t segment, double* sc) {
    PlainRow r{};
    r.x = as_type<TX>(tp.x, tp.dx, off, n, sc);
    if (HY) r.y = as_type<TY>(tp.y, tp.dy, off, n, sc + segment);
    if (HZ) r.z = as_type<TZ>(tp.z, tp.dz, off, n, sc + 2 * segment);
    return r;
  }
  static NMX_INLINE Shared shared(const TensorPtrs&) { return {}; }
  NMX_INLINE void lanes(const Shared&, int64_t i, dvec& a, dvec& b, dvec& c) const {
    a = load(x + i);
    b = HY ? load(y + i) : dvec{};
    c = HZ ? load(z + i) : dvec{};
  }
  NMX_INLINE void one(const Shared&, int64_t i, double& a, double& b, double& c) const {
    a = to_double(x[i]);
    b = HY ? to_double(y[i]) : 0.0;
    c = HZ ? to_double(z[i]) : 0.0;
  }
  NMX_INLINE void prefetch_at(int64_t at) const {
    prefetch(x, at);
    if (HY) prefetch(y, at);
    if (HZ) prefetch(z, at);
  }
};

// The stream modes (stream_modes.h) form (θ, p, u) in F as they load, kLanes elements of F at a time
// (as many as one vector of the double sums they feed; a row pair at once in lanes_pair), so that the
// square root and the division of Adam overlap with the sums of the elements before them instead of
// running as a pass of their own over a buffer (p and u never go through memory).
template <typename F>
struct LanesOf {
  using type = dvec;
};
template <>
struct LanesOf<float> {
  using type = fvec;
};
NMX_INLINE fvec load_lanes(const float* p) {
  fvec f;
  std::memcpy(&f, p, sizeof f);
  return f;
}
NMX_INLINE dvec load_lanes(const double* p) { return load(p); }
NMX_INLINE dvec widen(dvec d) { return d; }
NMX_INLINE dvec widen(fvec f) {
#if NMX_ISA_LEVEL == 2
  return (dvec)_mm512_cvtps_pd((__m256)f);
#elif NMX_ISA_LEVEL == 1
  return (dvec)_mm256_cvtps_pd((__m128)f);
#else
  return __builtin_convertvector(f, dvec);
#endif
}
// Square roots of lanes (correctly rounded, as the scalar sqrt).
NMX_INLINE fvec root_lanes(fvec v) {
#if NMX_ISA_LEVEL == 2
  return (fvec)_mm256_sqrt_ps((__m256)v);
#elif NMX_ISA_LEVEL == 1
  return (fvec)_mm_sqrt_ps((__m128)v);
#else
  for (int i = 0; i < kLanes; ++i) v[i] = ::sqrtf(v[i]);
  return v;
#endif
}
NMX_INLINE dvec root_lanes(dvec v) {
#if NMX_ISA_LEVEL == 2
  return (dvec)_mm512_sqrt_pd((__m512d)v);
#elif NMX_ISA_LEVEL == 1
  return (dvec)_mm256_sqrt_pd((__m256d)v);
#else
  for (int i = 0; i < kLanes; ++i) v[i] = ::sqrt(v[i]);
  return v;
#endif
}

// Adam: reads θ, g, and with STATE m, v (else a fresh optimizer: zeros), with AMS v_max too.
template <bool STATE, bool AMS, typename F>
struct AdamRow {
  static constexpr bool kHY = true, kHZ = true;
  static constexpr int kScratch = 5;
  static constexpr bool kForms = true, kPairInZmm = std::is_same<F, float>::value, kState = STATE, kAms = AMS;
  using Formed = PlainRow<true, true, F, F, F>;  // form_row's (θ, p, u)
  using L = typename LanesOf<F>::type;
  using Shared = StreamCoef<F>;
  const F *th, *g, *m, *v, *vmax;

  static NMX_INLINE AdamRow make(const TensorPtrs& tp, int64_t off, int64_t n, int64_t segment, double* sc) {
    AdamRow r{};
    r.th = as_type<F>(tp.x, tp.dx, off, n, sc);
    r.g = as_type<F>(tp.y, tp.dy, off, n, sc + segment);
    if (STATE) r.m = as_type<F>(tp.z, tp.dz, off, n, sc + 2 * segment);
    if (STATE) r.v = as_type<F>(tp.v, tp.dv, off, n, sc + 3 * segment);
    if (AMS) r.vmax = as_type<F>(tp.vmax, tp.dvmax, off, n, sc + 4 * segment);
    return r;
  }
  static NMX_INLINE Shared shared(const TensorPtrs& tp) { return Shared::from(tp.coef); }
  NMX_INLINE void lanes(const Shared& c, int64_t i, dvec& a, dvec& b, dvec& d) const {
    const L t = load_lanes(th + i);
    L p, vh;
    adam_moments_of_step<AMS>(t, load_lanes(g + i), STATE ? load_lanes(m + i) : L{},
                              STATE ? load_lanes(v + i) : L{}, AMS ? load_lanes(vmax + i) : L{}, c, p, vh);
    a = widen(t), b = widen(p), d = widen(adam_direction_of(p, root_lanes(vh), c));
  }
  // (p, u) of column i in F.
  NMX_INLINE void direction(const Shared& c, int64_t i, F& p, F& u) const {
    adam_direction<AMS>(th[i], g[i], STATE ? m[i] : F(0), STATE ? v[i] : F(0), AMS ? vmax[i] : F(0), c, p, u);
  }
  NMX_INLINE void one(const Shared& c, int64_t i, double& a, double& b, double& d) const {
    F p, u;
    direction(c, i, p, u);
    a = th[i], b = p, d = u;
  }
  NMX_INLINE void prefetch_at(int64_t at) const {
    prefetch(th, at);
    prefetch(g, at);
    if (STATE) prefetch(m, at), prefetch(v, at);
    if (AMS) prefetch(vmax, at);
  }
};

// Two rows' lanes at once (the fused loop's row pair).  With AVX-512, Adam in float forms both in one
// 16-float register: a 512-bit square root and division cost less per element than two 256-bit ones
// (Zen 4: 0.30 against 0.39 ns per element for the transform alone; the whole kernel on L3-resident
// data went from 1.23 to 1.08 ns per element).  The same operations element by element as lanes().
template <typename Row>
NMX_INLINE void lanes_pair(const typename Row::Shared& sh, const Row* rows, int64_t i, dvec& x0, dvec& y0, dvec& z0,
                           dvec& x1, dvec& y1, dvec& z1) {
#if NMX_ISA_LEVEL == 2
  if constexpr (Row::kPairInZmm) {
    typedef float f16vec __attribute__((vector_size(64), aligned(4)));
    const auto both = [&](const float* a, const float* b) {
      return (f16vec)_mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(a + i)), _mm256_loadu_ps(b + i), 1);
    };
    constexpr bool STATE = Row::kState, AMS = Row::kAms;
    const f16vec t = both(rows[0].th, rows[1].th);
    f16vec p, vh;
    adam_moments_of_step<AMS>(t, both(rows[0].g, rows[1].g), STATE ? both(rows[0].m, rows[1].m) : f16vec{},
                              STATE ? both(rows[0].v, rows[1].v) : f16vec{},
                              AMS ? both(rows[0].vmax, rows[1].vmax) : f16vec{}, sh, p, vh);
    const f16vec u = adam_direction_of(p, (f16vec)_mm512_sqrt_ps((__m512)vh), sh);
    const auto lo = [](f16vec f) { return (dvec)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)f)); };
    const auto hi = [](f16vec f) { return (dvec)_mm512_cvtps_pd(_mm512_extractf32x8_ps((__m512)f, 1)); };
    x0 = lo(t), y0 = lo(p), z0 = lo(u), x1 = hi(t), y1 = hi(p), z1 = hi(u);
    return;
  }
#endif
  rows[0].lanes(sh, i, x0, y0, z0);
  rows[1].lanes(sh, i, x1, y1, z1);
}

// Lion: reads θ, g, and with STATE m.
template <bool STATE, typename F>
struct LionRow {
  static constexpr bool kHY = true, kHZ = true;
  static constexpr int kScratch = 3;
  static constexpr bool kForms = true, kPairInZmm = false;
  using Formed = PlainRow<true, true, F, F, F>;  // form_row's (θ, p, u)
  using L = typename LanesOf<F>::type;
  using Shared = StreamCoef<F>;
  const F *th, *g, *m;

  static NMX_INLINE LionRow make(const TensorPtrs& tp, int64_t off, int64_t n, int64_t segment, double* sc) {
    LionRow r{};
    r.th = as_type<F>(tp.x, tp.dx, off, n, sc);
    r.g = as_type<F>(tp.y, tp.dy, off, n, sc + segment);
    if (STATE) r.m = as_type<F>(tp.z, tp.dz, off, n, sc + 2 * segment);
    return r;
  }
  static NMX_INLINE Shared shared(const TensorPtrs& tp) { return Shared::from(tp.coef); }
  NMX_INLINE void lanes(const Shared& c, int64_t i, dvec& a, dvec& b, dvec& d) const {
    L p, u;
    lion_direction(load_lanes(g + i), STATE ? load_lanes(m + i) : L{}, c, p, u);
    a = widen(load_lanes(th + i)), b = widen(p), d = widen(u);
  }
  NMX_INLINE void direction(const Shared& c, int64_t i, F& p, F& u) const {
    lion_direction(g[i], STATE ? m[i] : F(0), c, p, u);
  }
  NMX_INLINE void one(const Shared& c, int64_t i, double& a, double& b, double& d) const {
    F p, u;
    direction(c, i, p, u);
    a = th[i], b = p, d = u;
  }
  NMX_INLINE void prefetch_at(int64_t at) const {
    prefetch(th, at);
    prefetch(g, at);
    if (STATE) prefetch(m, at);
  }
};
